"""SS-Auto: group soft-thresholding and the row+column prox are true minimisers; λ = 0 changes
nothing; the λ search hits a requested rate; the pruned support is rows × columns."""

import pytest
import torch
from torch import nn

import admmprune as ap
from admmprune.sets.rows_columns import group_soft_threshold, prox_rows_columns
from admmprune.solvers.ssauto import SSAuto
from admmprune.weights.count import count
from conftest import make_blobs


def objective(Z, V, tau_r, tau_c):
    return (
        (tau_r * Z.norm(dim=1)).sum() + (tau_c * Z.norm(dim=0)).sum() + 0.5 * (Z - V).pow(2).sum()
    )


def test_group_soft_threshold_is_the_minimiser_and_kills_small_groups():
    torch.manual_seed(0)
    V = torch.randn(6, 5, dtype=torch.float64)
    tau = torch.tensor([0.1, 0.5, 1.0, 3.0, 5.0, 0.0], dtype=torch.float64)
    Z = group_soft_threshold(V, tau, dim=1)
    norms = V.norm(dim=1)
    assert torch.all(Z[norms <= tau] == 0) and (norms <= tau).any()  # exactly zero
    f = lambda Z: (tau * Z.norm(dim=1)).sum() + 0.5 * (Z - V).pow(2).sum()  # noqa: E731
    for _ in range(300):  # no nearby point does better
        assert f(Z) <= f(Z + 1e-3 * torch.randn_like(Z)) + 1e-12
    # numerically: a long subgradient descent from V lands on the same point
    X = V.clone().requires_grad_(True)
    opt = torch.optim.SGD([X], lr=0.01)
    for i in range(5000):
        opt.param_groups[0]["lr"] = 0.05 / (1 + i) ** 0.5
        opt.zero_grad()
        f(X).backward()
        opt.step()
    assert float(f(X.detach())) >= float(f(Z)) - 1e-6
    assert (X.detach() - Z).abs().max() < 0.02


def test_rows_and_columns_prox_is_the_minimiser_of_the_sum():
    torch.manual_seed(1)
    V = torch.randn(7, 9, dtype=torch.float64)
    tr = torch.linspace(0.5, 3.0, 7, dtype=torch.float64)
    tc = torch.linspace(0.3, 2.5, 9, dtype=torch.float64)
    Z, rows, cols = prox_rows_columns(V, tr, tc, iters=500)
    assert not rows.all() or not cols.all()  # something died at these thresholds
    assert torch.all(Z[~rows] == 0) and torch.all(Z[:, ~cols] == 0)
    best = objective(Z, V, tr, tc)
    for _ in range(500):
        assert best <= objective(Z + 1e-3 * torch.randn_like(Z), V, tr, tc) + 1e-10
    # better than the naive composition (rows then columns), which is not the prox of the sum
    naive = group_soft_threshold(group_soft_threshold(V, tr, 1), tc, 0)
    assert best <= objective(naive, V, tr, tc) + 1e-12


def test_lambda_zero_changes_nothing():
    torch.manual_seed(2)
    V = torch.randn(4, 6)
    Z, rows, cols = prox_rows_columns(V, 0.0, 0.0)
    assert torch.equal(Z, V) and rows.all() and cols.all()


def small_model():
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 4),
    )  # fmt: skip


@pytest.mark.parametrize("by", ["weights", "macs"])
def test_lambda_search_hits_the_target_and_rates_are_non_uniform(by):
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 4),
    )  # fmt: skip
    with torch.no_grad():  # trained weights have spread group norms (fresh ones are all alike,
        for m in (model[2], model[5]):  # and a whole layer's columns would die at one λ)
            M = m.weight.view(m.weight.shape[0], -1)
            M.mul_(torch.randn(M.shape[0], 1).mul(0.5).exp() * torch.randn(1, M.shape[1]).exp())
    x = torch.randn(1, 3, 8, 8)  # one conv2 row is ~1.3 % of the MACs: ±2 % is reachable
    s = SSAuto(model, {"0": None, "2": True, "5": True}, target=0.3, by=by, example_input=x)
    stats = s.update()
    assert stats["kept"] == pytest.approx(0.3, abs=0.02)
    rates = s.rates()
    assert set(rates) == {"2.weight", "5.weight"}
    assert max(rates.values()) - min(rates.values()) > 0.05  # per-layer rates emerge


def two_convs():
    """Two 8-channel convs, the first at 4x the positions of the second (a pool between),
    its rows and columns given spread norms as trained weights have."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1)
    )
    with torch.no_grad():
        M = model[0].weight.view(8, -1)
        M.mul_(torch.randn(8, 1).mul(0.5).exp() * torch.randn(1, M.shape[1]).exp())
    return model


@pytest.mark.parametrize("by", ["weights", "macs"])
def test_a_mac_target_prunes_where_weights_cost_more_macs(by):
    """Two convs with the same weights, the first applied at 4x the positions of the second:
    a weight target thins them alike, a MAC target thins the expensive one harder."""
    model = two_convs()
    with torch.no_grad():
        model[2].weight.copy_(model[0].weight)
    s = SSAuto(model, ["0", "2"], target=0.5, by=by, example_input=torch.randn(1, 8, 8, 8))
    s.update()
    rates = s.rates()
    if by == "weights":
        assert rates["0.weight"] == pytest.approx(rates["2.weight"], abs=0.1)
    else:
        assert rates["0.weight"] < rates["2.weight"] - 0.2


def test_min_keep_is_a_floor_on_every_layers_rows_and_columns():
    model = two_convs()
    x = torch.randn(1, 8, 8, 8)
    kept = {}
    for floor in (0.0, 0.5):
        s = SSAuto(model, ["0", "2"], target=0.3, by="macs", example_input=x, min_keep=floor)
        stats = s.update()
        assert stats["kept"] == pytest.approx(0.3, abs=0.03)
        kept[floor] = {n: (int(r.sum()), int(c.sum())) for n, (r, c) in s.kept.items()}
    assert kept[0.0]["0.weight"][0] < 4 or kept[0.0]["0.weight"][1] < 36  # λ alone goes lower
    assert all(r >= 4 and c >= 36 for r, c in kept[0.5].values())  # ceil(0.5 · 8), ceil(0.5 · 72)
    with pytest.raises(ValueError, match="min_keep"):
        SSAuto(model, ["0"], target=0.3, min_keep=1.5)
    with pytest.raises(ValueError, match="lower min_keep or raise the target"):
        SSAuto(model, ["0", "2"], target=0.2, min_keep=0.5)  # the floors alone keep 0.25


def test_ssauto_trains_prunes_rows_times_columns_and_keeps_them():
    X, y = make_blobs(n=400, d=3 * 8 * 8, classes=4, seed=4)
    X = X.view(-1, 3, 8, 8)
    model = small_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    s = SSAuto(model, [nn.Conv2d, "5"], target=0.25, rho=1e-2)
    for _epoch in range(4):
        for i in range(0, 400, 50):
            loss = nn.functional.cross_entropy(model(X[i : i + 50]), y[i : i + 50]) + s.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
        stats = s.update()
    assert stats["kept"] == pytest.approx(0.25, abs=0.02)
    state = s.state_dict()
    masks = s.prune()
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) / total == pytest.approx(0.25, abs=0.02)
    for name, m in masks.items():  # the support is a rows × columns block
        M = m.reshape(m.shape[0], -1)
        rows, cols = M.any(dim=1), M.any(dim=0)
        assert torch.equal(M, rows[:, None] & cols[None, :]), name
    masks.attach(opt)
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    W = dict(model.named_parameters())
    assert all(torch.all(W[n][~m] == 0) for n, m in masks.items())
    other = SSAuto(small_model(), {nn.Conv2d: True, "5": True}, target=0.25)
    other.load_state_dict(state)
    assert other.lam == s.lam and all(torch.equal(other.Z[k], s.Z[k]) for k in s.Z)


def test_debias_keeps_w_on_the_support_the_prox_chose():
    """debias=True: the same groups die as with the plain prox, but the survivors keep W's
    values instead of their soft-thresholded (shrunken) ones."""
    Z = {}
    for debias in (False, True):
        model = small_model()
        s = SSAuto(model, [nn.Conv2d], target=0.4, debias=debias)
        s.update()
        Z[debias] = s.Z
        W = dict(model.named_parameters())
    for name, Zd in Z[True].items():
        support = Z[False][name] != 0
        assert support.any() and not support.all()
        assert torch.equal(Zd != 0, support)  # the same rows × columns survive
        assert torch.equal(Zd[support], W[name].detach()[support])  # unshrunk
        assert (Z[False][name][support].abs() < Zd[support].abs()).all()  # the prox shrinks


def test_dual_drives_w_onto_z_where_the_plain_pull_stalls():
    """With f(W) = ||W − W⁰||²/2 and rho growing as in the benchmarks, the plain pull leaves
    W ≈ W⁰/(1 + rho) on the dead groups; the dual U grows until W reaches Z's support."""
    dead = {}
    for dual in (False, True):
        model = two_convs()
        W0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.ndim == 4}
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        s = SSAuto(model, [nn.Conv2d], target=0.4, rho=0.05, rho_growth=1.5, dual=dual)
        for _ in range(12):
            s.update()
            for _ in range(20):
                W = dict(model.named_parameters())
                loss = sum(0.5 * (W[n] - W0[n]).pow(2).sum() for n in W0) + s.penalty()
                opt.zero_grad()
                loss.backward()
                opt.step()
        W = {n: p.detach() for n, p in model.named_parameters()}
        dead[dual] = max(float(W[n][s.Z[n] == 0].abs().max()) for n in W0)
        if dual:  # debiased: U is zero on the survivors (Z = W + U = W there)
            for n in W0:
                alive = s.Z[n] != 0
                assert alive.any() and torch.equal(s.U[n][alive], torch.zeros(int(alive.sum())))
            state = s.state_dict()
            other = SSAuto(two_convs(), [nn.Conv2d], target=0.4, dual=True)
            other.load_state_dict(state)
            assert all(torch.equal(other.U[k], s.U[k]) for k in s.U)
            assert all(torch.equal(other.T[k], s.T[k]) for k in s.T)
            with pytest.raises(ValueError, match="dual=True"):
                SSAuto(two_convs(), [nn.Conv2d], target=0.4).load_state_dict(state)
    assert dead[False] > 0.05  # measured 0.12
    assert dead[True] < 0.1 * dead[False]  # measured 0.0004


def test_batchnorm_entries_of_dead_rows_are_pulled_to_zero():
    """With example_input each conv's BatchNorm is found (not one behind a ReLU), and the
    entries of the rows Z kills join the penalty with target 0."""
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8),
    )  # fmt: skip
    x = torch.randn(2, 3, 6, 6)
    s = SSAuto(model, [nn.Conv2d], target=0.3, example_input=x)
    assert s.bn == {"1.weight": "0.weight", "1.bias": "0.weight"}  # "5" follows a ReLU
    assert not SSAuto(model, [nn.Conv2d], target=0.3).bn  # nothing to find without an input
    assert float(s.penalty().detach()) == 0  # Z⁰ = current values: no pull at first
    s.update()
    rows, _ = s.kept["0.weight"]
    assert not rows.all()
    for name in ("1.weight", "1.bias"):
        P = dict(model.named_parameters())[name].detach()
        assert torch.equal(s.Z[name][~rows], torch.zeros(int((~rows).sum())))
        assert torch.equal(s.Z[name][rows], P[rows])
    model.zero_grad()
    s.penalty().backward()
    g = model[1].weight.grad
    assert (g[~rows] != 0).all() and (g[rows] == 0).all()  # only dead rows' entries are pulled
    state = s.state_dict()
    assert {"1.weight", "1.bias"} <= set(state["Z"])
    with pytest.raises(ValueError, match="BatchNorm"):
        SSAuto(model, [nn.Conv2d], target=0.3).load_state_dict(state)


def test_bad_ssauto_input():
    model = small_model()
    with pytest.raises(ValueError, match="KEPT"):
        SSAuto(model, {"2": True}, target=1.5)
    with pytest.raises(ValueError, match="example_input"):
        SSAuto(model, {"2": True}, target=0.5, by="macs")
    with pytest.raises(ValueError, match="matches no"):
        SSAuto(model, {"conv9": True}, target=0.5)
    assert isinstance(ap.ADMM, type)


def _reference_dykstra(V, tau_rows, tau_cols, iters):
    """The row + column prox one matrix at a time, as SS-Auto computed it before the fast path."""
    x, p, q = V, torch.zeros_like(V), torch.zeros_like(V)
    for _ in range(iters):
        y = group_soft_threshold(x + p, tau_rows, dim=1)
        p = x + p - y
        x_new = group_soft_threshold(y + q, tau_cols, dim=0)
        q = y + q - x_new
        done = torch.allclose(x_new, x, rtol=0, atol=1e-7 * float(V.abs().max() + 1e-30))
        x = x_new
        if done:
            break
    rows, cols = y.ne(0).any(dim=1), x.ne(0).any(dim=0)
    return x * rows[:, None] * cols[None, :], rows, cols


def _reference_support(s: SSAuto):
    """The reference path: every layer's prox on its own, a layer below min_keep rescaled by a
    bisection of its thresholds at every λ, and λ searched from 1e-6 at every update. (Before
    the fast path the rescaling took 8 steps, to 1/256 of λ; here 20, to 1e-6, so that the
    floor is resolved as finely as the fast path's 1e-4 and the bisection on λ resolve it.)"""

    def prox_all(lam):
        out = {}
        for t in s.targets:
            M = s._matrix(t)
            tr, tc = s._taus(t, M, lam)
            proxed = _reference_dykstra(M, tr, tc, s.iters)
            r_min, c_min = s._floor(t)
            if s.min_keep and (proxed[1].sum() < r_min or proxed[2].sum() < c_min):
                lo, hi, proxed = 0.0, 1.0, (M, M.ne(0).any(1), M.ne(0).any(0))
                for _ in range(20):
                    f = (lo + hi) / 2
                    p = _reference_dykstra(M, f * tr, f * tc, s.iters)
                    if p[1].sum() >= r_min and p[2].sum() >= c_min:
                        lo, proxed = f, p
                    else:
                        hi = f
            out[t.name] = proxed
        return out

    fits = lambda lam: s._kept_fraction(prox_all(lam)) >= s.target  # noqa: E731
    lo, hi = 0.0, 1e-6
    while fits(hi):
        lo, hi = hi, hi * 10
        assert hi < 1e12, "the floors alone keep the target: pick a lower min_keep"
    for _ in range(30):
        mid = (lo * hi) ** 0.5 if lo > 0 else hi / 10
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        if lo > 0 and hi / lo < 1 + 1e-4:
            break
    proxed = s._trim(prox_all(lo), lo)
    return lo, {n: (rows, cols) for n, (_, rows, cols) in proxed.items()}


def stages_of_convs():
    """Six convs in two stages of three (same shapes within a stage, 4x the positions in the
    first): the batched, floored and warm-started search all have work to do."""
    torch.manual_seed(7)
    layers = [nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)]
    layers += [nn.Conv2d(8, 8, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1)]
    layers += [nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Conv2d):
                M = m.weight.view(m.weight.shape[0], -1)
                M.mul_(torch.randn(M.shape[0], 1).mul(0.5).exp() * torch.randn(1, M.shape[1]).exp())
    return model


# the floored reference is slow (a bisection of Dykstra runs per layer and λ): one seed floored
@pytest.mark.parametrize(("seed", "min_keep"), [(0, 0.0), (1, 0.0), (0, 0.25)])
def test_fast_update_gives_the_reference_lambda_and_supports(seed, min_keep):
    """The batched prox, the floors found once per update and the warm-started λ give the
    reference path's λ (to the search's 1e-4) and the same rows and columns, over
    two updates with the weights moved between them."""
    model = stages_of_convs()
    x = torch.randn(1, 4, 8, 8)
    torch.manual_seed(seed)
    s = SSAuto(
        model, ["*"], target=0.35, by="macs", example_input=x, min_keep=min_keep, couple=False
    )
    for _ in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + 0.3 * torch.randn_like(p))
        lam_ref, kept_ref = _reference_support(s)
        s.update()
        assert s.lam == pytest.approx(lam_ref, rel=2e-4)
        for name, (rows, cols) in kept_ref.items():
            assert torch.equal(s.kept[name][0], rows), name
            assert torch.equal(s.kept[name][1], cols), name
        if min_keep:
            assert any(int(r.sum()) == s._floor(t)[0] or int(c.sum()) == s._floor(t)[1]
                       for t in s.targets for r, c in [s.kept[t.name]])  # fmt: skip


def test_coupled_prox_is_the_minimiser_and_reduces_to_the_single_matrix_prox():
    from admmprune.sets.rows_columns import _prox_coupled

    torch.manual_seed(4)
    V = torch.randn(6, 10)
    tr, tc = torch.full((6,), 1.5), torch.full((10,), 1.2)
    (Z,), alive, _ = _prox_coupled([V], [torch.arange(6)], tr, [tc], 500)
    ref, rows, _ = prox_rows_columns(V, tr, tc, iters=500)
    torch.testing.assert_close(Z, ref, atol=1e-5, rtol=0)
    assert torch.equal(alive, rows)
    # two matrices, channel j = row j of A and row perm[j] of B; columns only on A
    A, B = torch.randn(5, 7), torch.randn(5, 3)
    perm = torch.tensor([3, 0, 4, 1, 2])
    tr, tc = torch.full((5,), 2.0), torch.full((7,), 0.8)
    (ZA, ZB), alive, _ = _prox_coupled([A, B], [torch.arange(5), perm], tr, [tc, None], 2000)

    def objective(ZA, ZB):
        rows = (ZA.pow(2).sum(1) + ZB[perm].pow(2).sum(1)).sqrt()
        return (
            (tr * rows).sum()
            + (tc * ZA.norm(dim=0)).sum()
            + 0.5 * ((ZA - A).pow(2).sum() + (ZB - B).pow(2).sum())
        )

    best = objective(ZA, ZB)
    for _ in range(200):
        dA, dB = 1e-2 * torch.randn_like(A), 1e-2 * torch.randn_like(B)
        assert objective(ZA + dA, ZB + dB) >= best - 1e-5
    assert not alive.all() and alive.any()
    for j in range(5):  # a channel lives or dies in both matrices
        assert bool(ZA[j].any()) == bool(ZB[perm[j]].any()) == bool(alive[j])


def spread_resnet():
    from admmprune.models import build_model

    torch.manual_seed(5)
    model = build_model("resnet20", num_classes=4, in_channels=3, input_size=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                M = m.weight.view(m.weight.shape[0], -1)
                M.mul_(torch.randn(M.shape[0], 1).mul(0.7).exp() * torch.randn(1, M.shape[1]).exp())
            elif isinstance(m, nn.BatchNorm2d):  # not the identity: outputs depend on them
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 2.0)
    return model


def test_coupled_rows_on_a_resnet_are_all_removed_and_the_count_is_the_compact_model():
    """Residual streams are one row group per channel: every row SS-Auto kills leaves the
    model with compact(), none is left as a zero that costs full time, and the kept MACs
    SS-Auto counts are the compact model's (consumer columns of dead channels included)."""
    model = spread_resnet()
    x = torch.randn(2, 3, 8, 8)
    s = SSAuto(model, ["layer*.conv*"], target=0.4, by="macs", example_input=x[:1], min_keep=0.2)
    assert {u.key for u in s.units} == {"group:conv1", "group:layer2.0.shortcut.0",
                                        "group:layer3.0.shortcut.0"}  # fmt: skip
    assert "conv1.weight" in s._follows and "bn1.bias" in s._follows  # the stem dies with them
    stats = s.update()
    assert stats["kept"] == pytest.approx(0.4, abs=0.03)
    killed = sum(int((~r).sum()) for r, _ in s.kept.values())
    assert killed > 0 and any(not a.all() for a in s.alive.values())  # coupled channels died
    masks = s.prune()
    assert "bn1.bias" in masks and "conv1.weight" in masks
    model.eval()
    small, report = ap.compact(model, x)  # compares the outputs itself
    assert report.total_not_removable == 0
    assert report.removed.get("conv1", 0) == int((~s.alive["group:conv1"]).sum())
    layers = {c.name: c for c in count(small, x[:1])["layers"]}
    dense = {c.name: c for c in count(model, x[:1])["layers"]}
    blocks = [t.module_name for t in s.targets]
    kept = sum(layers[n].sparse_macs for n in blocks) / sum(dense[n].macs for n in blocks)
    assert kept == pytest.approx(stats["kept"], abs=1e-9)


def test_coupled_state_round_trip_and_couple_off():
    model = spread_resnet()
    x = torch.randn(1, 3, 8, 8)
    s = SSAuto(model, ["layer*.conv*"], target=0.5, by="macs", example_input=x, min_keep=0.2)
    s.update()
    t = SSAuto(model, ["layer*.conv*"], target=0.5, by="macs", example_input=x, min_keep=0.2)
    t.load_state_dict(s.state_dict())
    assert all(torch.equal(t.alive[k], a) for k, a in s.alive.items())
    assert all(torch.equal(t.Z[k], z) for k, z in s.Z.items())
    off = SSAuto(model, ["layer*.conv*"], target=0.5, by="macs", example_input=x, couple=False)
    assert not off.units and not off._consumers
