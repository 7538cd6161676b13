"""Quantization projections: nearest level (brute force), q search on its grid, exact
ternary/binary projections, and joint prune + quantize keeping zeros zero."""

import itertools

import pytest
import torch
from torch import nn

import admmprune as ap
from admmprune.sets.quantization import nearest_level


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
def test_projection_is_the_nearest_level_of_its_q(bits, kind):
    torch.manual_seed(0)
    c = ap.Quantized(bits, kind)
    W = torch.randn(16, 8, 3, 3) * 0.1
    Z, support = c.project(W)
    assert support.all()
    levels = c.level_set(c.scale(W))
    assert torch.isin(Z, levels).all()  # every value exactly on a level
    assert torch.equal(Z, brute_nearest(W, levels))  # and the nearest one
    assert Z.unique().numel() <= 2**bits - 1


def brute_best_error(c, x, points=4001):
    """The least error over a fine grid of q from 0 to past the all-zero point."""
    m = c.multipliers()
    top = float(x.abs().max()) / float((m[1] + m[0]) / 2)  # q above this zeroes every weight
    top = min(top, 4 * float(x.abs().max()) / float(m[1]))  # pow2: larger q only shifts levels
    return min(c.error(x, q) for q in torch.linspace(top / points, top, points).tolist())


def test_q_of_the_issue_example_is_the_true_minimum():
    """The old grid (up to 1.25·max|w|/L) picked q = 0.3935 with error 0.2673 here."""
    rows = [[1.3415, -0.6912, 0.6742], [-0.5412, -0.2758, 0.2238]]
    rows += [[-0.1522, -1.3301, 0.5499], [0.6266, 0.5770, 0.6269]]
    x = torch.tensor(rows)
    c = ap.Quantized(3)
    q = c.scale(x)
    assert q == pytest.approx(0.642, abs=1e-3)
    assert c.error(x, q) == pytest.approx(0.18154, abs=1e-5)
    assert c.error(x, q) <= brute_best_error(c, x, 20001) + 1e-12


@pytest.mark.parametrize(
    "bits,kind",
    [(2, "uniform"), (3, "uniform"), (4, "uniform"), (6, "uniform"), (3, "pow2"), (4, "pow2")],
)
def test_q_beats_a_fine_brute_force_grid(bits, kind):
    c = ap.Quantized(bits, kind)
    g = torch.Generator().manual_seed(bits)
    for trial in range(12):
        n = int(torch.randint(3, 60, (1,), generator=g))
        x = torch.randn(n, generator=g)
        if trial % 3 == 1:
            x = x.sign() * x.abs().pow(3)  # heavy tails: the best q saturates the outliers
        if trial % 3 == 2:
            x = torch.round(x * 2) / 2  # ties: many equal magnitudes
        q = c.scale(x)
        e = c.error(x, q)
        assert e <= brute_best_error(c, x) + 1e-9 * (1 + e)
        # exact: no nearby q does better either (the grid cannot see between its points)
        for d in (1e-7, 1e-4, 1e-2):
            assert e <= c.error(x, q * (1 + d)) + 1e-12 and e <= c.error(x, q * (1 - d)) + 1e-12


def test_pow2_q_uses_its_top_level():
    """pow2 levels are scale-free: the q returned is the smallest optimal one, whose top level
    some weight reaches (q <= max|x| / 0.75), not one with idle levels above the weights."""
    g = torch.Generator().manual_seed(5)
    for bits in (3, 4, 6):
        c = ap.Quantized(bits, "pow2")
        x = torch.randn(200, generator=g)
        q = c.scale(x)
        assert q <= float(x.abs().max()) / 0.75 + 1e-12
        assert c.error(x, q) <= brute_best_error(c, x) + 1e-9


def test_windowed_q_search_matches_the_exact_one(monkeypatch):
    """Past the breakpoint budget the sweep covers a window around the Lloyd q: forced here to
    1/20 of the breakpoints, the error stays within 1e-6 of the exact sweep's."""
    from admmprune.sets import quantization

    g = torch.Generator().manual_seed(7)
    for bits, dist in [(8, "normal"), (6, "laplace"), (5, "uniform")]:
        x = torch.randn(3000, generator=g)
        if dist == "laplace":
            x = x.sign() * torch.empty(3000).exponential_(generator=g)
        if dist == "uniform":
            x = torch.rand(3000, generator=g) - 0.5
        c = ap.Quantized(bits)
        exact = c.error(x, c.scale(x))
        monkeypatch.setattr(quantization, "_MAX_EXACT", 3000 * c.L // 20)
        monkeypatch.setattr(quantization, "_CHUNK", 2000)  # and chunked
        windowed = c.error(x, c.scale(x))
        monkeypatch.undo()
        assert windowed <= exact * (1 + 1e-6)


def test_chunked_sweep_is_the_single_sweep(monkeypatch):
    from admmprune.sets import quantization

    x = torch.randn(2000, generator=torch.Generator().manual_seed(3))
    c = ap.Quantized(5)
    whole = c.scale(x)
    monkeypatch.setattr(quantization, "_CHUNK", 500)
    assert c.scale(x) == pytest.approx(whole, rel=1e-12)


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
    from admmprune.solvers.masked_mapping import MaskedMapping

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
