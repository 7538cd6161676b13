"""Each expert's intermediate neurons as a channel group: pruned per expert, removed physically
from the fused expert weights, the neuron layout read from the model (never assumed)."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional

import admmprune as ap
from admmprune.structure.compact import compact, zero_dead_inputs
from admmprune.structure.expert_neurons import neuron_maps
from test_experts import FAMILIES, _lm


def _experts(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n.endswith("mlp.experts")}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_experts_neurons_pruned_and_removed_exactly(family):
    model = _lm(family)
    g = torch.Generator().manual_seed(0)
    x = {"input_ids": torch.randint(3, 64, (2, 16), generator=g)}
    with warnings.catch_warnings():  # DeepSeek-V3 does not trace: its experts' groups only
        warnings.simplefilter("ignore", UserWarning)
        groups = ap.channel_groups(model, x, keep=0.5)
    neurons = [gr for gr in groups if gr.kind == "neurons"]
    experts = _experts(model)
    assert {gr.name for gr in neurons} == {
        f"{n}[{e}]" for n, m in experts.items() for e in range(m.num_experts)
    }
    ap.ADMM(model, {}, groups=neurons, rho=1e-2).prune()
    removed = {}
    for name, m in experts.items():
        t = getattr(m, "is_transposed", False)
        n = m.down_proj.shape[1 if t else 2]  # [E, H, I], or [E, I, H] transposed
        removed[name] = n - n // 2
        up = m.gate_up_proj.transpose(1, 2) if t else m.gate_up_proj
        for e in range(m.num_experts):  # half the neurons of every expert: both of its rows
            zero_rows = int((up[e] == 0).all(1).sum())
            assert zero_rows == 2 * removed[name], (name, e)
    y = {"input_ids": torch.randint(3, 64, (3, 9), generator=g)}
    with torch.no_grad():
        before = model(**y).logits
    small, report = compact(model, x)
    for name, r in removed.items():
        assert report.removed[name] == r
        m, t = dict(small.named_modules())[name], getattr(experts[name], "is_transposed", False)
        n = experts[name].down_proj.shape[1 if t else 2]
        assert m.gate_up_proj.shape[2 if t else 1] == 2 * (n - r)
        assert m.down_proj.shape[1 if t else 2] == n - r
    assert report.params_after < report.params_before
    with torch.no_grad():
        assert torch.allclose(small(**y).logits, before, atol=1e-4)
    prompt = y["input_ids"][:1]
    a = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(small.generate(prompt, max_new_tokens=5, do_sample=False), a)


class _Experts(nn.Module):
    """A fused experts module with its own layout: gate rows reversed, up rows in order."""

    def __init__(self, E: int = 3, H: int = 6, n: int = 5, mix: bool = False) -> None:
        super().__init__()
        self.num_experts, self.intermediate_dim, self.mix = E, n, mix
        g = torch.Generator().manual_seed(0)
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * n, H, generator=g))
        self.down_proj = nn.Parameter(torch.randn(E, H, n, generator=g))

    def forward(self, x):
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            y = functional.linear(x, self.gate_up_proj[e])
            n = self.intermediate_dim  # read from the module, as transformers does
            gate, up = y[..., :n].flip(-1), y[..., n:]
            h = functional.silu(gate) * up
            if self.mix:  # a row read by two neurons: not removable per neuron
                h = h + y[..., :1]
            out = out + functional.linear(h, self.down_proj[e])
        return out


class _MoE(nn.Module):
    def __init__(self, mix: bool = False) -> None:
        super().__init__()
        self.inp, self.experts, self.out = nn.Linear(4, 6), _Experts(mix=mix), nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.experts(self.inp(x)))


def test_neuron_layout_is_read_from_the_model():
    model = _MoE()
    x = torch.randn(4, 4)
    (mp,) = neuron_maps(model, x)[0].values()
    assert mp.producers["gate_up_proj"] == tuple(range(4, -1, -1)) + tuple(range(5))
    assert mp.consumer == "down_proj" and mp.n == 5
    groups = [g for g in ap.channel_groups(model, x, keep=0.6) if g.kind == "neurons"]
    assert [g.name for g in groups] == [f"experts[{e}]" for e in range(3)]
    assert dict(groups[0].members)["experts.gate_up_proj"][0] == (4, 5)  # neuron 0: rows 4, 5
    ap.ADMM(model, {}, groups=groups, rho=1e-2).prune()
    z = torch.randn(7, 4)
    with torch.no_grad():
        before = model(z)
    small, report = compact(model, x)
    assert report.removed["experts"] == 2
    assert small.experts.gate_up_proj.shape == (3, 6, 6) and small.experts.down_proj.shape == (
        3,
        6,
        3,
    )
    with torch.no_grad():
        assert torch.allclose(small(z), before, atol=1e-5)


def test_neurons_of_a_shared_row_are_refused_with_the_reason():
    model = _MoE(mix=True)
    maps, refused = neuron_maps(model, torch.randn(4, 4))
    assert not maps and "several neurons" in refused["experts"]
    with pytest.raises(ValueError, match=r"experts.*several neurons"):
        ap.channel_groups(model, torch.randn(4, 4), keep=0.5, layers="experts*")


def test_dead_neurons_consumer_columns_zeroed_and_uneven_experts_keep_the_rest():
    model = _MoE()
    x = torch.randn(4, 4)
    with torch.no_grad():  # expert 0 loses neurons 1 and 3, expert 1 neuron 2, expert 2 none
        for e, dead in ((0, (1, 3)), (1, (2,))):
            for j in dead:
                model.experts.gate_up_proj[e, [4 - j, 5 + j]] = 0
    zeroed = zero_dead_inputs(model, x)
    assert zeroed == 3 * 6  # one down_proj column of 6 per dead neuron
    assert int((model.experts.down_proj[0] == 0).all(0).sum()) == 2
    _, report = compact(model, x)
    assert "experts" not in report.removed  # expert 2 has no dead neuron: nothing goes
    model.experts.gate_up_proj.data[2, [4, 5]] = 0  # now each expert has one
    small, report = compact(model, x)
    assert report.removed["experts"] == 1 and small.experts.down_proj.shape == (3, 6, 4)
