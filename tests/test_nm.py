"""N:M sparsity: the exact projection, its ties, its shape rule, and NM everywhere a constraint
goes (ADMM, masks under retraining, recipes)."""

import itertools

import pytest
import torch
from torch import nn

import admmprune as ap
from admmprune._io import safe_load
from admmprune.run.cli import main
from admmprune.run.parse import parse_recipe
from test_pipeline import tiny_recipe, write


def brute_force(W: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The nearest N:M matrix, trying every choice of n positions in every group."""
    groups = W.reshape(-1, m)
    out = torch.zeros_like(groups)
    for g, row in enumerate(groups):
        best = max(
            itertools.combinations(range(m), n), key=lambda c: float(row[list(c)].pow(2).sum())
        )
        out[g, list(best)] = row[list(best)]
    return out.view_as(W)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 4), (1, 2)])
@pytest.mark.parametrize("shape", [(6, 8), (4, 2, 2, 2)])
def test_nm_projection_is_exact(n, m, shape):
    torch.manual_seed(n * 10 + m)
    W = torch.randn(*shape)
    Z, support = ap.NM(n, m).project(W)
    assert torch.equal(Z, brute_force(W, n, m))
    assert torch.equal(support, Z != 0)
    assert (support.reshape(-1, m).sum(1) == n).all()  # on the GEMM rows, m consecutive columns


def test_nm_ties_go_to_the_lower_index():
    W = torch.ones(3, 8)
    _, support = ap.NM(2, 4).project(W)
    assert support.reshape(-1, 4).tolist() == [[True, True, False, False]] * 6


def test_nm_needs_rows_that_split_into_groups():
    with pytest.raises(ValueError, match="not a multiple of m=4"):
        ap.select(nn.Sequential(nn.Linear(6, 3)), {"0": ap.NM(2, 4)})
    with pytest.raises(ValueError, match="1 <= n <= m"):
        ap.NM(5, 4)
    assert ap.NM(2, 4).with_keep(lambda k: k**0.5) == ap.NM(3, 4)  # 0.5^0.5 of 4 → 3


def nm_ok(W: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    return bool(((W != 0).reshape(-1, m).sum(1) <= n).all())


def test_admm_and_masked_retraining_keep_two_of_four():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x, y = torch.randn(256, 16), torch.randint(0, 4, (256,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    admm = ap.ADMM(model, {"0": ap.NM(2, 4), "2": ap.NM(2, 4)}, rho=1e-2, rho_growth=2.0)

    def steps(k, penalty=True):
        for _ in range(k):
            loss = nn.functional.cross_entropy(model(x), y) + (admm.penalty() if penalty else 0)
            opt.zero_grad()
            loss.backward()
            opt.step()

    for _ in range(4):
        steps(10)
        admm.update()
    masks = admm.prune()
    masks.attach(opt)
    steps(20, penalty=False)
    assert nm_ok(model[0].weight) and nm_ok(model[2].weight)
    assert int((model[0].weight != 0).sum()) == 16 * 32 // 2


def test_nm_in_a_recipe(tmp_path):
    r = tiny_recipe(tmp_path / "run", constraints={"fc1": {"nm": "2:4"}, "fc2": {"nm": "1:4"}})
    r["admm"] = {**r["admm"], "epochs": 2}
    r["pretrain"] = {**r["pretrain"], "epochs": 1}
    r["retrain"] = {**r["retrain"], "epochs": 1}
    assert main(["run", str(write(tmp_path / "r.yaml", r))]) == 0
    W = safe_load(tmp_path / "run" / "model.pt", "model")
    assert nm_ok(W["fc1.weight"], 2, 4) and nm_ok(W["fc2.weight"], 1, 4)
    spec, _ = parse_recipe({**r, "constraints": {"fc1": {"nm": "2:4"}}}).spec()
    assert spec == {"fc1": ap.NM(2, 4)}
