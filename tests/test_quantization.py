"""Quantization projections: nearest level (brute force), q search on its grid, exact
ternary/binary projections, and joint prune + quantize keeping zeros zero."""

import itertools

import pytest
import torch
from torch import nn

import admmprune as ap
from admmprune.quantization import GRID, nearest_level


def brute_nearest(x, levels):
    d = (x.reshape(-1, 1) - levels.reshape(1, -1)).abs()
    return levels[d.argmin(dim=1)].view_as(x)


@pytest.mark.parametrize("bits,kind", [(2, "uniform"), (3, "uniform"), (4, "pow2"), (5, "uniform")])
def test_nearest_level_is_brute_force(bits, kind):
    torch.manual_seed(bits)
    c = ap.Quantized(bits, kind)
    x = torch.randn(500)
    levels = c.level_set(0.3)
    assert levels.numel() == 2 * c.L + 1 and torch.all(levels[1:] > levels[:-1])
    assert torch.equal(nearest_level(x, levels), brute_nearest(x, levels))


@pytest.mark.parametrize("bits,kind", [(3, "uniform"), (4, "uniform"), (3, "pow2")])
def test_projection_is_on_levels_and_q_is_the_grid_minimum(bits, kind):
    torch.manual_seed(0)
    c = ap.Quantized(bits, kind)
    W = torch.randn(16, 8, 3, 3) * 0.1
    Z, support = c.project(W)
    assert support.all()
    q = c.scale(W)
    levels = c.level_set(q)
    assert torch.isin(Z, levels).all()  # every value exactly on a level
    assert torch.equal(Z, brute_nearest(W, levels))  # and the nearest one
    err = float((W - Z).pow(2).sum())
    assert c.candidates(W).numel() == GRID.numel()
    for other_q in c.candidates(W).tolist():  # no q on the grid does better
        other = brute_nearest(W, c.level_set(other_q))
        assert err <= float((W - other).pow(2).sum()) + 1e-9
    assert Z.unique().numel() <= 2**bits - 1


def test_q_search_beats_the_naive_scale():
    torch.manual_seed(1)
    W = torch.randn(4000)
    c = ap.Quantized(3)
    naive = brute_nearest(W, c.level_set(float(W.abs().max()) / c.L))
    Z = c.project(W).Z
    assert (W - Z).pow(2).sum() < 0.8 * (W - naive).pow(2).sum()


def test_ternary_is_the_exact_projection():
    """Brute force over every support and sign pattern's best a: {0, ±a} with a free."""
    torch.manual_seed(2)
    W = torch.randn(7)
    Z = ap.Ternary().project(W).Z
    best = None
    for k in range(1, 8):
        for keep in itertools.combinations(range(7), k):
            idx = list(keep)
            a = W[idx].abs().mean()
            cand = torch.zeros(7)
            cand[idx] = torch.sign(W[idx]) * a
            d = float((W - cand).norm())
            best = d if best is None else min(best, d)
    assert float((W - Z).norm()) == pytest.approx(best, abs=1e-6)
    assert Z.abs().unique().numel() <= 2


def test_binary_is_the_exact_projection():
    torch.manual_seed(3)
    W = torch.randn(9)
    Z = ap.Binary().project(W).Z
    a = W.abs().mean()
    assert torch.equal(Z, torch.where(W >= 0, a, -a))
    for other in torch.linspace(0.01, 2, 50):  # no other a is closer
        assert (W - Z).norm() <= (W - torch.sign(W) * other).norm() + 1e-6


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda: ap.Quantized(1), "Binary"),
        (lambda: ap.Quantized(17), "2 to 16"),
        (lambda: ap.Quantized(3.5), "integer"),
        (lambda: ap.Quantized(4, "log"), "pow2"),
    ],
)
def test_bad_quantization_specs(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_all_zero_layer_projects_to_zero():
    for c in (ap.Quantized(4), ap.Ternary()):
        assert torch.equal(c.project(torch.zeros(5)).Z, torch.zeros(5))


@pytest.mark.parametrize("constraint", [ap.Quantized(3), ap.Ternary(), ap.Binary()])
def test_prune_then_admm_quantize_keeps_zeros_and_lands_on_levels(constraint):
    torch.manual_seed(4)
    X = torch.randn(256, 12)
    y = (X[:, :3].sum(1) > 0).long()
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 2))
    masks = ap.prune(model, {"0": ap.Unstructured(0.3), "2": ap.Unstructured(0.5)})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    masks.attach(opt)
    admm = ap.ADMM(model, {"0": constraint, "2": constraint}, support=masks, rho=1e-2)
    for step in range(60):
        loss = nn.functional.cross_entropy(model(X), y) + admm.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 9:
            admm.update()
    final = admm.prune()
    for name in ("0.weight", "2.weight"):
        W = dict(model.named_parameters())[name].detach()
        assert torch.all(W[~masks[name]] == 0)  # pruned zeros stay zero
        assert torch.equal(final[name], masks[name])  # the support is the pruning mask
        kept = W[masks[name]]
        if isinstance(constraint, ap.Binary):
            assert kept.abs().unique().numel() == 1 and torch.all(kept != 0)
        assert kept.unique().numel() <= {ap.Quantized(3): 7, ap.Ternary(): 3}.get(constraint, 2)


def test_support_needs_an_elementwise_constraint():
    model = nn.Sequential(nn.Linear(4, 4))
    masks = ap.prune(model, {"0": ap.Unstructured(0.5)})
    with pytest.raises(ValueError, match="element-wise"):
        ap.ADMM(model, {"0": ap.Filters(0.5)}, support=masks)
    with pytest.raises(ValueError, match="no support mask"):
        ap.ADMM(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), {"*": ap.Ternary()}, support={})


@pytest.mark.parametrize("constraint", [ap.Quantized(3), ap.Ternary()])
def test_masked_mapping_freezes_a_growing_share_on_its_levels(constraint):
    from admmprune.quantization import MaskedMapping

    torch.manual_seed(5)
    X = torch.randn(256, 12)
    y = (X[:, :3].sum(1) > 0).long()
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 2))
    masks = ap.prune(model, {"0": ap.Unstructured(0.4)})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    masks.attach(opt)
    mm = MaskedMapping(model, {"0": constraint}, support=masks, share=0.3).attach(opt)
    W = model[0].weight
    levels = mm.levels["0.weight"]
    kept = masks["0.weight"]
    for round_ in range(1, 4):
        frozen_share = mm.step()["0.weight"]
        assert frozen_share == pytest.approx(min(1.0, 0.3 * round_), abs=1 / int(kept.sum()))
        frozen = mm.frozen["0.weight"].clone()
        before = W.detach()[frozen].clone()
        for _ in range(10):
            loss = nn.functional.cross_entropy(model(X), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert torch.equal(W.detach()[frozen], before)  # frozen weights never move
        assert torch.isin(W.detach()[frozen], levels).all()
        assert not (frozen & ~kept).any()
    mm.finish()
    assert torch.isin(W.detach()[kept], levels).all()
    assert torch.all(W.detach()[~kept] == 0)
