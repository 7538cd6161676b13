"""Coupled channel groups: exact joint projection, and everything ADMM zeroes is removable."""

import itertools

import pytest
import torch
from torch import nn

from admmprune import ADMM, ChannelGroup, Filters, channel_groups
from admmprune.models import build_model
from admmprune.sets.constraints import keep_count
from admmprune.structure.compact import compact


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.head = nn.Conv2d(5, 3, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


def test_group_members_and_joint_projection_match_brute_force():
    torch.manual_seed(0)
    model = ConvBN()
    with torch.no_grad():
        model.bn.weight.uniform_(-2, 2)
        model.bn.bias.uniform_(-2, 2)
    (group,) = channel_groups(model, torch.randn(1, 2, 6, 6), keep=0.4)
    assert dict(group.members).keys() == {"conv.weight", "conv.bias", "bn.weight", "bn.bias"}
    V = {p: dict(model.named_parameters())[p].detach() for p, _ in group.members}
    Z, support = group.project(V)
    k = keep_count(0.4, 5)
    best = None
    for chosen in itertools.combinations(range(5), k):  # every support of k channels
        d = sum(float(v[[j for j in range(5) if j not in chosen]].pow(2).sum()) for v in V.values())
        best = d if best is None or d < best else best
    dist = sum(float((V[p] - Z[p]).pow(2).sum()) for p in V)
    assert dist == pytest.approx(best, rel=1e-6)
    kept_rows = support["conv.weight"].reshape(5, -1).all(1)
    assert int(kept_rows.sum()) == k
    for p in ("conv.bias", "bn.weight", "bn.bias"):  # the same channels in every member
        assert torch.equal(support[p], kept_rows)


def test_admm_with_groups_prunes_only_removable_channels():
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=3, input_size=32)
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))
    groups = channel_groups(model, x[:1], keep=0.5)
    assert len(groups) == 12  # 9 block-internal + 3 residual stages; the classifier is left out
    admm = ADMM(model, {"fc": Filters(1.0)}, groups=groups, rho=0.05, mode="grad")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        stats = admm.update()
    assert "layer2.0.bn2.bias" in stats  # BN affine entries are constrained with their convs
    admm.prune()
    model.eval()
    small, report = compact(model, x[:1])
    assert report.total_not_removable == 0  # every zeroed channel was physically removed
    assert sum(report.removed.values()) == sum(g.n - keep_count(0.5, g.n) for g in groups)
    with torch.no_grad():
        assert (model(x) - small(x)).abs().max() <= 1e-5
    assert small.layer3[0].conv1.out_channels == 32


def test_a_parameter_in_a_group_and_the_spec_is_an_error():
    model = ConvBN()
    groups = channel_groups(model, torch.randn(1, 2, 6, 6), keep=0.5)
    with pytest.raises(ValueError, match=r"'conv\.weight' is in ChannelGroup"):
        ADMM(model, {"conv": Filters(0.5)}, groups=groups)
    with pytest.raises(ValueError, match="no channel group matches"):
        channel_groups(model, torch.randn(1, 2, 6, 6), keep=0.5, layers="layer9*")


def test_l1_groups_rank_by_l1_one_shot_only():
    """Li et al.'s L1 ranking: channel 0 has the larger L1 norm, channel 1 the larger L2 norm."""
    V = {"0.weight": torch.tensor([[0.5, 0.5, 0.5], [1.0, 0.0, 0.0]]).view(2, 3, 1, 1)}
    members = (("0.weight", (0, 1)),)

    def kept(group):
        return group.project(V)[1]["0.weight"].view(2, -1).all(1).nonzero().flatten().tolist()

    assert kept(ChannelGroup("0", 0.5, members)) == [1]  # L2²: 0.75 < 1.0
    assert kept(ChannelGroup("0", 0.5, members, norm="l1")) == [0]  # L1: 1.5 > 1.0
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    x = torch.randn(1, 3, 4, 4)
    groups = channel_groups(model, x, keep=0.5, norm="l1")
    assert groups and all(g.norm == "l1" for g in groups)
    admm = ADMM(model, {}, groups=groups)
    admm.prune()  # one shot is what L1 ranking is for
    with pytest.raises(ValueError, match="one-shot prune"):
        admm.update()
    with pytest.raises(ValueError, match="norm="):
        channel_groups(model, x, keep=0.5, norm="l3")
