"""Each projection is the true Euclidean projection: brute force over every support agrees."""

import itertools
import zlib

import pytest
import torch

from admmprune import Channels, Columns, Filters, Intersection, Unstructured
from admmprune.sets.constraints import keep_count, topk_mask


def brute_force(W, groups_of_positions, k):
    """Best Z supported on k of the given position groups: min ||W − Z|| over all choices."""
    best, best_d = None, None
    for chosen in itertools.combinations(range(len(groups_of_positions)), k):
        mask = torch.zeros_like(W, dtype=torch.bool)
        for g in chosen:
            mask |= groups_of_positions[g]
        d = float((W - W * mask).norm())
        if best_d is None or d < best_d - 1e-12:
            best, best_d = W * mask, d
    return best, best_d


def element_groups(W):
    out = []
    for i in range(W.numel()):
        m = torch.zeros(W.numel(), dtype=torch.bool)
        m[i] = True
        out.append(m.view_as(W))
    return out


def row_groups(W):
    out = []
    for r in range(W.shape[0]):
        m = torch.zeros_like(W, dtype=torch.bool)
        m[r] = True
        out.append(m)
    return out


def column_groups(W):
    cols = W[0].numel()
    out = []
    for c in range(cols):
        m = torch.zeros(W.shape[0], cols, dtype=torch.bool)
        m[:, c] = True
        out.append(m.view_as(W))
    return out


def channel_groups(W, groups):
    out_per_group = W.shape[0] // groups
    out = []
    for g in range(groups):
        for j in range(W.shape[1]):
            m = torch.zeros_like(W, dtype=torch.bool)
            m[g * out_per_group : (g + 1) * out_per_group, j] = True
            out.append(m)
    return out


CASES = [
    (Unstructured, element_groups, (3, 4), 1),
    (Unstructured, element_groups, (2, 2, 1, 3), 1),
    (Filters, row_groups, (5, 3), 1),
    (Filters, row_groups, (4, 2, 2, 2), 1),
    (Columns, column_groups, (3, 5), 1),
    (Columns, column_groups, (3, 2, 2, 2), 1),
    (Columns, column_groups, (2, 3, 3), 1),  # Conv1d
    (Channels, lambda W: channel_groups(W, 1), (3, 4, 2, 2), 1),
    (Channels, lambda W: channel_groups(W, 1), (3, 5), 1),  # Linear: input neurons
    (Channels, lambda W: channel_groups(W, 2), (4, 3, 2, 2), 2),  # grouped conv, 6 inputs
    (Channels, lambda W: channel_groups(W, 4), (4, 1, 3, 3), 4),  # depthwise
    (Filters, row_groups, (3, 2, 2, 2, 2), 1),  # Conv3d
]


@pytest.mark.parametrize("cls,groups_fn,shape,conv_groups", CASES)
@pytest.mark.parametrize("keep", [0.2, 0.5, 0.75, 1.0])
def test_projection_equals_brute_force(cls, groups_fn, shape, conv_groups, keep):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{cls.__name__}{shape}{keep}".encode()))
    for _ in range(3):
        W = torch.randn(shape, generator=gen)
        candidates = groups_fn(W)
        k = keep_count(keep, len(candidates))
        Z, support = cls(keep).project(W, conv_groups)
        Z_bf, d_bf = brute_force(W, candidates, k)
        assert float((W - Z).norm()) == pytest.approx(d_bf, rel=1e-6, abs=1e-7)
        torch.testing.assert_close(Z, Z_bf)  # random normals: no distance ties
        assert support.shape == W.shape and support.dtype == torch.bool
        assert torch.equal(Z, W * support)
        # exactly k structures kept
        kept = sum(bool(support[c].all()) for c in candidates)
        assert kept == k
        assert all(bool(support[c].all()) or not bool(support[c].any()) for c in candidates)


def test_rounding_rule_is_round_half_up_never_zero():
    assert keep_count(0.5, 3) == 2  # 1.5 rounds up
    assert keep_count(0.25, 10) == 3  # 2.5 rounds up
    assert keep_count(0.24, 10) == 2
    assert keep_count(0.01, 10) == 1  # never zero
    assert keep_count(1.0, 7) == 7
    assert keep_count(0.07, 100) == 7  # 0.07*100 = 7.000000000000001 in floats


@pytest.mark.parametrize("n,keep", [(1000, 0.1), (4321, 0.013), (97, 0.5), (10, 0.05)])
def test_kept_fraction_exact(n, keep):
    W = torch.randn(n)
    _, support = Unstructured(keep).project(W)
    assert int(support.sum()) == keep_count(keep, n)


def test_ties_keep_exact_count_and_lowest_indices():
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 0.0])
    mask = topk_mask(scores, 3)
    assert mask.tolist() == [False, True, True, True, False, False]
    W = torch.ones(4, 4)  # every weight ties
    _, support = Unstructured(0.25).project(W)
    assert int(support.sum()) == 4
    assert support.flatten()[:4].all()
    _, support = Filters(0.5).project(W)
    assert support[:2].all() and not support[2:].any()


def test_bf16_weights_project_with_exact_count():
    W = torch.randn(64, 32).to(torch.bfloat16)  # many ties in bf16 magnitudes
    Z, support = Unstructured(0.1).project(W)
    assert int(support.sum()) == keep_count(0.1, W.numel())
    assert Z.dtype == torch.bfloat16


def test_intersection_lies_in_every_set_and_beats_either_order():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        W = torch.randn(6, 3, 2, 2, generator=gen)
        a, b = Filters(0.5), Columns(0.25)
        Z, support = (a & b).project(W)
        rows = (Z.reshape(6, -1).abs().sum(1) > 0).sum()
        cols = (Z.reshape(6, -1).abs().sum(0) > 0).sum()
        assert rows <= keep_count(0.5, 6) and cols <= keep_count(0.25, 12)
        ab = b.project(a.project(W).Z).Z
        ba = a.project(b.project(W).Z).Z
        d = float((W - Z).norm())
        assert d <= min(float((W - ab).norm()), float((W - ba).norm())) + 1e-6
        assert torch.equal(Z, W * support)


def test_intersection_with_inactive_part_is_exact():
    W = torch.randn(5, 4)
    Z, _ = (Filters(1.0) & Unstructured(0.3)).project(W)
    Z_bf, _ = brute_force(W, element_groups(W), keep_count(0.3, 20))
    torch.testing.assert_close(Z, Z_bf)


def test_intersection_flattens_and_reprs():
    c = Filters(0.5) & Columns(0.5) & Unstructured(0.1)
    assert isinstance(c, Intersection) and len(c.parts) == 3
    assert repr(c) == "Filters(keep=0.5) & Columns(keep=0.5) & Unstructured(keep=0.1)"
    assert c == Filters(0.5) & Columns(0.5) & Unstructured(0.1)


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5, 20, float("nan"), float("inf"), "0.5", True])
@pytest.mark.parametrize("cls", [Unstructured, Filters, Channels, Columns])
def test_bad_keep_fraction_is_a_clear_error(cls, keep):
    with pytest.raises(ValueError, match=r"keep") as err:
        cls(keep)
    msg = str(err.value)
    assert cls.__name__ in msg
    assert "(0, 1]" in msg or "must be a number" in msg


def test_percent_keep_suggests_fraction():
    with pytest.raises(ValueError, match=r"Filters\(keep=0.2\)"):
        Filters(20)


@pytest.mark.parametrize("shape", [(12, 30), (8, 3, 3, 3), (5, 50)])
@pytest.mark.parametrize("rows_first", [True, False])
def test_filters_and_columns_fast_path_equals_the_projections_in_turn(shape, rows_first):
    """The row + column pair skips the intermediate Z's: same support and Z as projecting in
    turn both ways and keeping the closer result."""
    torch.manual_seed(len(shape))
    parts = (Filters(0.5), Columns(0.3))
    inter = Intersection(*(parts if rows_first else parts[::-1]))
    for _ in range(25):
        W = torch.randn(*shape) * torch.rand(shape[0], *[1] * (len(shape) - 1))
        fast = inter.project(W)
        a = inter._in_turn(W, inter.parts, 1)
        b = inter._in_turn(W, inter.parts[::-1], 1)
        ref = b if (W - b.Z).norm() < (W - a.Z).norm() else a
        assert torch.equal(fast.support, ref.support)
        assert torch.equal(fast.Z, ref.Z)
