"""Gradient accumulation (``grad_accum`` per stage): a batch run as micro-batches takes the
whole batch's step, with ADMM's penalty (or its gradient) counted once per step."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import admmprune as ap
from admmprune.run.config import RecipeError
from admmprune.run.parse import parse_recipe
from admmprune.run.train import train_epoch
from test_pipeline import tiny_recipe


def _epoch(model, admm, grad_accum: int, objective: str = "classify"):
    torch.manual_seed(0)
    if objective == "classify":
        data = TensorDataset(torch.randn(48, 6), torch.randint(0, 3, (48,)))
    else:  # token windows: the target is the window itself
        windows = torch.randint(0, 5, (48, 6))
        data = TensorDataset(windows, windows)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return train_epoch(model, data, opt, order=torch.randperm(48), batch_size=12,
                       device=torch.device("cpu"), admm=admm, grad_accum=grad_accum,
                       objective=objective)  # fmt: skip


class _TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.out = nn.Embedding(5, 8), nn.Linear(8, 5)

    def forward(self, x):
        return self.out(torch.tanh(self.embed(x)))


@pytest.mark.parametrize("mode", ["penalty", "grad"])
@pytest.mark.parametrize("objective", ["classify", "next_token"])
def test_micro_batches_take_the_whole_batchs_step(mode, objective):
    torch.manual_seed(1)
    if objective == "classify":
        base = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        spec = {"0": ap.Unstructured(0.3)}
    else:
        base = _TokenModel()
        spec = {"out": ap.Unstructured(0.3)}
    runs = {}
    for k in (1, 3, 4):
        model = copy.deepcopy(base)
        admm = ap.ADMM(model, spec, rho=0.5, mode=mode)
        with torch.no_grad():  # a penalty that matters: Z far from W
            next(iter(admm._state.values())).Z.mul_(0)
        res = _epoch(model, admm, k, objective)
        admm.close()
        runs[k] = (model.state_dict(), res)
    for k in (3, 4):
        for name, w in runs[1][0].items():
            torch.testing.assert_close(runs[k][0][name], w, rtol=1e-5, atol=1e-6)
        assert runs[k][1].loss == pytest.approx(runs[1][1].loss, rel=1e-5)
        assert runs[k][1].penalty == pytest.approx(runs[1][1].penalty, rel=1e-5)
    # the penalty (or its gradient) moved the weights: counted once, not k times
    plain = copy.deepcopy(base)
    _epoch(plain, None, 1, objective)
    first = next(iter(spec)) + ".weight"
    assert not torch.allclose(plain.state_dict()[first], runs[1][0][first], atol=1e-3)


def test_grad_accum_in_a_recipe_is_checked(tmp_path):
    recipe = tiny_recipe(tmp_path / "r")
    recipe["admm"]["grad_accum"] = 2
    assert parse_recipe(recipe).admm.grad_accum == 2
    recipe["admm"]["grad_accum"] = 0
    with pytest.raises(RecipeError, match="grad_accum"):
        parse_recipe(recipe)
