"""Structure finding on the shapes users' models have: several outputs, groups that do not fit,
empty outputs. Small stand-ins for what broke on detectors and the model zoo."""

import importlib

import pytest
import torch
from torch import nn

import admmprune as ap
from admmprune.structure.compact import compact
from admmprune.structure.graph import output_layers


class TwoHeaded(nn.Module):
    """``return cls(h), box(h)``: both heads' outputs are the model's."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 12, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.cls = nn.Linear(12, 5)
        self.box = nn.Linear(12, 4)

    def forward(self, x):
        h = self.body(x)
        return self.cls(h), self.box(h)


class Thresholded(TwoHeaded):
    """Detector-style post-processing: only the scores above a threshold come out."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, x):
        scores, boxes = super().forward(x)
        keep = scores.sigmoid().amax(1) > self.threshold
        return scores[keep], boxes[keep]


def _randomized(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model.eval()


def test_every_output_layer_is_protected():
    model = _randomized(TwoHeaded())
    x = torch.randn(2, 3, 12, 12)
    assert set(output_layers(model, x)) == {model.cls, model.box}
    groups = ap.channel_groups(model, x, keep=0.5)
    members = {p for g in groups for p, _ in g.members}
    assert not any(p.startswith(("cls.", "box.")) for p in members)
    assert "body.3.weight" in members  # the shared trunk is still offered
    # zero half of the trunk's channels through ADMM's projection: compact keeps both heads
    admm = ap.ADMM(model, {}, groups=groups, rho=1e-2)
    admm.prune()
    small, _ = compact(model, x)
    assert small.cls.out_features == 5 and small.box.out_features == 4
    assert small.body[3].out_channels == 6
    y = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        for a, b in zip(model(y), small(y), strict=True):
            assert torch.allclose(a, b, atol=1e-5)


def test_a_group_that_does_not_fit_is_refused_by_name():
    model = _randomized(TwoHeaded())
    bad = ap.ChannelGroup(
        "cls", 0.5, (("cls.weight", tuple(range(6))), ("cls.bias", tuple(range(6))))
    )
    with pytest.raises(ValueError, match=r"cls\.weight.*index 5.*5 along dim 0"):
        ap.ADMM(model, {}, groups=[bad])
    missing = ap.ChannelGroup("x", 0.5, (("nope.weight", (0, 1)),))
    with pytest.raises(ValueError, match=r"'nope\.weight' is not a parameter"):
        ap.ADMM(model, {}, groups=[missing])


@pytest.mark.parametrize("threshold", [2.0, 0.0])  # nothing above it / everything
def test_compact_checks_empty_and_full_outputs(threshold):
    model = _randomized(Thresholded(threshold))
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        model.body[3].weight[:6] = 0
        model.body[3].bias[:6] = 0
    small, _ = compact(model, x)
    assert small.body[3].out_channels == 6
    with torch.no_grad():
        for a, b in zip(model(x), small(x), strict=True):
            assert a.shape == b.shape
            assert a.numel() == 0 if threshold > 1 else torch.allclose(a, b, atol=1e-5)


def test_a_dependency_analysis_past_its_time_bound_is_a_clear_refusal(monkeypatch):
    from admmprune.structure import graph as _graph

    monkeypatch.setattr(_graph, "TIME_LIMIT", 1e-3)
    monkeypatch.setattr(_graph, "TIME_PER_MODULE", 0.0)
    model = _randomized(TwoHeaded())
    x = torch.randn(2, 3, 12, 12)
    with pytest.raises(ValueError, match=r"could not trace and group TwoHeaded within 0 s"):
        ap.channel_groups(model, x, keep=0.5)
    # compact keeps every channel and says why, instead of hanging
    with torch.no_grad():
        model.body[3].weight[:6] = 0
        model.body[3].bias[:6] = 0
    small, report = compact(model, x)
    assert small.body[3].out_channels == 12
    assert "within" in " ".join(str(v) for v in report.skipped.values())
    monkeypatch.undo()
    assert ap.channel_groups(model, x, keep=0.5)  # the timer is gone: it works again


def test_phi_structure_finding_ends_and_compacts_exactly():
    """Phi's partial rotary made Torch-Pruning's group search cycle for minutes."""
    tf = pytest.importorskip("transformers", reason="needs the [hf] extra")
    cfg = tf.PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4)  # fmt: skip
    torch.manual_seed(0)
    model = tf.PhiForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.2)
    x = {"input_ids": torch.randint(0, 64, (1, 8))}
    groups = ap.channel_groups(model, x, keep=0.5)
    assert {g.name for g in groups} == {"model.layers.0.mlp.fc1", "model.layers.1.mlp.fc1"}
    ap.ADMM(model, {}, groups=groups, rho=1e-2).prune()
    small, _ = compact(model, x)
    assert small.model.layers[0].mlp.fc1.out_features == 24
    y = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        assert torch.allclose(model(y).logits, small(y).logits, atol=1e-4)


class Concatenated(nn.Module):
    """A BatchNorm after a concatenation (DenseNet): each of its channels belongs to exactly
    one producer's group."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 8, 3)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.bn(torch.cat([self.a(x), self.b(x)], 1)).relu()
        return self.head(self.c(h).mean((2, 3)))


def test_a_concatenation_fed_batchnorm_is_shared_by_its_producers_groups():
    model = _randomized(Concatenated())
    x = torch.randn(1, 3, 10, 10)
    groups = {g.name: g for g in ap.channel_groups(model, x, keep=0.5)}
    assert set(groups) == {"a", "b", "c"}
    a_bn = dict(groups["a"].members)["bn.weight"]
    b_bn = dict(groups["b"].members)["bn.weight"]
    assert sorted(a_bn + b_bn) == list(range(10))  # disjoint slices of the one BatchNorm
    ap.ADMM(model, {}, groups=list(groups.values()), rho=1e-2).prune()
    assert int((model.bn.weight != 0).sum()) == 3 + 2  # half of a's six, half of b's four
    small, _ = compact(model, x)
    assert small.bn.num_features == 5 and small.a.out_channels == 3 and small.b.out_channels == 2
    y = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        assert torch.allclose(model(y), small(y), atol=1e-5)
    overlapping = ap.ChannelGroup("x", 0.5, (("bn.weight", (0, 1)),))
    with pytest.raises(ValueError, match="overlapping channels"):
        ap.ADMM(model, {}, groups=[groups["a"], overlapping])


class Pyramid(nn.Module):
    """One head shared by two pyramid levels (a detector's RPN / RetinaNet heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.lat1 = nn.Conv2d(8, 6, 1)
        self.lat2 = nn.Conv2d(8, 6, 1)
        self.head = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        f1 = self.c1(x).relu()
        f2 = self.c2(f1).relu()
        return torch.cat(
            [self.head(self.lat1(f1)).flatten(1), self.head(self.lat2(f2)).flatten(1)], 1
        )


def test_channels_read_by_a_layer_run_several_times_are_kept():
    model = _randomized(Pyramid())
    x = torch.randn(1, 3, 8, 8)
    groups = {g.name: g for g in ap.channel_groups(model, x, keep=0.5)}
    assert set(groups) == {"c1", "c2"}  # the levels' lateral convs feed the shared head
    with pytest.raises(ValueError, match=r"'head', which runs several times per forward"):
        ap.channel_groups(model, x, keep=0.5, layers="lat*")
    with torch.no_grad():  # zeroed by hand: compact keeps them, and says why
        model.lat2.weight[:3] = 0
        model.lat2.bias[:3] = 0
    ap.ADMM(model, {}, groups=list(groups.values()), rho=1e-2).prune()
    small, report = compact(model, x)
    assert small.lat2.out_channels == 6 and small.c1.out_channels == 4
    assert report.not_removable == {"lat2": 3}  # kept: lat1 shares the head's channels
    y = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model(y), small(y), atol=1e-5)


def test_the_safety_net_rechecks_in_float64_what_rounding_reorders(monkeypatch):
    """Post-processing (NMS, sorting) turns fp32 rounding into reordered outputs: a failed
    fp32 check is repeated in float64, where an exact compaction agrees and a wrong one not."""
    compact_module = importlib.import_module(
        "admmprune.structure.compact"
    )  # the module, not the function

    model = _randomized(TwoHeaded())
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        model.body[3].weight[:6] = 0
        model.body[3].bias[:6] = 0
    real = compact_module._verify
    dtypes = []

    def fp32_reorders(small, *args):
        dtype = next(small.parameters()).dtype
        dtypes.append(dtype)
        if dtype == torch.float32:  # as a detector's near-tied scores would
            raise compact_module.CompactionError("outputs differ (reordered)")
        return real(small, *args)

    monkeypatch.setattr(compact_module, "_verify", fp32_reorders)
    small, _ = compact(model, x)
    assert dtypes == [torch.float32, torch.float64] and small.body[3].out_channels == 6
    assert next(small.parameters()).dtype == torch.float32  # the result stays as it was
    # (a wrong compaction fails in float64 too: test_compact's safety-net tests, unchanged)


class Chaotic(TwoHeaded):
    """Post-processing that turns rounding into different outputs even in float64 (as NMS over
    exactly tied scores does in SSDlite): ``sin(10¹⁷·scores)``."""

    def forward(self, x):
        h = self.body(x)
        return torch.sin(self.cls(h) * 1e17), self.box(h)


def test_the_safety_net_accepts_rounding_after_the_modules_never_a_wrong_module(monkeypatch):
    compact_module = importlib.import_module("admmprune.structure.compact")
    model = _randomized(Chaotic())
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        model.body[3].weight[:6] = 0
        model.body[3].bias[:6] = 0
    real, dtypes = compact_module._verify, []

    def spy(small, *args):
        dtypes.append(next(small.parameters()).dtype)
        return real(small, *args)

    monkeypatch.setattr(compact_module, "_verify", spy)
    small, report = compact(model, x)  # every module agrees; only sin(10¹⁷·…) does not
    assert dtypes == [torch.float32, torch.float64] and report.removed == {"body.3": 6}
    with torch.no_grad():
        h = model.body(x)
        assert torch.allclose(small.cls(small.body(x)), model.cls(h), atol=1e-5)

    def wrong(m):  # a compaction that changes a module's output
        with torch.no_grad():
            m.cls.weight.mul_(1.001)
        return {}

    monkeypatch.setattr(compact_module.heads, "remove_zero_heads", wrong)
    with pytest.raises(compact_module.CompactionError, match="first in 'cls'"):
        compact(model, x)
