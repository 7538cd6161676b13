"""deploy(): the fastest measured form computes what the model computes, says how it was made,
and leaves the model alone."""

import copy

import pytest
import torch
from torch import nn

import admmprune as ap


def pruned_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip
    with torch.no_grad():  # BatchNorms that are not the identity: folding them must matter
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    ap.prune(model, {"3": ap.Columns(0.5)})
    return model.eval()


@pytest.mark.parametrize("compile", [False, True])
def test_deploy_computes_what_the_model_computes(compile):
    model = pruned_cnn().train()  # deploy serves the eval-mode model, and leaves this one be
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(8, 3, 16, 16)
    d = ap.deploy(model, x, compile=compile, rounds=2)
    assert model.training
    model.eval()
    r = d.report
    assert r.steps[:2] == ["fold_bn", "channels_last"] and r.steps[-1] == r.choice
    with torch.no_grad():
        for inp in (x, torch.randn(8, 3, 16, 16)):
            torch.testing.assert_close(d(inp), model(inp), rtol=1e-4, atol=1e-5)
    if compile:  # eager and the compiled form were timed side by side; one was chosen
        assert set(r.timings_ms) == {"eager", "compile:default"} or "compile:default" in r.skipped
        assert r.choice in ("eager", *r.timings_ms)
    else:
        assert r.choice == "eager" and not r.timings_ms
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so BN stays unfolded."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y


def test_an_untraceable_model_keeps_its_batchnorm_and_says_so():
    torch.manual_seed(1)
    model = Branchy().eval()
    x = torch.randn(2, 3, 8, 8)
    d = ap.deploy(model, x, compile=False, rounds=2)
    assert "fold_bn" not in d.report.steps and "cannot trace" in d.report.skipped["fold_bn"]
    with torch.no_grad():
        torch.testing.assert_close(d(x), model(x))


def test_deploy_refuses_what_it_cannot_serve():
    model = pruned_cnn()
    with pytest.raises(TypeError, match="an input batch"):
        ap.deploy(model, [torch.randn(1, 3, 16, 16)])

    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(TypeError, match="one tensor"):
        ap.deploy(Pair(), torch.randn(1, 3))
