"""Compaction: a physically smaller model computing exactly what the masked model computes."""

import pytest
import torch
import torch_pruning as tp
import torchvision
from torch import nn

from admmprune.models import build_model
from admmprune.structure.compact import compact, zero_dead_inputs
from admmprune.structure.graph import output_layers


def zero_random_group_channels(model, x, frac=0.5, seed=0):
    """Zero every producer slice (conv/linear rows, biases, BN affine) of a random share of each
    dependency group's channels: what a coupled structured projection leaves behind."""
    g = torch.Generator().manual_seed(seed)
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    roots = [nn.Conv2d, nn.Linear]
    with torch.no_grad():
        for group in DG.get_all_groups(
            ignored_layers=output_layers(model, x), root_module_types=roots
        ):
            n = len(group.items[0].idxs)
            kill = torch.randperm(n, generator=g)[: int(n * frac)].tolist()
            for item in group.items:
                if item.dep.handler.__name__ != "prune_out_channels" or len(item.idxs) != n:
                    continue
                m = item.dep.target.module
                for j in kill:
                    i = int(item.idxs[j])
                    if getattr(m, "weight", None) is not None:
                        m.weight[i] = 0
                    if getattr(m, "bias", None) is not None:
                        m.bias[i] = 0


def randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


MODELS = {
    "lenet5": (
        lambda: build_model("lenet5", num_classes=10, in_channels=1, input_size=28),
        (1, 28),
    ),
    "resnet20": (
        lambda: build_model("resnet20", num_classes=10, in_channels=3, input_size=32),
        (3, 32),
    ),
    "resnet56": (
        lambda: build_model("resnet56", num_classes=10, in_channels=3, input_size=32),
        (3, 32),
    ),
    "vgg16": (lambda: build_model("vgg16", num_classes=10, in_channels=3, input_size=32), (3, 32)),
    "tv_resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32)),
    "tv_mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (3, 32)),
    "tv_densenet121": (lambda: torchvision.models.densenet121(num_classes=10), (3, 32)),
}


def half_zeroed(name):
    """A model of MODELS with half of every channel group zeroed, an input, and its compaction."""
    make, (c, s) = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    randomize_bn(model)
    x = torch.randn(2, c, s, s)
    zero_random_group_channels(model, x)
    return model, x, *compact(model, x)


@pytest.mark.parametrize("name", list(MODELS))
def test_compacted_equals_masked(name):
    model, x, small, report = half_zeroed(name)
    c, s = x.shape[1], x.shape[2]
    with torch.no_grad():
        diff = (model(x) - small(x)).abs().max().item()
    assert diff <= 1e-5
    assert report.params_after < 0.4 * report.params_before  # half the channels: ~1/4 params
    assert report.total_not_removable == 0
    assert sum(p.numel() for p in model.parameters()) == report.params_before  # original untouched
    assert small(torch.randn(5, c, s, s)).shape == (5, 10)  # any batch size


@pytest.mark.parametrize("name", ["lenet5", "resnet20", "vgg16", "tv_mobilenet_v2"])
def test_zero_dead_inputs_leaves_exactly_the_compact_models_weights(name):
    """After it, each layer's non-zero rows × columns are the compact layer's shape (what the
    storage accounting of a structured model must count), and the outputs do not change."""
    model, x, small, _ = half_zeroed(name)
    with torch.no_grad():
        before = model(x)
    zeroed = zero_dead_inputs(model, x)
    assert zeroed > 0
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-6, rtol=0)
    kept = dict(small.named_modules())
    for n, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            W = m.weight.reshape(m.weight.shape[0], -1)
            shape = (int(W.ne(0).any(1).sum()), int(W.ne(0).any(0).sum()))
            w = kept[n].weight
            assert shape == (w.shape[0], w[0].numel()), n


def test_partially_zeroed_channels_are_kept_and_counted():
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=3, input_size=32).eval()
    randomize_bn(model)
    with torch.no_grad():  # zero 4 filters of a conv inside a residual stage, not the coupled BN
        model.layer1[0].conv2.weight[:4] = 0
        model.layer2[0].conv1.weight[:3] = 0  # a block-internal conv: zero conv + its BN
        model.layer2[0].bn1.weight[:3] = 0
        model.layer2[0].bn1.bias[:3] = 0
    x = torch.randn(2, 3, 32, 32)
    small, report = compact(model, x)
    assert report.removed == {"layer2.0.conv1": 3}
    assert sum(report.not_removable.values()) == 4  # BN β is not zero: channel is not zero
    assert small.layer2[0].conv1.out_channels == 29
    with torch.no_grad():
        assert (model(x) - small(x)).abs().max() <= 1e-5


def test_output_layer_is_never_shrunk():
    model = build_model("lenet300", num_classes=10, in_channels=1, input_size=8).eval()
    with torch.no_grad():
        model.fc3.weight[:5] = 0
        model.fc3.bias[:5] = 0
        model.fc2.weight[:50] = 0
        model.fc2.bias[:50] = 0
    small, _ = compact(model, torch.randn(1, 1, 8, 8))
    assert small.fc3.out_features == 10 and small.fc2.out_features == 50
    assert small.fc3.in_features == 50


# --- the safety net -----------------------------------------------------------------------------


def _grouped_net():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 8, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5),
    )  # fmt: skip
    randomize_bn(m)
    return m.eval()


def test_a_wrong_compaction_is_caught_and_names_the_layer(monkeypatch):
    import importlib

    c = importlib.import_module(
        "admmprune.structure.compact"
    )  # (admmprune.compact is the function)
    model = _grouped_net()
    x = torch.randn(2, 3, 4, 4)
    real = c._zero_out

    def lying(module, idx):  # claims live channels of the 1x1 conv "6" are zero
        return True if module is model[6] and idx < 4 else real(module, idx)

    monkeypatch.setattr(c, "_zero_out", lying)
    message = r"differ.*tolerance 0\.0001.*first in '9', after removing channels of '6' \(4\)"
    with pytest.raises(c.CompactionError, match=message):
        compact(model, x, inplace=True)


def test_a_compact_model_that_cannot_run_is_refused_with_the_module():
    class Reshapes(nn.Module):  # hard-codes its channel count: removing channels breaks it
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

        def forward(self, x):
            y = self.conv(x).view(x.shape[0], 8, -1).mean(2)
            return self.head(y)

    model = Reshapes().eval()
    with torch.no_grad():
        model.conv.weight[:2] = 0
        model.conv.bias[:2] = 0
    with pytest.raises(ValueError, match="compact model cannot run on the example input"):
        compact(model, torch.randn(2, 3, 5, 5))


def test_grouped_conv_channels_are_kept_and_reported_the_rest_removed_exactly():
    model = _grouped_net()
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        for i in (1, 6):  # channels feeding the grouped conv: Torch-Pruning breaks its groups
            model[0].weight[i] = 0
            model[0].bias[i] = 0
            model[1].weight[i] = 0
            model[1].bias[i] = 0
        model[6].weight[3] = 0  # a channel after it: removable
        model[6].bias[3] = 0
    small, report = compact(model, x)
    assert report.removed == {"6": 1}
    assert "grouped conv" in report.skipped["0"] and report.not_removable["0"] == 2
    assert torch.allclose(small(x), model(x), atol=1e-6)
    y = torch.randn(3, 3, 4, 4)
    assert torch.allclose(small(y), model(y), atol=1e-6)


def test_a_refused_compaction_still_writes_the_run(tmp_path, monkeypatch):
    import json

    import admmprune.run.finish as finish
    from admmprune.run.parse import parse_recipe
    from admmprune.run.pipeline import prepare, run
    from admmprune.structure.compact import CompactionError
    from test_pipeline import tiny_recipe

    def refuse(*a, **k):
        raise CompactionError("the compact model cannot run: test")

    monkeypatch.setattr(finish, "compact", refuse)
    recipe = tiny_recipe(tmp_path / "run", pretrain={"epochs": 1}, retrain={"epochs": 1})
    recipe["admm"]["epochs"] = 2
    lines = []
    run(prepare(parse_recipe(recipe)), log=lines.append)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["compact"]["refused"] == "the compact model cannot run: test"
    assert (tmp_path / "run" / "model.pt").exists() and (tmp_path / "run" / "masks.pt").exists()
    assert any("[compact] refused" in line for line in lines)
