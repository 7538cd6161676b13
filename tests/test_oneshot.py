"""One-shot pruning from calibration data: statistics, solvers, sequential mode, bad input."""

from __future__ import annotations

import copy
import importlib
import itertools

import pytest
import torch
from torch import nn

import admmprune as ap
from admmprune.solvers.oneshot.layer_solvers import _least_squares, _sparsegpt_one

os_mod = importlib.import_module(
    "admmprune.solvers.oneshot.driver"
)  # the name admmprune.oneshot is the function


def _correlated(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) * 0.5


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 16))


def _damped_gram(X: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    H = (X.T @ X / X.shape[0]).double()
    return H + damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)


def _planted(seed: int, rank: int = 30, d: int = 32, r: int = 8):
    """X of rank 30 in 32 dims; W = W* (half of every row zero) + a null-space component of X,
    so XWᵀ = XW*ᵀ: the sparse W* reconstructs the layer exactly, magnitude misses it."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, rank, generator=g) @ torch.randn(rank, d, generator=g)
    keep = torch.rand(r, d, generator=g).argsort(1) < d // 2
    W_star = torch.randn(r, d, generator=g) * keep
    null = torch.linalg.svd(X).Vh[rank:]
    W = W_star + 0.3 * torch.randn(r, d - rank, generator=g) @ null
    return X, W_star, keep, W


def _linear(W: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data = W.clone()
    return lin


# --- the constraint and the baselines -----------------------------------------------------------


def test_unstructured_per_row_is_the_exact_projection_with_ties_to_lower_index():
    W = torch.tensor([[3.0, -1.0, 1.0, 0.5], [2.0, 2.0, 2.0, -2.0]])
    Z, S = ap.Unstructured(0.5, per_row=True).project(W)
    assert S.tolist() == [[True, True, False, False], [True, True, False, False]]
    # brute force over every support of 2 per row
    W = torch.randn(3, 6)
    Z, S = ap.Unstructured(0.5, per_row=True).project(W)
    for i in range(3):
        best = max(itertools.combinations(range(6), 3), key=lambda c: W[i, list(c)].pow(2).sum())
        assert sorted(S[i].nonzero().flatten().tolist()) == list(best)
    assert torch.equal(Z, W * S)
    assert repr(ap.Unstructured(0.5, per_row=True)) == "Unstructured(keep=0.5, per_row=True)"
    assert ap.Unstructured(0.5, per_row=True).with_keep(lambda k: k * 2).per_row
    with pytest.raises(ValueError, match="per_row"):
        ap.Unstructured(0.5, per_row="yes")


def _reference_sparsegpt(W, H, prune_in_block, B):
    """The paper's sweep written out with explicit inverses of the remaining columns' Hessian:
    column j's error (w_j − q_j)/[H_F⁻¹]₀₀ moves the columns F = {j, …, d−1} along
    [H_F⁻¹]₀; a block's mask is chosen from w²/[H_F⁻¹]₀₀ at the block's first column."""
    W = W.clone()
    d = W.shape[1]
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for j in range(d):
        Finv = torch.linalg.inv(H[j:, j:])
        if j % B == 0:
            cols = range(j, min(j + B, d))
            f00 = torch.stack([torch.linalg.inv(H[c:, c:])[0, 0] for c in cols])
            pruned[:, j : j + B] = prune_in_block(W[:, j : j + B] ** 2 / f00)
        q = W[:, j].masked_fill(pruned[:, j], 0)
        W[:, j:] -= ((W[:, j] - q) / Finv[0, 0])[:, None] * Finv[0][None, :]
        W[:, j] = q
    return W, ~pruned


def _lowest(score, p):
    idx = torch.sort(score, dim=1, stable=True).indices[:, :p]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)


def test_sparsegpt_matches_the_papers_algorithm():
    X = _correlated(200, 12, 1)
    H = _damped_gram(X)
    W = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # per row, blocks of 6: 2 of each row pruned per block (4 of 12 in all)
    ref = _reference_sparsegpt(W, H, lambda s: _lowest(s, 2), 6)
    ours = _sparsegpt_one(W, H, ap.Unstructured(8 / 12, per_row=True), None, 6)
    assert torch.equal(ref[1], ours[1]) and torch.allclose(ref[0], ours[0], atol=1e-10)

    # 2:4: in every group of 4, the 2 lowest scores at the group's first column
    def nm_ref(W, H):
        W = W.clone()
        pruned = torch.zeros_like(W, dtype=torch.bool)
        for j in range(12):
            Finv = torch.linalg.inv(H[j:, j:])
            if j % 4 == 0:
                f00 = torch.stack([torch.linalg.inv(H[c:, c:])[0, 0] for c in range(j, j + 4)])
                pruned[:, j : j + 4] = _lowest(W[:, j : j + 4] ** 2 / f00, 2)
            q = W[:, j].masked_fill(pruned[:, j], 0)
            W[:, j:] -= ((W[:, j] - q) / Finv[0, 0])[:, None] * Finv[0][None, :]
            W[:, j] = q
        return W, ~pruned

    ref = nm_ref(W, H)
    ours = _sparsegpt_one(W, H, ap.NM(2, 4), None, 128)
    assert torch.equal(ref[1], ours[1]) and torch.allclose(ref[0], ours[0], atol=1e-10)


def test_wanda_scores_match_the_formula():
    X = _correlated(300, 24, 3)
    model = _mlp()
    W = model[0].weight.detach().clone()
    masks = ap.oneshot(model, {"0": ap.Unstructured(0.25, per_row=True)}, [X], solver="wanda")
    score = W.abs() * X.norm(dim=0)  # |W_ij| · ||X_j||₂
    expected = torch.zeros_like(W, dtype=torch.bool)
    expected.scatter_(1, score.topk(6, dim=1).indices, True)
    assert torch.equal(masks["0.weight"], expected)
    assert torch.equal(model[0].weight, W * expected)  # no update


# --- the ADMM solver ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_admm_recovers_a_planted_sparse_solution(seed):
    X, W_star, keep, W = _planted(seed)
    lin = _linear(W)
    spec = {"": ap.Unstructured(0.5, per_row=True)}
    masks = ap.oneshot(lin, spec, [X], damp=1e-6, cg_tol=1e-7, cg_iters=500)
    assert torch.equal(masks["weight"], keep)
    assert torch.allclose(lin.weight, W_star, atol=1e-3)
    magnitude = ap.oneshot(
        _linear(W), {"": ap.Unstructured(0.5, per_row=True)}, [X], solver="magnitude"
    )
    assert not torch.equal(magnitude["weight"], keep)  # the problem is not trivial


@pytest.mark.parametrize("shared", [False, True])
def test_final_masked_solve_equals_lstsq_on_the_support(shared):
    g = torch.Generator().manual_seed(4)
    X = _correlated(120, 10, 5)
    H = (X.T @ X).unsqueeze(0)
    W0 = torch.randn(1, 6, 10, generator=g)
    if shared:
        S = (torch.arange(10) % 3 != 0).expand(1, 6, 10)
    else:
        S = torch.rand(1, 6, 10, generator=g) < 0.6
    W = _least_squares(W0, H, S, torch.zeros_like(W0), tol=1e-7, max_iter=200)
    assert torch.equal(W != 0, S & (W != 0)) and bool((W[~S] == 0).all())
    for i in range(6):
        s = S[0, i]
        sol = torch.linalg.lstsq(X[:, s].double(), (X @ W0[0, i]).double().unsqueeze(1)).solution
        assert torch.allclose(W[0, i, s].double(), sol.flatten(), atol=1e-4)


def test_quantized_on_the_support_lies_exactly_on_the_levels():
    X = _correlated(400, 24, 6)
    model, rounded = _mlp(), _mlp()
    spec = {"0": ap.Unstructured(0.5) & ap.Quantized(3)}
    masks = ap.oneshot(model, spec, [X])
    W = model[0].weight.detach()
    assert bool((W[~masks["0.weight"]] == 0).all())
    mags = W[W != 0].abs()
    q = float(mags.min())
    codes = W / q
    assert torch.allclose(codes, codes.round(), atol=1e-5)  # every weight is q·i
    assert int(codes.round().abs().max()) <= 3  # 3 bits: {0, ±q, ±2q, ±3q}
    # at most the error of pruning then rounding each kept weight to its nearest level
    base = ap.oneshot(rounded, spec, [X], solver="magnitude")
    assert masks.report.layers["0.weight"].error <= base.report.layers["0.weight"].error


# --- ordering against the baselines -------------------------------------------------------------


@pytest.mark.parametrize(
    "constraint", [ap.Unstructured(0.3), ap.Unstructured(0.4, per_row=True), ap.NM(2, 4)]
)
def test_layer_error_admm_le_sparsegpt_le_magnitude(constraint):
    X = _correlated(512, 24, 7)
    errors = {}
    for solver in ("magnitude", "sparsegpt", "admm"):
        masks = ap.oneshot(_mlp(1), {"*": constraint}, list(X.split(128)), solver=solver)
        errors[solver] = {n: r.error for n, r in masks.report.layers.items()}
        assert masks.report.samples == 512 and masks.report.batches == 4
    for layer in errors["admm"]:
        assert errors["admm"][layer] <= errors["sparsegpt"][layer] <= errors["magnitude"][layer]


def test_columns_reconstructed_exactly_on_the_kept_inputs():
    X = _correlated(300, 24, 8)
    errs = {}
    for solver in ("magnitude", "wanda", "admm"):
        model = _mlp()
        masks = ap.oneshot(model, {"0": ap.Columns(0.5)}, [X], solver=solver)
        S = masks["0.weight"]
        assert bool((S[:1] == S).all()) and int(S[0].sum()) == 12  # whole input columns
        errs[solver] = masks.report.layers["0.weight"].error
    assert errs["admm"] < errs["wanda"] and errs["admm"] < errs["magnitude"]
    with pytest.raises(ValueError, match=r"sparsegpt.*Columns"):
        ap.oneshot(_mlp(), {"0": ap.Columns(0.5)}, [X], solver="sparsegpt")


# --- statistics: the GEMM view of every layer kind ----------------------------------------------


class Conv1D(nn.Module):
    """transformers' GPT-2 Conv1D: y = x @ W + b, W stored [in, out]."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


@pytest.mark.parametrize(
    "layer,shape",
    [
        (lambda: nn.Conv2d(8, 6, 3, stride=2, padding=1, groups=2), (3, 8, 9, 9)),
        (lambda: nn.Conv2d(4, 4, 3, padding=2, dilation=2, padding_mode="reflect"), (2, 4, 8, 8)),
        (lambda: nn.Conv2d(4, 4, 3, padding="same"), (2, 4, 7, 7)),
        (lambda: nn.Conv1d(4, 8, 4, dilation=2, padding=1), (3, 4, 20)),
        (lambda: nn.Linear(8, 12), (2, 5, 8)),
        (lambda: Conv1D(12, 8), (2, 5, 8)),
    ],
)
def test_reported_error_is_the_true_output_error(layer, shape):
    torch.manual_seed(0)
    model = nn.Sequential(layer())
    x = torch.randn(*shape)
    dense = model(x).detach()
    masks = ap.oneshot(model, {"0": ap.NM(2, 4)}, [x], solver="sparsegpt", damp=1e-4)
    assert masks.report.layers["0.weight"].error == pytest.approx(
        float((model(x).detach() - dense).pow(2).sum()), rel=1e-3
    )
    W = model[0].weight.detach()
    gemm = W.t() if isinstance(model[0], Conv1D) else W.reshape(W.shape[0], -1)
    assert int(gemm.reshape(-1, 4).ne(0).sum(1).max()) <= 2  # 2:4 along the GEMM inputs


def test_layers_reading_one_input_share_one_gram():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.q(x) * self.k(x) + self.v(x)

    model = Attn()
    masks = ap.oneshot(model, {"*": ap.Unstructured(0.5)}, [torch.randn(16, 8)])
    assert masks.report.gram_bytes_peak == 8 * 8 * 4  # one Gram for q, k and v


# --- sequential mode ----------------------------------------------------------------------------


@pytest.mark.parametrize("sequential", [True, False])
def test_sequential_feeds_later_layers_the_pruned_outputs(sequential):
    X = _correlated(256, 24, 9)
    spec = {"0": ap.Unstructured(0.3), "2": ap.Unstructured(0.3)}
    model = _mlp(2)
    first = _mlp(2)
    ap.oneshot(model, spec, [X], sequential=sequential)
    ap.oneshot(first, {"0": ap.Unstructured(0.3)}, [X])
    assert torch.equal(model[0].weight, first[0].weight)
    # the second layer alone, calibrated on the pruned or on the dense first layer's outputs
    for pruned_inputs in (True, False):
        source = first if pruned_inputs else _mlp(2)
        h = source[1](source[0](X)).detach()
        alone = nn.Sequential(_mlp(2)[2])
        ap.oneshot(alone, {"0": ap.Unstructured(0.3)}, [h])
        same = torch.allclose(alone[0].weight, model[2].weight, atol=1e-6)
        assert same == (pruned_inputs == sequential)


def test_dense_target_fits_the_dense_output_from_the_pruned_inputs():
    """min ||X̃Ŵᵀ − XWᵀ||² (+ the damping's pull to W): its least squares on the final support,
    row by row; the first layer (X̃ = X) solves the plain problem."""
    X = _correlated(256, 24, 11)
    spec = {"0": ap.Unstructured(0.3), "2": ap.Unstructured(0.3)}
    plain, model, dense = _mlp(3), _mlp(3), _mlp(3)
    ap.oneshot(plain, spec, [X])
    masks = ap.oneshot(model, spec, [X], dense_target=True)
    assert masks.report.gram_bytes_peak == 2 * 48 * 48 * 4  # H and the cross Gram C
    assert torch.allclose(model[0].weight, plain[0].weight, atol=1e-5)
    with torch.no_grad():
        Xt = model[1](model[0](X)).double()  # the pruned first layer's outputs
        Xd = dense[1](dense[0](X)).double()
        W = dense[2].weight.double()
        n = X.shape[0]
        H = _damped_gram(Xt.float())
        lam = H - Xt.T @ Xt / n  # the damping term, on C as on H
        B = W @ (Xd.T @ Xt / n + lam)
        for r, row in enumerate(masks["2.weight"]):
            s = row.nonzero().flatten()
            best = torch.linalg.solve(H[s][:, s], B[r, s])
            assert torch.allclose(model[2].weight[r, s].double(), best, atol=1e-4)
        # and it reproduces the dense output better than the plain problem does
        err = lambda m: float((m(X) - dense(X)).pow(2).sum())  # noqa: E731
        assert err(model) < err(plain)
    with pytest.raises(ValueError, match="dense_target=True needs solver='admm'"):
        ap.oneshot(_mlp(3), spec, [X], solver="sparsegpt", dense_target=True)


def test_recipe_oneshot_settings_are_checked():
    from admmprune.run.config import OneShotCfg

    assert OneShotCfg(sequential="layers", dense_target=True).sequential == "layers"
    with pytest.raises(ValueError, match="dense_target: true needs solver: admm"):
        OneShotCfg(solver="wanda", dense_target=True)
    with pytest.raises(ValueError, match="sequential"):
        OneShotCfg(sequential="blocks")


def test_oneshot_is_deterministic():
    X = _correlated(256, 24, 10)
    a, b = _mlp(), _mlp()
    ma = ap.oneshot(a, {"*": ap.Unstructured(0.3)}, [X])
    mb = ap.oneshot(b, {"*": ap.Unstructured(0.3)}, [X])
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# --- calibration formats and what comes after ---------------------------------------------------


def test_dict_and_tuple_batches_and_samples_counted():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x, scale=1.0):
            return self.fc(x * scale)

    x = torch.randn(10, 8)
    m = ap.oneshot(TwoInputs(), {"fc": ap.Unstructured(0.5)}, [{"x": x, "scale": 2.0}] * 3)
    assert m.report.samples == 30 and m.report.layers["fc.weight"].rows == 30
    m = ap.oneshot(TwoInputs(), {"fc": ap.Unstructured(0.5)}, iter([(x, 2.0), (x[:4], 1.0)]))
    assert m.report.samples == 14 and m.report.batches == 2
    assert "14 calibration samples" in m.report.summary()


def test_masked_retraining_keeps_nm_and_admm_starts_from_the_oneshot_solution():
    X = _correlated(256, 24, 11)
    model = _mlp()
    masks = ap.oneshot(model, {"*": ap.NM(2, 4)}, [X])
    W1 = model[0].weight.detach().clone()
    admm = ap.ADMM(model, {"*": ap.NM(2, 4)}, init=masks)
    assert torch.equal(admm._state["0.weight"].Z, W1)  # Z⁰ = W⁰ ⊙ M, the one-shot solution
    admm.close()
    Z0 = {k: torch.full_like(p, 0.5) for k, p in model.named_parameters() if k.endswith("weight")}
    assert torch.equal(
        ap.ADMM(model, {"*": ap.NM(2, 4)}, init=Z0)._state["2.weight"].Z, Z0["2.weight"]
    )
    with pytest.raises(ValueError, match=r"no entry for '2\.weight'"):
        ap.ADMM(model, {"*": ap.NM(2, 4)}, init={"0.weight": masks["0.weight"]})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    masks.attach(opt)
    for _ in range(5):
        opt.zero_grad()
        model(X).pow(2).mean().backward()
        opt.step()
    for layer in (model[0], model[2]):
        assert int(layer.weight.detach().reshape(-1, 4).ne(0).sum(1).max()) <= 2
    assert not torch.equal(model[0].weight, W1)  # it did train


# --- bad input ------------------------------------------------------------------------------------


def test_bad_input_is_a_clear_error_and_leaves_the_model_unchanged(monkeypatch):
    X = _correlated(64, 24, 12)
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    spec = {"*": ap.Unstructured(0.5)}
    cases = [
        (dict(calibration=[]), "calibration is empty"),
        (dict(calibration=[torch.randn(4, 7)]), "calibration batch 1 .*4, 7.*failed"),
        (dict(calibration=[X, X * float("nan")]), "batch 2: the input of '0.weight'.*NaN"),
        (dict(spec={"nope*": ap.Unstructured(0.5)}), "matches no prunable layer"),
        (dict(spec={"0": ap.Filters(0.5)}), "'0.weight': Filters removes output rows"),
        (dict(spec={"0": ap.NM(2, 5)}), "multiple of m=5"),
        (dict(solver="obs"), "solver='obs'"),
        (dict(iters=3, solver="wanda"), "no option 'iters'"),
        (dict(damp=0), "damp=0"),
        (dict(calibration=3), "iterable of model inputs"),
    ]
    for kwargs, message in cases:
        args = {"spec": spec, "calibration": [X], **kwargs}
        with pytest.raises(ValueError, match=message):
            ap.oneshot(model, args.pop("spec"), args.pop("calibration"), **args)
    emb = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(ValueError, match=r"'0\.weight' is a Embedding"):
        ap.oneshot(emb, {"0": ap.Unstructured(0.5)}, [torch.arange(5)])
    # a failure after the first layer was pruned: every weight is put back
    real = os_mod._solve_layer
    calls = []

    def failing(view, *args):
        calls.append(view.name)
        if len(calls) == 2:
            raise ValueError("boom in the second layer")
        return real(view, *args)

    monkeypatch.setattr(os_mod, "_solve_layer", failing)
    with pytest.raises(ValueError, match="boom"):
        ap.oneshot(model, spec, [X])
    assert calls == ["0.weight", "2.weight"]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert model.training  # its mode restored


def test_a_layer_the_forward_never_calls_is_named():
    model = nn.ModuleDict({"used": nn.Linear(4, 4), "unused": nn.Linear(4, 4)})
    model.forward = lambda x: model["used"](x)
    with pytest.raises(ValueError, match=r"'unused\.weight' is never called"):
        ap.oneshot(model, {"*": ap.Unstructured(0.5)}, [torch.randn(3, 4)])


@pytest.mark.parametrize("solver", ["sparsegpt", "admm"])
def test_dead_inputs_at_a_small_scale_never_win_the_support(solver):
    # live activations of 1e-3 and half the inputs always zero (e.g. dead ReLUs upstream): a
    # dead input must not outrank a live one, whatever the Gram's scale
    X = _correlated(256, 24, 13) * 1e-3
    X[:, ::2] = 0
    model = _mlp()
    masks = ap.oneshot(model, {"0": ap.Unstructured(0.25)}, [X], solver=solver)
    assert not bool(masks["0.weight"][:, ::2].any())
    assert masks.report.layers["0.weight"].rel_error < 0.5


# --- recipes ----------------------------------------------------------------------------------


def _recipe(tmp_path, **changes):
    from test_pipeline import tiny_recipe

    r = tiny_recipe(tmp_path / "run", **changes)
    r["pretrain"]["epochs"] = 2
    return r


def _rows(path):
    import json

    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_recipe_method_oneshot_prunes_from_seeded_calibration_then_retrains(tmp_path):
    from admmprune.run.parse import parse_recipe
    from admmprune.run.pipeline import prepare, run

    recipe = _recipe(
        tmp_path,
        method="oneshot",
        oneshot={"solver": "admm", "samples": 200, "batch_size": 64, "options": {"iters": 20}},
        admm={"epochs": 0},
        constraints={"fc1": {"unstructured": 0.1, "per_row": True}, "fc2": {"nm": "2:4"}},
    )
    summary = run(prepare(parse_recipe(recipe)), log=lambda *_: None)
    rows = _rows(tmp_path / "run")
    one = [r for r in rows if r.get("event") == "oneshot"]
    assert (
        len(one) == 1
        and one[0]["samples"] == 200
        and set(one[0]["layers"])
        == {
            "fc1.weight",
            "fc2.weight",
        }
    )
    masks = torch.load(tmp_path / "run" / "masks.pt", weights_only=True)["masks"]
    per_row = masks["fc1.weight"].sum(1)
    assert bool((per_row == per_row[0]).all())  # the same count in every row
    assert int(masks["fc2.weight"].reshape(-1, 4).sum(1).max()) == 2
    assert summary["accuracy"]["final"] >= summary["accuracy"]["pruned_before_retrain"] - 0.05
    # the same seed draws the same calibration images: the same masks
    recipe["output_dir"] = str(tmp_path / "again")
    run(prepare(parse_recipe(recipe)), log=lambda *_: None)
    again = torch.load(tmp_path / "again" / "masks.pt", weights_only=True)["masks"]
    assert all(torch.equal(masks[k], again[k]) for k in masks)


def test_recipe_admm_init_oneshot_starts_admm_from_the_oneshot_solution(tmp_path):
    from admmprune.run.parse import parse_recipe
    from admmprune.run.pipeline import prepare, run

    recipe = _recipe(tmp_path, oneshot={"samples": 128})
    recipe["admm"].update(epochs=2, update_every=1, init="oneshot")
    recipe["constraints"] = {"fc1": {"unstructured": 0.05}}
    run(prepare(parse_recipe(recipe)), log=lambda *_: None)
    rows = [r for r in _rows(tmp_path / "run") if r.get("stage") == "admm"]
    assert rows[0]["event"] == "oneshot"  # before the first ADMM epoch
    updates = [r for r in rows if r.get("event") == "update"]
    # Z⁰ is the one-shot solution, already in S: W sits on Z at the start, so the first
    # update's primal residual is what one epoch of training moved, far below ||W⁰ − Π_S(W⁰)||
    assert updates and updates[0]["layers"]["fc1.weight"]["kept"] == pytest.approx(0.05, abs=1e-3)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"method": "oneshot"}, "admm.epochs: 0"),
        ({"admm": {"epochs": 2, "init": "oneshot"}, "method": "magnitude"}, "admm.init: oneshot"),
        ({"constraints": {"fc1": {"per_row": True}}}, "per_row: true applies to unstructured"),
        ({"constraints": {"fc1": {"unstructured": True}}}, "is a boolean"),
        ({"oneshot": {"solver": "obs"}}, "'sparsegpt', 'wanda' or 'magnitude'"),
    ],
)
def test_recipe_oneshot_settings_are_validated(tmp_path, changes, message):
    from admmprune.run.parse import parse_recipe

    recipe = _recipe(tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        parse_recipe(recipe).spec()


# --- N:M storage ------------------------------------------------------------------------------


def test_nm_storage_counts_log2_m_index_bits_and_the_packed_file_round_trips(tmp_path):
    from admmprune.deployment.storage import weight_storage

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16))
    ap.prune(model, {"0": ap.NM(2, 4), "1": ap.NM(1, 8)})
    s = weight_storage(model[0].weight)
    assert s["format"] == "nm" and (s["nm"]["n"], s["nm"]["m"]) == (2, 4)
    assert s["nm"]["index_bits"] == 2 * (32 * 64 // 2)  # 2 bits per kept weight
    assert s["nm"]["bits"] < s["relative"]["bits"]
    assert weight_storage(model[1].weight)["nm"]["index_bits"] == 3 * (16 * 32 // 8)
    q = nn.Sequential(nn.Linear(64, 32))
    ap.oneshot(q, {"0": ap.NM(2, 4) & ap.Quantized(4)}, [torch.randn(64, 64)])
    for m in (model, q):
        path = tmp_path / "m.admmprune"
        ap.export_compressed(m, path)
        back = ap.load_compressed(path, copy.deepcopy(m).apply(_zero))
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                     back.state_dict().values()))  # fmt: skip
    nm = weight_storage(q[0].weight)["nm"]  # 4-bit codes: values 3 bits + 2-bit positions
    assert nm is not None and nm["value_bits"] == 4 * (32 * 64 // 2)


def _zero(module):
    for p in module.parameters(recurse=False):
        p.data.zero_()


def test_a_layer_kept_whole_is_left_exactly_as_it_was():
    X = _correlated(128, 24, 14)
    model = _mlp()
    W = model[0].weight.detach().clone()
    masks = ap.oneshot(model, {"0": ap.Unstructured(1.0), "2": ap.Unstructured(0.5)}, [X])
    assert torch.equal(model[0].weight, W) and masks.report.layers["0.weight"].error == 0.0
