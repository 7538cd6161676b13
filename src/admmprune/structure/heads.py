"""Attention heads as coupled groups: pruned jointly, removed whole.

Head ``h`` of an attention layer with head size ``d`` is rows ``h·d … (h+1)·d − 1`` of Q, K and
V (and their biases) and the same columns of the output projection O. With grouped-query
attention (``kv_heads < heads``) the unit is one key/value head and the ``r = heads / kv_heads``
query heads that read it, so every remaining key/value head keeps ``r`` query heads. Rotary
embeddings rotate dimension pairs inside a head, so whole heads keep them intact.

The set ``S = {at most k of the n units have a non-zero entry}`` is a :class:`ChannelGroup` of
kind ``"heads"``; its projection keeps the ``k`` units of largest ``Σ ||slice||²`` (exact, the
slices of different units are disjoint), so ADMM projects head groups exactly like channel
groups.

A unit whose V rows (and V bias) or whose O columns are all zero adds nothing to the output
(``softmax(QKᵀ/√d)·0 = 0``), so :func:`remove_zero_heads` deletes it with the function
unchanged and updates the module's head count. Supported: Hugging Face attention with
``q_proj/k_proj/v_proj/o_proj`` (LLaMA, Mistral, Qwen, OPT's ``out_proj``, grouped-query
included), BERT-style ``query/key/value`` + ``output.dense``, GPT-2's fused ``Conv1D``, the
fused ``query_key_value`` of GPT-NeoX, Bloom and Falcon (multi-query: a unit is one query head,
the shared key/value stays), T5, timm's ``Attention`` and ``nn.MultiheadAttention`` (replaced
by :class:`PrunedMultiheadAttention`). A bias made for all heads outside the layer (ALiBi, T5's
position bias) follows the kept heads (:mod:`.head_bias`).
torchvision's Swin (V1) ``ShiftedWindowAttention``, whose ``shifted_window_attention`` derives
the head size from the input width, gets a subclass whose forward takes the head size from its
weights (:func:`_window_attention`).
"""

from __future__ import annotations

import copy
import fnmatch
import math

import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)
from torch import nn

from ..sets.constraints import _check_keep
from ..weights.gemm import is_conv1d
from .attention import Attention, find, pruned_swin_class
from .groups import ChannelGroup
from .head_bias import read_kept_heads

__all__ = [
    "PrunedMultiheadAttention",
    "head_groups",
    "remove_zero_heads",
]


def head_groups(
    model: nn.Module, keep: float, *, layers: str | None = None, norm: str = "l2"
) -> list[ChannelGroup]:
    """One group per attention module, each to keep ``keep`` of its heads (with grouped-query
    attention, of its key/value heads, each with its query heads). ``layers`` is a glob on the
    attention module's name. Pass the groups to ``ADMM(groups=...)`` or :func:`admmprune.prune`
    like channel groups; :func:`admmprune.compact` removes the zeroed heads."""
    keep = _check_keep("head_groups", keep)
    names = {m: n for n, m in model.named_modules()}
    out, refused = [], {}
    for a in find(model):
        if layers is not None and not fnmatch.fnmatchcase(a.name, layers):
            continue
        if a.refuse:
            refused[a.name] = a.refuse
            continue
        members: dict[str, list] = {}
        dims: dict[str, int] = {}
        for pname, dim, s in a.params(names):
            blocks = members.setdefault(pname, [() for _ in range(a.units)])
            for u in range(a.units):
                blocks[u] = blocks[u] + tuple(a.indices(s, u))
            dims[pname] = dim
        out.append(
            ChannelGroup(
                a.name,
                keep,
                tuple((p, tuple(b)) for p, b in members.items()),
                norm,
                tuple(dims.values()),
                kind="heads",
            )
        )
    if not out:
        why = "".join(f"\n  {k}: {v}" for k, v in refused.items())
        raise ValueError(
            f"no attention module with removable heads matches layers={layers!r} in "
            f"{type(model).__name__}" + (f":{why}" if why else " (none was found).")
        )
    return out


# removal -------------------------------------------------------------------------------------
def _zero_units(a: Attention) -> list[int]:
    """The units whose V slice (rows and bias) or whose O slice is exactly zero."""
    out = []
    roles = [r for r in ("v", "o") if any(s.role == r for s in a.slices)]  # multi-query: O only
    for u in range(a.units):
        for role in roles:
            ok = True
            for s in (s for s in a.slices if s.role == role):
                idx = torch.tensor(a.indices(s, u), device=getattr(s.module, s.attr).device)
                if getattr(s.module, s.attr).index_select(s.dim, idx).any():
                    ok = False
                bias = "in_proj_bias" if s.attr == "in_proj_weight" else "bias"
                b = getattr(s.module, bias, None)
                if role == "v" and isinstance(b, nn.Parameter) and b.index_select(0, idx).any():
                    ok = False
            if ok:
                out.append(u)
                break
    return out


def _cut(module: nn.Module, attr: str, dim: int, keep: torch.Tensor) -> None:
    p = getattr(module, attr)
    new = nn.Parameter(p.detach().index_select(dim, keep.to(p.device)).clone())
    new.requires_grad_(p.requires_grad)
    setattr(module, attr, new)


def _drop(a: Attention, drop: list[int]) -> None:
    """Delete units ``drop`` from every projection; fix the layer sizes and head counts."""
    kept_units = [u for u in range(a.units) if u not in set(drop)]
    by_param: dict[tuple[int, str], list] = {}
    for s in a.slices:
        by_param.setdefault((id(s.module), s.attr), []).append(s)
    for group in by_param.values():
        s0 = group[0]
        size = getattr(s0.module, s0.attr).shape[s0.dim]
        removed = {i for s in group for u in drop for i in a.indices(s, u)}
        keep = torch.tensor([i for i in range(size) if i not in removed], dtype=torch.long)
        _cut(s0.module, s0.attr, s0.dim, keep)
        bias = "in_proj_bias" if s0.attr == "in_proj_weight" else "bias"
        if s0.role != "o" and isinstance(getattr(s0.module, bias, None), nn.Parameter):
            _cut(s0.module, bias, 0, keep)
        m = s0.module
        if is_conv1d(m) and s0.dim == 1:
            m.nf = len(keep)
        elif isinstance(m, nn.Linear):
            m.in_features, m.out_features = m.weight.shape[1], m.weight.shape[0]
    r = a.heads // a.kv_heads
    heads, kv = len(kept_units) * r, len(kept_units)
    kept_heads = [h for u in kept_units for h in range(u * r, (u + 1) * r)]
    m = a.module
    if a.family in ("bloom", "falcon", "t5"):  # per-head biases made outside the layer
        read_kept_heads(m, a.family, a.heads, kept_heads)
    if a.family == "t5":
        m.n_heads, m.inner_dim = heads, heads * a.head_dim
    elif a.family == "falcon":
        m.num_heads = heads
        if not a.shared_kv:
            m.num_kv_heads = kv
        m.num_key_value_groups = heads // m.num_kv_heads
    elif a.family in ("hf", "phi3", "neox", "bloom"):
        # a per-head parameter of the module (gpt-oss's attention sinks) follows its heads
        for pname, p in list(m.named_parameters(recurse=False)):
            if p.ndim == 1 and p.shape[0] == a.heads:
                _cut(m, pname, 0, torch.tensor(kept_heads))
        for attr, value in (
            ("num_heads", heads),
            ("n_heads", heads),
            ("num_attention_heads", heads),
            ("num_key_value_heads", kv),
            ("num_kv_heads", kv),
        ):
            if isinstance(getattr(m, attr, None), int):
                setattr(m, attr, value)
        if a.family == "phi3":  # its forward reads the query width from the shared config
            m.config = copy.copy(m.config)
            m.config.num_attention_heads = heads
    elif a.family == "bert":
        m.num_attention_heads, m.all_head_size = heads, heads * a.head_dim
    elif a.family == "gpt2":
        m.num_heads, m.split_size = heads, heads * a.head_dim
    elif a.family == "timm":
        m.num_heads, m.attn_dim = heads, heads * a.head_dim
    elif a.family == "swin":  # per-head relative position biases; a forward that takes h' heads
        _cut(m, "relative_position_bias_table", 1, torch.tensor(kept_heads))
        m.num_heads = heads
        m.__class__ = pruned_swin_class()
    a.heads, a.kv_heads = heads, kv


def remove_zero_heads(model: nn.Module, keep_one: bool = True) -> dict[str, int]:
    """Delete, in place, every attention unit whose V or O slice is exactly zero (the function
    is unchanged); ``{attention name: units removed}``. Each layer keeps one unit. Heads of
    refused layers (:func:`find`'s ``refuse``) stay and are not counted."""
    removed = {}
    modules = dict(model.named_modules())
    for a in find(model):
        if a.refuse:
            continue
        drop = _zero_units(a)
        if keep_one and len(drop) == a.units:
            drop = drop[1:]
        if not drop:
            continue
        if a.family == "mha":
            if not a.name:  # the model itself: nothing to replace it in
                continue
            kept = [u for u in range(a.units) if u not in set(drop)]
            parent_name, _, child = a.name.rpartition(".")
            setattr(modules[parent_name], child, PrunedMultiheadAttention(a.module, kept))
        else:
            _drop(a, drop)
        removed[a.name] = len(drop)
    return removed


class PrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with some heads removed: ``h' < h`` heads of the original head
    size ``d = E / h`` (``nn.MultiheadAttention`` ties ``d`` to the embedding width, so it
    cannot express this). Same forward signature and outputs; attention weights, when asked
    for, are over the remaining heads.

        q_i = x W_q,iᵀ + b_q,i (likewise k, v)
        out = Σ_i softmax(q_i k_iᵀ/√d + mask) v_i W_o,iᵀ + b_o
    """

    def __init__(self, src: nn.MultiheadAttention, kept_heads: list[int]) -> None:
        super().__init__()
        E, d = src.embed_dim, src.head_dim
        self.embed_dim, self.head_dim, self.num_heads = E, d, len(kept_heads)
        self.kept_heads = list(kept_heads)  # indices into the original heads (3-D masks)
        self.original_heads = src.num_heads
        self.batch_first, self.dropout = src.batch_first, src.dropout
        # nn.Transformer*Layer's fused fast path needs a full-width MHA; this flag routes them
        # to the regular path, which calls forward() below
        self._qkv_same_embed_dim = False
        cols = [h * d + i for h in kept_heads for i in range(d)]
        rows = torch.tensor([j * E + c for j in range(3) for c in cols])
        self.in_proj_weight = nn.Parameter(src.in_proj_weight.detach()[rows].clone())
        b = src.in_proj_bias
        self.in_proj_bias = None if b is None else nn.Parameter(b.detach()[rows].clone())
        o = src.out_proj
        self.out_proj = nn.Linear(len(cols), E, bias=o.bias is not None)
        self.out_proj.to(device=o.weight.device, dtype=o.weight.dtype)
        with torch.no_grad():
            self.out_proj.weight.copy_(o.weight[:, cols])
            if o.bias is not None:
                self.out_proj.bias.copy_(o.bias)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first:  # (L, N, E) → (N, L, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        N, L, _ = query.shape
        S, h, d = key.shape[1], self.num_heads, self.head_dim
        w = self.in_proj_weight.chunk(3)
        b = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
        q, k, v = (
            F.linear(t, wi, bi).view(N, -1, h, d).transpose(1, 2)
            for t, wi, bi in zip((query, key, value), w, b)
        )
        mask = self._mask(attn_mask, key_padding_mask, is_causal, N, L, S, q.dtype, q.device)
        p = self.dropout if self.training else 0.0
        if need_weights:
            a = (q @ k.transpose(-2, -1)) / math.sqrt(d)
            a = (a + mask if mask is not None else a).softmax(-1)
            weights = a
            out = F.dropout(a, p, self.training) @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, h * d))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(1)
        if unbatched:
            out = out.squeeze(1)
            weights = weights.squeeze(0) if weights is not None else None
        return out, weights

    def _mask(self, attn_mask, key_padding_mask, is_causal, N, L, S, dtype, device):
        """One additive float mask ``[N, h', L, S]`` (or broadcastable), or ``None``."""

        def additive(m):
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=dtype, device=device).masked_fill(
                    m, float("-inf")
                )
            return m.to(dtype)

        mask = None
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(L, S, dtype=torch.bool, device=device).triu(1)
        if attn_mask is not None:
            mask = additive(attn_mask)
            if mask.dim() == 3:  # [N·h, L, S]: per original head
                mask = mask.view(N, self.original_heads, L, S)[:, self.kept_heads]
        if key_padding_mask is not None:
            kp = additive(key_padding_mask).view(N, 1, 1, S)
            mask = kp if mask is None else mask + kp
        return mask
