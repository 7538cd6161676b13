"""ADMM in a diagonal metric (objective-aware projection): Π_S^m(V) = argmin_{Z∈S} Σ m(Z − V)²
equals brute force over every allowed support, for every sparsity set; the metric's sources
(Adam's second moment, squared gradients, user tensors) and their errors."""

import itertools
import zlib

import pytest
import torch
from torch import nn

import admmprune as ap
from admmprune.sets.constraints import keep_count
from admmprune.sets.weighted import project_weighted
from test_constraints import CASES


def weighted_cost(V, m, Z):
    return float((m * (Z - V) ** 2).sum())


def best_over(V, m, choices):
    """min over the allowed supports (each a bool mask) of the weighted cost of V on it."""
    return min(weighted_cost(V, m, V * s) for s in choices)


def k_of(groups, k):
    for chosen in itertools.combinations(range(len(groups)), k):
        mask = torch.zeros_like(groups[0])
        for g in chosen:
            mask |= groups[g]
        yield mask


def project(constraint, V, m, conv_groups=1):
    return project_weighted(lambda d: {"w": constraint.project(d["w"], conv_groups)}, {"w": V},
                            {"w": m})["w"]  # fmt: skip


def metric_for(V, gen):
    # heavy-tailed, so it outweighs |V| even summed over a group; some exact zeros
    m = torch.exp(3 * torch.randn(V.shape, generator=gen))
    return m * (torch.rand(V.shape, generator=gen) > 0.15)


@pytest.mark.parametrize("cls,groups_fn,shape,conv_groups", CASES)
@pytest.mark.parametrize("keep", [0.25, 0.5, 0.75])
def test_weighted_projection_equals_brute_force(cls, groups_fn, shape, conv_groups, keep):
    gen = torch.Generator().manual_seed(zlib.crc32(f"m{cls.__name__}{shape}{keep}".encode()))
    differs = 0
    for _ in range(6):
        V = torch.randn(shape, generator=gen)
        m = metric_for(V, gen)
        groups = groups_fn(V)
        k = keep_count(keep, len(groups))
        Z, support = project(cls(keep), V, m, conv_groups)
        assert torch.equal(Z, V * support)
        assert sum(bool(support[g].all()) for g in groups) == k  # in S: k structures kept
        assert all(bool(support[g].all()) or not bool(support[g].any()) for g in groups)
        best = best_over(V, m, k_of(groups, k))
        assert weighted_cost(V, m, Z) == pytest.approx(best, rel=1e-6, abs=1e-7)
        differs += not torch.equal(support, cls(keep).project(V, conv_groups).support)
    if keep < 1 and len(groups_fn(torch.zeros(shape))) > 2:
        assert differs, "the metric never changed the support: the test shows nothing"


def best_of_parts(V, m, parts):
    """Brute force over independent parts (rows, N:M groups), each a list of the supports
    allowed inside it: the cost adds up over disjoint parts, so the best is each part's best."""
    total = 0.0
    for choices in parts:
        inside = torch.stack(choices).any(dim=0)  # the part's positions
        total += min(float((m * V**2 * (inside & ~s)).sum()) for s in choices)
    return total


def test_per_row_and_nm_equal_brute_force():
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        V = torch.randn(3, 8, generator=gen)
        m = metric_for(V, gen)
        # per row: 3 of 8 in each row, rows independent
        rows = []
        for r in range(3):
            cells = [torch.zeros(3, 8, dtype=torch.bool) for _ in range(8)]
            for c in range(8):
                cells[c][r, c] = True
            rows.append(list(k_of(cells, keep_count(0.375, 8))))
        Z, _ = project(ap.Unstructured(0.375, per_row=True), V, m)
        assert weighted_cost(V, m, Z) == pytest.approx(best_of_parts(V, m, rows))
        # 2:4: 2 of every 4 consecutive columns, groups independent
        quads = []
        for r in range(3):
            for q in range(2):
                cells = [torch.zeros(3, 8, dtype=torch.bool) for _ in range(4)]
                for c in range(4):
                    cells[c][r, 4 * q + c] = True
                quads.append(list(k_of(cells, 2)))
        Z, support = project(ap.NM(2, 4), V, m)
        assert int(support.view(3, 2, 4).sum(-1).max()) <= 2
        assert weighted_cost(V, m, Z) == pytest.approx(best_of_parts(V, m, quads))


def test_channel_group_in_admm_prune_equals_brute_force():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    g = ap.ChannelGroup("g", 0.4, (("0.weight", tuple(range(5))), ("0.bias", tuple(range(5)))))
    V = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("0.")}
    m = {n: torch.ones_like(v) for n, v in V.items()}
    weakest = int(V["0.weight"].norm(dim=1).argmin())
    m["0.weight"][weakest] = 1e3  # the metric says the weakest channel matters most
    admm = ap.ADMM(model, {}, groups=[g], metric=m)
    masks = admm.prune()
    kept = [j for j in range(5) if bool(masks["0.weight"][j].any())]
    assert len(kept) == 2 and all(bool(masks["0.bias"][j]) for j in kept)
    cost = {
        c: sum(
            float(
                (m[n][list(set(range(5)) - set(c))] * V[n][list(set(range(5)) - set(c))] ** 2).sum()
            )
            for n in V
        )
        for c in itertools.combinations(range(5), 2)
    }
    assert tuple(kept) == min(cost, key=cost.get)
    plain = ap.ChannelGroup.project(g, V)[1]["0.weight"].any(dim=1).nonzero().flatten().tolist()
    assert weakest in kept and weakest not in plain  # the metric, not the norms, chose


def tiny():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def steps(model, opt, n=3, admm=None):
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(n):
        loss = nn.functional.cross_entropy(model(x), y)
        if admm is not None:
            loss = loss + admm.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_adam_metric_is_the_bias_corrected_second_moment():
    model = tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    admm = ap.ADMM(model, {"0": ap.Unstructured(0.25)}, metric=opt, rho=1e-2)
    W0 = model[0].weight.detach()
    assert torch.equal(admm._state["0.weight"].Z != 0, ap.Unstructured(0.25).project(W0)[1])
    steps(model, opt, 4, admm)
    st = opt.state[model[0].weight]
    v = st["exp_avg_sq"] / (1 - 0.95 ** float(st["step"]))
    V = model[0].weight.detach() + admm._state["0.weight"].U
    expect = ap.Unstructured(0.25).project(V * v.sqrt())[1]
    admm.update()
    assert torch.equal(admm._state["0.weight"].Z != 0, expect)
    assert not torch.equal(expect, ap.Unstructured(0.25).project(V)[1])
    masks = admm.prune()  # the final hard prune in the metric too
    v = st["exp_avg_sq"] / (1 - 0.95 ** float(st["step"]))
    assert masks.kept()["0.weight"] == pytest.approx(0.25)


def test_sgd_metric_names_the_fix():
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"exp_avg_sq.*fisher"):
        ap.ADMM(model, {"0": ap.Unstructured(0.5)}, metric=opt)
    other = torch.optim.Adam(model[2].parameters())
    with pytest.raises(ValueError, match="not trained by this optimizer"):
        ap.ADMM(model, {"0": ap.Unstructured(0.5)}, metric=other)


def test_fisher_metric_means_squared_gradients_and_resumes():
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    admm = ap.ADMM(model, {"0": ap.Unstructured(0.25)}, metric="fisher", mode="grad")
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    grads = []
    for i in range(3):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[i:]), y[i:])
        grads.append(torch.autograd.grad(loss, model[0].weight, retain_graph=True)[0])
        loss.backward()  # mode="grad": the hooks see the loss's gradient alone
        opt.step()
    F = torch.stack(grads).pow(2).mean(0)
    V = model[0].weight.detach() + admm._state["0.weight"].U
    expect = ap.Unstructured(0.25).project(V * F.sqrt())[1]
    saved = admm.state_dict()
    again = ap.ADMM(model, {"0": ap.Unstructured(0.25)}, metric="fisher", mode="grad")
    again.load_state_dict(saved)
    admm.update()
    again.update()
    assert torch.equal(admm._state["0.weight"].Z != 0, expect)
    assert torch.equal(again._state["0.weight"].Z, admm._state["0.weight"].Z)
    assert admm._metric.counts == {"0.weight": 0}  # a fresh estimate per update
    assert admm._metric.values() is None  # no gradient since: Euclidean
    again.close()
    admm.close()
    assert not admm._metric._hooks


def test_metric_refuses_what_it_cannot_project():
    model = tiny()
    with pytest.raises(ValueError, match=r"'0.weight'.*sparsity set"):
        ap.ADMM(model, {"0": ap.Quantized(4)}, metric="fisher")
    with pytest.raises(ValueError, match=r"metric='bogus'"):
        ap.ADMM(model, {"0": ap.Unstructured(0.5)}, metric="bogus")
    m = {"0.weight": torch.ones(8, 6)}
    with pytest.raises(ValueError, match=r"no tensor for '2\.weight'"):
        ap.ADMM(model, {"0": ap.Unstructured(0.5), "2": ap.Unstructured(0.5)}, metric=m)
    with pytest.raises(ValueError, match="shape"):
        ap.ADMM(model, {"0": ap.Unstructured(0.5)}, metric={"0.weight": torch.ones(6, 8)})
    with pytest.raises(ValueError, match="non-negative"):
        ap.ADMM(model, {"0": ap.Unstructured(0.5)}, metric={"0.weight": -torch.ones(8, 6)})


@pytest.mark.parametrize("metric", ["adam", "fisher"])
def test_recipe_admm_metric_runs_to_the_exact_target(tmp_path, metric):
    from admmprune.run.parse import parse_recipe
    from admmprune.run.pipeline import prepare, run
    from test_pipeline import tiny_recipe

    recipe = tiny_recipe(tmp_path / metric, pretrain={"epochs": 1}, retrain={"epochs": 1})
    recipe["admm"] |= {"epochs": 2, "update_every": 1, "metric": metric,
                       "optimizer": {"name": "adam", "lr": 0.001}}  # fmt: skip
    summary = run(prepare(parse_recipe(recipe)), log=lambda *a: None)
    fc1 = next(row for row in summary["layers"] if row["name"] == "fc1.weight")
    assert fc1["kept"] == keep_count(0.05, fc1["total"])  # exact, after the metric's hard prune
    assert (tmp_path / metric / "masks.pt").is_file()
