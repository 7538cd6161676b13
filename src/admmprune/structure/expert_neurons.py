r"""Each expert's intermediate neurons as a coupled channel group, removed physically.

A fused MoE layer runs expert ``e`` as ``Y_e = φ(X_e W1_eᵀ) W2_eᵀ``: the producer ``W1_e``
(``gate_up_proj[e]``, 2I rows: gate and up, plus its bias) feeds neuron ``j`` of
``h = φ(·)`` from the rows ``R(j)``, and the consumer ``W2_e`` (``down_proj[e]``) reads neuron
``j`` as its column ``j``. φ is element-wise per neuron with ``φ(0) = 0`` (gate·up, SwiGLU and
its clamped variants), so when every row in ``R(j)`` is zero, ``h_j = 0`` and column ``j``
adds nothing: the neuron can be deleted from both with the function unchanged. Expert ``e``'s
set is a :class:`~admmprune.structure.groups.ChannelGroup` with ``expert=e``

    S_e = { at most k of the I neurons have a non-zero producer row },

whose projection keeps the ``k`` neurons of largest ``Σ_{r∈R(j)} ||W1_e[r]||²`` (exact: the
neurons' rows are disjoint), so ADMM and one-shot pruning treat it like any channel group.

The layout ``R`` (``[gate; up]`` in Mixtral / Qwen, interleaved in gpt-oss, any other) is read
from the model, never assumed: in one forward on the example input each producer GEMM's output
``y`` is replaced by a random leaf, and vector–Jacobian products of ``h`` with ``c_j = 1`` and
``c_j = 1 + bit_b(j)`` give, for each row ``r``, the bits of the neuron it feeds (the ratio of
the two products is ``c_{j(r)}``); a row feeding several neurons, or none, is refused.

Every expert of one module keeps the same number of neurons (its weights are one tensor), which
ADMM's per-expert groups give by construction: each keeps ``keep_count(keep, I)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..weights.experts import ExpertTap, eager_experts, expert_weights, is_transposed, num_experts
from ..weights.forward import call, no_cache

__all__: list[str] = []  # internal: channel_groups and compact use it


@dataclass(frozen=True)
class NeuronMap:
    """The neuron layout of one fused experts module (the same for each of its experts)."""

    name: str  # the experts module's name in the model
    producers: dict[str, tuple[int, ...]]  # attribute → the neuron each of its output rows feeds
    biases: dict[str, str]  # producer attribute → its bias attribute ([E, rows])
    consumer: str  # the attribute whose GEMM reads the neurons
    n: int  # neurons per expert (I)
    transposed: bool  # weights stored [E, in, out]

    def units(self, attr: str) -> tuple[tuple[int, ...], ...]:
        """Per neuron ``j``: the output rows of producer ``attr`` that feed it."""
        rows: list[list[int]] = [[] for _ in range(self.n)]
        for r, j in enumerate(self.producers[attr]):
            rows[j].append(r)
        return tuple(tuple(r) for r in rows)

    @property
    def out_dim(self) -> int:
        """The dim of one expert's slice that indexes a producer's output rows."""
        return 1 if self.transposed else 0


def neuron_maps(model: nn.Module, example_input) -> tuple[dict[str, NeuronMap], dict[str, str]]:
    """The neuron layout of every fused experts module of ``model`` that the example input
    routes a token to, by module name, and the reason for each module left without one."""
    fused = {n: m for n, m in model.named_modules() if len(expert_weights(m)) >= 2}
    if not fused:
        return {}, {}
    probe = _Probe(fused)
    sites = {
        (m, a, e): (probe.pre, probe.post)
        for m in fused.values()
        for a in expert_weights(m)
        for e in range(num_experts(m))
    }
    was_training = model.training
    model.eval()
    try:
        with eager_experts(model), no_cache(model), ExpertTap.over(sites), torch.enable_grad():
            call(model, example_input)
    finally:
        model.train(was_training)
    maps, refused = {}, {}
    for name, m in fused.items():
        found = probe.found.get(m)
        if probe.problem.get(m):
            refused[name] = probe.problem[m]
        elif not found:
            refused[name] = "no token of the example input was routed to its experts"
        else:
            consumer, producers = found
            n = getattr(m, consumer).shape[1 if is_transposed(m) else 2]
            maps[name] = NeuronMap(
                name, producers, _biases(m, producers), consumer, n, is_transposed(m)
            )
    return maps, refused


def _biases(m: nn.Module, producers: dict) -> dict[str, str]:
    """Each producer's bias: a 2-D ``[E, rows]`` parameter named after it (gpt-oss's
    ``gate_up_proj_bias``)."""
    out = {}
    for attr, rows in producers.items():
        for n, p in m.named_parameters(recurse=False):
            if n != attr and n.startswith(attr) and "bias" in n and p.shape[1:] == (len(rows),):
                out[attr] = n
    return out


class _Probe:
    """ExpertTap callbacks: each expert GEMM's output becomes a leaf; at the next GEMM of the
    same expert, the leaves it depends on are decoded into neuron maps."""

    def __init__(self, fused: dict[str, nn.Module]) -> None:
        self.leaves: dict[tuple[nn.Module, int], list[tuple[str, torch.Tensor]]] = {}
        self.found: dict[nn.Module, tuple[str, dict[str, tuple[int, ...]]]] = {}
        self.problem: dict[nn.Module, str] = {}

    def post(self, site, y: torch.Tensor) -> torch.Tensor:
        m, attr, e = site
        # random values, not y: a pruned neuron's zero rows would zero its derivatives
        g = torch.Generator(device=y.device).manual_seed(len(self.leaves))
        leaf = torch.randn(y.shape, generator=g, device=y.device).requires_grad_()
        self.leaves.setdefault((m, e), []).append((attr, leaf))
        return leaf.to(y.dtype)

    def pre(self, site, x: torch.Tensor) -> None:
        m, attr, e = site
        if m in self.problem or not x.requires_grad:
            return
        producers = {}
        for p, leaf in self.leaves.get((m, e), []):
            if p == attr:
                continue
            decoded = _decode(x, leaf)
            if isinstance(decoded, str):
                self.problem[m] = f"the outputs of {p!r} do not feed {attr!r} per neuron: {decoded}"
                return
            if decoded is not None:
                producers[p] = decoded
        if not producers:
            return
        self.leaves.pop((m, e), None)
        seen = self.found.setdefault(m, (attr, producers))
        if seen != (attr, producers):
            self.problem[m] = f"expert {e} lays out its neurons unlike the experts before it"


def _decode(h: torch.Tensor, leaf: torch.Tensor) -> tuple[int, ...] | str | None:
    """The neuron of ``h`` (last dim) that each row of ``leaf`` (last dim) feeds; None when
    ``h`` does not depend on ``leaf``; a reason when a row feeds several neurons or none."""
    n = h.shape[-1]
    j = torch.arange(n, device=h.device)

    def vjp(c: torch.Tensor) -> torch.Tensor | None:
        (g,) = torch.autograd.grad(
            h, leaf, c.to(h.dtype).expand_as(h), retain_graph=True, allow_unused=True
        )
        return None if g is None else g.reshape(-1, leaf.shape[-1]).float()

    base = vjp(torch.ones(n, device=h.device))
    if base is None:
        return None
    best = base.abs().argmax(0)  # per row, the token where it matters most
    cols = torch.arange(base.shape[1], device=base.device)
    b0 = base[best, cols]
    if bool((b0 == 0).any()):
        return f"{int((b0 == 0).sum())} of its rows feed no neuron on the example input"
    neuron = torch.zeros(base.shape[1], dtype=torch.long, device=h.device)
    for bit in range(max(1, math.ceil(math.log2(n)))):
        ratio = vjp(1.0 + ((j >> bit) & 1).float())[best, cols] / b0
        if bool(((ratio - ratio.round()).abs() > 0.25).any() or (ratio.round() < 1).any()):
            return "a row feeds several neurons"
        neuron |= (ratio.round().long() - 1).clamp(0, 1) << bit
    if int(neuron.max()) >= n or len(set(neuron.tolist())) != n:
        return "its rows do not cover every neuron"
    return tuple(neuron.tolist())


def uneven(mp: NeuronMap) -> str | None:
    """Why the neurons cannot be removed from the fused weights (uneven rows per neuron)."""
    for attr in mp.producers:
        counts = {len(u) for u in mp.units(attr)}
        if len(counts) != 1:
            return f"its neurons take {sorted(counts)} rows of {attr!r}: not one layout per neuron"
    return None


def _zero_neurons(m: nn.Module, mp: NeuronMap) -> torch.Tensor:
    """``[E, I]``: which neurons of each expert have every producer row (and bias) zero."""
    live_per = torch.zeros(num_experts(m), mp.n, dtype=torch.long)
    for attr, feeds in mp.producers.items():
        W = getattr(m, attr).detach()
        live = W.ne(0).any(dim=1 if mp.transposed else 2)  # [E, rows]
        if attr in mp.biases:
            live = live | getattr(m, mp.biases[attr]).detach().ne(0)
        live_per.index_add_(1, torch.tensor(feeds), live.cpu().long())
    zero = live_per == 0
    return zero


@torch.no_grad()
def zero_dead_neurons(model: nn.Module, maps: dict[str, NeuronMap]) -> int:
    """Zero each consumer column that reads a neuron with all producer rows zero; returns how
    many weights that zeroed (the function is unchanged: the neuron is identically 0)."""
    modules, zeroed = dict(model.named_modules()), 0
    for mp in maps.values():
        m = modules[mp.name]
        dead = _zero_neurons(m, mp).to(getattr(m, mp.consumer).device)  # [E, I]
        W = getattr(m, mp.consumer)
        shape = (dead.shape[0], -1, 1) if mp.transposed else (dead.shape[0], 1, -1)
        hit = dead.view(shape).expand_as(W)
        zeroed += int((W.detach() != 0)[hit].sum())
        W.masked_fill_(hit, 0)
    return zeroed


@torch.no_grad()
def remove_zero_neurons(model: nn.Module, maps: dict[str, NeuronMap]) -> dict[str, int]:
    """Delete, from every expert of each mapped module, the same number ``r`` of neurons that
    are zero in all producers (the smallest count over its experts; a layer keeps one); returns
    ``r`` per module. Int attributes holding the neuron count (``intermediate_dim``) follow."""
    modules, removed = dict(model.named_modules()), {}
    for mp in maps.values():
        m = modules[mp.name]
        zero = _zero_neurons(m, mp)
        r = min(int(zero.sum(1).min()), mp.n - 1)
        if r <= 0:
            continue
        keep = []  # per expert: its kept neurons, in order
        for z in zero:
            drop = set(z.nonzero().flatten().tolist()[:r])
            keep.append([j for j in range(mp.n) if j not in drop])
        for attr, feeds in mp.producers.items():
            rows = [[i for i, j in enumerate(feeds) if j in set(k)] for k in keep]
            _take(m, attr, rows, 2 if mp.transposed else 1)
            if attr in mp.biases:
                _take(m, mp.biases[attr], rows, 1)
        _take(m, mp.consumer, keep, 1 if mp.transposed else 2)
        for a, v in list(vars(m).items()):
            if isinstance(v, int) and not isinstance(v, bool) and v == mp.n and "inter" in a:
                setattr(m, a, mp.n - r)
        removed[mp.name] = r
    return removed


def _take(m: nn.Module, attr: str, index: list[list[int]], dim: int) -> None:
    """Replace ``m.attr`` ``[E, …]`` by each expert's ``index[e]`` along ``dim``."""
    old = getattr(m, attr)
    parts = [
        old[e].index_select(dim - 1, torch.tensor(ix, device=old.device))
        for e, ix in enumerate(index)
    ]
    setattr(m, attr, nn.Parameter(torch.stack(parts), requires_grad=old.requires_grad))
