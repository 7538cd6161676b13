"""Coupled channel groups: structured sparsity that is always physically removable.

Channels joined by BatchNorm, element-wise ops and residual additions can only be removed
together. A :class:`ChannelGroup` lists, for each of its ``n`` channels ``j``, the slice of every
*producer* parameter that writes it: the output rows of each Conv/Linear weight, the bias entries,
and the BatchNorm affine entries. The set

    S = { W : at most k of the n channels have any non-zero producer slice }

has the exact Euclidean projection (the slices of different channels are disjoint)::

    score_j = Σ_members ||W_member[idx_member[j]]||²,   keep the k largest, zero the rest

Everything it zeroes is removed by :func:`admmprune.structure.compact.compact`, exactly.

``norm="l1"`` ranks channels by ``Σ_members ||W_member[idx_member[j]]||₁`` instead (Li et al.'s
L1-norm filter pruning, made group-aware): a one-shot selection rule, not a Euclidean
projection, so ADMM must not use it.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..sets.constraints import _check_keep, keep_count, topk_mask
from ..weights.gemm import is_conv1d
from .expert_neurons import neuron_maps, uneven
from .graph import BATCH_NORMS, GraphError, analyse, output_layers

__all__ = ["ChannelGroup", "channel_groups"]


@dataclass(frozen=True)
class ChannelGroup:
    """``n`` coupled channels (or attention heads); ``members[p][j]`` is the index, or tuple of
    indices, of channel ``j`` in parameter ``p`` along ``dims[p]`` (0, the rows, by default:
    transformers' ``Conv1D`` stores outputs as columns, an attention head is many rows of Q, K
    and V and columns of O)."""

    name: str
    keep: float
    members: tuple[tuple[str, tuple[int | tuple[int, ...], ...]], ...]
    norm: str = "l2"  # "l2": the Euclidean projection; "l1": rank by L1 norm (one-shot only)
    dims: tuple[int, ...] = ()  # per member; () = all 0
    kind: str = "channels"  # or "heads" (head_groups), "neurons" (an expert's)
    # the Conv/Linear weights that read these channels: (name, input index of channel j); what
    # compaction also removes (their GEMM columns of a dead channel). Not projected.
    consumers: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # a fused experts weight [E, …]: the group is expert ``expert``'s slice of every member
    # (``dims`` and indices within that slice); the other experts' slices are left as they are
    expert: int | None = None

    @property
    def n(self) -> int:
        return len(self.members[0][1])

    def __repr__(self) -> str:
        what = "" if self.kind == "channels" else f", {self.kind}"
        return f"ChannelGroup({self.name!r}, keep={self.keep:g}, n={self.n}{what})"

    def _part(self, p: torch.Tensor) -> torch.Tensor:
        """The slice of member ``p`` this group constrains (its expert's, or all of it)."""
        return p if self.expert is None else p[self.expert]

    def _slices(self):
        """Per member: ``(name, dim, flat indices, channel of each index)``."""
        for i, (pname, units) in enumerate(self.members):
            dim = self.dims[i] if self.dims else 0
            flat, owner = [], []
            for j, u in enumerate(units):
                u = (u,) if isinstance(u, int) else u
                flat += u
                owner += [j] * len(u)
            yield pname, dim, flat, owner

    def problem(self, params: dict[str, torch.Tensor]) -> str | None:
        """Why this group does not fit ``params`` (a member missing, or a channel index out of
        its parameter's range), or None when it does."""
        for pname, dim, flat, _ in self._slices():
            p = params.get(pname)
            if p is None:
                return f"member {pname!r} is not a parameter of the model"
            if self.expert is not None:
                if p.ndim < 2 or not 0 <= self.expert < p.shape[0]:
                    return f"member {pname!r} has no expert {self.expert} (shape {tuple(p.shape)})"
                p = p[self.expert]
            size = p.shape[dim] if p.ndim > dim else 0
            bad = [i for i in flat if not 0 <= i < size]
            if bad:
                return (
                    f"member {pname!r} has channel index {bad[0]}, but the parameter has "
                    f"{size} along dim {dim}"
                )
        return None

    @torch.no_grad()
    def project(self, V: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """Π_S over the whole group (with ``norm="l1"``: the L1-ranked selection):
        ``(Z, support)`` per member parameter name."""
        slices = list(self._slices())
        score = None
        for pname, dim, flat, owner in slices:
            v = self._part(V[pname]).float()
            s = v.index_select(dim, torch.tensor(flat, device=v.device)).movedim(dim, 0)
            s = s.reshape(len(flat), -1)
            s = s.abs().sum(1) if self.norm == "l1" else s.pow(2).sum(1)
            per = torch.zeros(self.n, device=v.device, dtype=s.dtype)
            per.index_add_(0, torch.tensor(owner, device=v.device), s)
            score = per if score is None else score + per.to(score.device)
        kept = topk_mask(score, keep_count(self.keep, self.n))
        Z, support = {}, {}
        for pname, dim, flat, owner in slices:
            v = self._part(V[pname])
            mask = torch.ones(v.shape[dim], dtype=torch.bool, device=v.device)
            drop = ~kept.to(v.device)[torch.tensor(owner, device=v.device)]
            mask[torch.tensor(flat, device=v.device)[drop]] = False
            shape = [1] * v.ndim
            shape[dim] = -1
            full = mask.view(shape).expand_as(v)
            if self.expert is None:
                Z[pname], support[pname] = torch.where(full, v, 0), full.contiguous()
                continue
            whole = torch.ones_like(V[pname], dtype=torch.bool)
            whole[self.expert] = full
            Z[pname], support[pname] = torch.where(whole, V[pname], 0), whole
        return Z, support


def channel_groups(
    model: nn.Module,
    example_input,
    keep: float,
    *,
    layers: str | None = None,
    ignored_layers: list[nn.Module] | None = None,
    norm: str = "l2",
) -> list[ChannelGroup]:
    """The coupled channel groups of ``model``, each to keep ``keep`` of its channels
    (``norm``: ``"l2"``, the projection ADMM needs, or ``"l1"`` for one-shot L1 ranking).

    ``layers`` (a glob on the group's root layer name) selects groups; the model's output layer
    is left alone unless ``ignored_layers`` says otherwise. ``example_input`` is a tensor or, for
    Hugging Face models, a dict of tensors. Only groups :func:`admmprune.compact` can remove
    exactly are returned: channels normalised together by a LayerNorm/RMSNorm (a transformer's
    hidden size), read by attention, looked up from an embedding or crossing a grouped conv are
    not; attention projections are pruned by heads (:func:`admmprune.head_groups`). Each
    expert of a fused mixture-of-experts layer gives a group of its intermediate neurons
    (named ``"<experts module>[e]"``, :mod:`.expert_neurons`).
    """

    keep = _check_keep("channel_groups", keep)
    if norm not in ("l1", "l2"):
        raise ValueError(f"channel_groups(norm={norm!r}): use 'l2' (ADMM) or 'l1' (one-shot).")
    names = {m: n for n, m in model.named_modules()}
    params = dict(model.named_parameters())
    was_training = model.training
    model.eval()  # tracing runs a forward; batch-1 inputs would trip BatchNorm in train mode
    neurons, left_out = _expert_groups(model, example_input, keep, norm)
    out = [g for g in neurons if layers is None or fnmatch.fnmatchcase(g.name, layers)]
    refused = {
        name: f"its experts' neurons: {why}"
        for name, why in left_out.items()
        if layers is None or fnmatch.fnmatchcase(name, layers)
    }
    try:
        ignored = (
            ignored_layers if ignored_layers is not None else output_layers(model, example_input)
        )
        DG, traced = analyse(model, example_input, ignored)
    except GraphError as e:
        if not out:
            raise
        # the experts' neurons need no trace: offer them, say what else is missing
        warnings.warn(f"{e} Only the experts' neuron groups are returned.", stacklevel=2)
        return out
    finally:
        model.train(was_training)
    for group in traced:
        root_module = group.items[0].dep.target.module
        root = names[root_module]
        if layers is not None and not fnmatch.fnmatchcase(root, layers):
            continue
        if DG.in_attention(root_module):
            refused[root] = "it is an attention projection: prune it by heads (head_groups)"
            continue
        reason = DG.refusal(group)
        if reason:
            refused[root] = reason
            continue
        n = len(group.items[0].idxs)
        members: dict[str, tuple[int, ...]] = {}
        dims: dict[str, int] = {}
        consumers: dict[str, tuple[int, ...]] = {}
        for item in group.items:
            m = item.dep.target.module
            reads = item.dep.handler.__name__ == "prune_in_channels" and len(item.idxs) == n
            plain = getattr(m, "groups", 1) == 1 and not is_conv1d(m)
            if reads and isinstance(m, DG.types) and plain:
                consumers[f"{names[m]}.weight"] = tuple(int(i) for i in item.idxs)
            if item.dep.handler.__name__ != "prune_out_channels" or len(item.idxs) != n:
                continue
            if not isinstance(m, DG.types + BATCH_NORMS):
                continue
            rows = tuple(int(i) for i in item.idxs)
            for attr in ("weight", "bias"):
                if isinstance(getattr(m, attr, None), nn.Parameter):
                    members[f"{names[m]}.{attr}"] = rows
                    dims[f"{names[m]}.{attr}"] = 1 if attr == "weight" and is_conv1d(m) else 0
        if members:
            candidate = ChannelGroup(
                root, keep, tuple(members.items()), norm, tuple(dims.values()),
                consumers=tuple(consumers.items()),
            )  # fmt: skip
            problem = candidate.problem(params)
            if problem:  # e.g. a trace through post-processing that reshapes the channels
                refused[root] = f"its traced channels do not fit the layer ({problem})"
                continue
            out.append(candidate)
    for a in DG.attention:  # say why an attention projection the glob names is not a group
        for m in a.projections():
            if layers is not None and fnmatch.fnmatchcase(names[m], layers):
                refused.setdefault(
                    names[m], "it is an attention projection: prune it by heads (head_groups)"
                )
    if not out:
        why = "".join(f"\n  {k}: {v}" for k, v in list(refused.items())[:12])
        raise ValueError(
            f"no channel group matches layers={layers!r} in {type(model).__name__}"
            + (f"; these were left out:{why}" if why else ".")
        )
    return out


def _expert_groups(model: nn.Module, example_input, keep: float, norm: str):
    """``(groups, refused)``: a group of intermediate neurons per expert of every fused experts
    module (named ``"<module>[e]"``), and the reason for each module left out."""
    maps, refused = neuron_maps(model, example_input)
    out = []
    modules = dict(model.named_modules())
    for mp in maps.values():
        problem = uneven(mp)
        if problem:
            refused[mp.name] = problem
            continue
        members, dims = [], []
        for attr in mp.producers:
            units = mp.units(attr)
            members.append((f"{mp.name}.{attr}", units))
            dims.append(mp.out_dim)
            if attr in mp.biases:
                members.append((f"{mp.name}.{mp.biases[attr]}", units))
                dims.append(0)
        consumers = ((f"{mp.name}.{mp.consumer}", tuple(range(mp.n))),)
        for e in range(modules[mp.name].num_experts):
            out.append(
                ChannelGroup(f"{mp.name}[{e}]", keep, tuple(members), norm, tuple(dims),
                             kind="neurons", consumers=consumers, expert=e)
            )  # fmt: skip
    return out, refused
