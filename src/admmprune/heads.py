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
included), BERT-style ``query/key/value`` + ``output.dense``, GPT-2's fused ``Conv1D``, timm's
``Attention`` and ``nn.MultiheadAttention`` (replaced by :class:`PrunedMultiheadAttention`).
torchvision's Swin (V1) ``ShiftedWindowAttention``, whose ``shifted_window_attention`` derives
the head size from the input width, gets a subclass whose forward takes the head size from its
weights (:func:`_window_attention`).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention

from ._graph import is_conv1d
from .constraints import _check_keep
from .groups import ChannelGroup

__all__ = [
    "PrunedMultiheadAttention",
    "PrunedShiftedWindowAttention",
    "head_groups",
    "remove_zero_heads",
]


@dataclass
class _Slice:
    """A block of one projection parameter: ``heads`` blocks of ``d`` indices along ``dim``
    starting at ``offset``, head ``h``'s at ``offset + h·stride`` (``stride`` 0: ``d``;
    ``3d`` where each head's q, k and v rows are interleaved, GPT-NeoX); ``role``: q, k, v, o."""

    module: nn.Module
    attr: str
    dim: int
    offset: int
    role: str
    stride: int = 0


@dataclass
class Attention:
    """One attention module's head layout (found by :func:`find`)."""

    name: str
    module: nn.Module
    family: str  # hf, bert, gpt2, timm, mha, swin
    heads: int
    kv_heads: int
    head_dim: int
    slices: list[_Slice] = field(default_factory=list)
    q: nn.Module | None = None  # the module whose output holds the queries (fused: all of qkv)
    q_cols: int = 0  # the query columns of q's output
    o: nn.Module | None = None
    o_inside: bool = True  # BERT's O is a sibling module
    refuse: str | None = None  # why its heads cannot be removed

    @property
    def units(self) -> int:
        return self.kv_heads

    def projections(self) -> list[nn.Module]:
        """The modules whose output rows are head dimensions (Q, K, V)."""
        return [s.module for s in self.slices if s.role != "o"]

    def indices(self, s: _Slice, unit: int) -> list[int]:
        """``s``'s indices of unit ``unit`` (a key/value head and its query heads)."""
        d, r = self.head_dim, self.heads // self.kv_heads
        heads = range(unit * r, (unit + 1) * r) if s.role in ("q", "o") else [unit]
        step = s.stride or d
        return [s.offset + h * step + i for h in heads for i in range(d)]

    def params(self, names: dict) -> Iterator[tuple[str, int, _Slice]]:
        """``(parameter name, dim, slice)`` for every weight and bias slice."""
        for s in self.slices:
            prefix = f"{names[s.module]}." if names[s.module] else ""
            yield f"{prefix}{s.attr}", s.dim, s
            bias = "in_proj_bias" if s.attr == "in_proj_weight" else "bias"
            if s.role != "o" and isinstance(getattr(s.module, bias, None), nn.Parameter):
                yield f"{prefix}{bias}", 0, s

    # the stand-in forward the dependency graph traces ------------------------------------------
    def stand_in(self, *args, **kwargs):
        x = kwargs.get("hidden_states", kwargs.get("x", args[0] if args else None))
        y = self.q(x)[..., : self.q_cols]
        if self.o_inside:
            y = self.o(y)
        return y if self.family in ("timm", "swin") else (y, None)


def _get(module, *names, default=None):
    for n in names:
        v = getattr(module, n, None)
        if v is not None:
            return v
    cfg = getattr(module, "config", None)
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def _adapt(name: str, m: nn.Module, parent: nn.Module | None) -> Attention | None:
    kind = type(m).__name__
    if isinstance(m, nn.MultiheadAttention):
        a = Attention(name, m, "mha", m.num_heads, m.num_heads, m.head_dim)
        if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
            a.refuse = "only packed in_proj_weight without bias_k/add_zero_attn is supported"
            return a
        E = m.embed_dim
        a.slices = [_Slice(m, "in_proj_weight", 0, i * E, r) for i, r in enumerate("qkv")]
        a.slices.append(_Slice(m.out_proj, "weight", 1, 0, "o"))
        return a
    if "Cross" in kind:
        return None
    c = dict(m.named_children())
    lin = (nn.Linear,)
    fused = _adapt_fused(name, m, c)
    if fused is not None:
        return fused
    if all(isinstance(c.get(k), lin) for k in ("q_lin", "k_lin", "v_lin", "out_lin")):  # DistilBERT
        c = {f"{r}_proj": c[f"{r}_lin"] for r in "qkv"} | {"o_proj": c["out_lin"]}
    if all(isinstance(c.get(k), lin) for k in ("q_proj", "k_proj", "v_proj")):
        o = c.get("o_proj", c.get("out_proj", c.get("dense")))  # Phi: dense
        if not isinstance(o, lin):
            return None
        # counts from the weights: after compaction the shared config no longer tells them
        heads = _get(m, "num_heads", "num_attention_heads", "n_heads")
        head_dim = (
            getattr(m, "head_dim", None)
            or getattr(m, "attention_head_size", None)
            or c["q_proj"].out_features // max(heads or 1, 1)
        )
        heads = c["q_proj"].out_features // head_dim
        kv = c["k_proj"].out_features // head_dim
        if c["q_proj"].out_features != heads * head_dim or not kv or heads % kv:
            return None
        a = Attention(name, m, "hf", heads, kv, head_dim, q=c["q_proj"], o=o)
        a.slices = [_Slice(c[f"{r}_proj"], "weight", 0, 0, r) for r in "qkv"]
        a.slices.append(_Slice(o, "weight", 1, 0, "o"))
        a.q_cols = heads * head_dim
        norm = getattr(c.get("q_norm"), "weight", None)
        if norm is not None and norm.numel() != head_dim:
            a.refuse = (
                f"its q_norm / k_norm normalise the whole projection ({norm.numel()} wide, "
                f"OLMo-2 style), so removing a head would change every other head's queries"
            )
        return a
    if all(isinstance(c.get(k), lin) for k in ("query", "key", "value")):
        o = getattr(getattr(parent, "output", None), "dense", None)
        heads, d = getattr(m, "num_attention_heads", None), getattr(m, "attention_head_size", None)
        if not isinstance(o, lin) or not heads or not d:
            return None
        a = Attention(name, m, "bert", heads, heads, d, q=c["query"], o=o, o_inside=False)
        a.slices = [
            _Slice(c[k], "weight", 0, 0, r) for k, r in zip(("query", "key", "value"), "qkv")
        ]
        a.slices.append(_Slice(o, "weight", 1, 0, "o"))
        a.q_cols = heads * d
        return a
    if is_conv1d(c.get("c_attn")) and is_conv1d(c.get("c_proj")) and hasattr(m, "split_size"):
        if getattr(m, "is_cross_attention", False):
            return None
        heads, S = m.num_heads, m.split_size
        a = Attention(name, m, "gpt2", heads, heads, S // heads, q=c["c_attn"], o=c["c_proj"])
        a.slices = [_Slice(c["c_attn"], "weight", 1, i * S, r) for i, r in enumerate("qkv")]
        a.slices.append(_Slice(c["c_proj"], "weight", 0, 0, "o"))
        a.q_cols = S
        return a
    if isinstance(c.get("qkv"), lin) and isinstance(c.get("proj"), lin) and hasattr(m, "num_heads"):
        heads = m.num_heads
        if hasattr(m, "relative_position_bias_table"):  # torchvision Swin
            d = c["qkv"].out_features // 3 // heads
            a = Attention(name, m, "swin", heads, heads, d, q=c["qkv"], o=c["proj"])
            a.q_cols = heads * d
            a.slices = [
                _Slice(c["qkv"], "weight", 0, i * heads * d, r) for i, r in enumerate("qkv")
            ]
            a.slices.append(_Slice(c["proj"], "weight", 1, 0, "o"))
            if type(m) not in (ShiftedWindowAttention, PrunedShiftedWindowAttention):
                a.refuse = f"{type(m).__name__} (Swin V2's cosine attention) is not supported"
            return a
        d = getattr(m, "head_dim", None)
        if not d or c["qkv"].out_features != 3 * heads * d:
            return None
        a = Attention(name, m, "timm", heads, heads, d, q=c["qkv"], o=c["proj"])
        a.slices = [_Slice(c["qkv"], "weight", 0, i * heads * d, r) for i, r in enumerate("qkv")]
        a.slices.append(_Slice(c["proj"], "weight", 1, 0, "o"))
        a.q_cols = heads * d
        if getattr(m, "gate", None) is not None or not isinstance(
            getattr(m, "norm", nn.Identity()), nn.Identity
        ):
            a.refuse = "timm Attention with a gate or scale_norm is not supported"
        return a
    return None


def _adapt_fused(name: str, m: nn.Module, c: dict) -> Attention | None:
    """Fused Q/K/V projections: Phi-3's ``qkv_proj`` ([q | k | v] rows, grouped-query),
    GPT-NeoX's ``query_key_value`` (each head's q, k, v rows side by side); refusals that
    name why for Bloom / Falcon (ALiBi slopes, or key/value heads shared by all queries)
    and multi-head latent attention (DeepSeek)."""
    lin = nn.Linear
    if "kv_a_proj_with_mqa" in c or "kv_b_proj" in c:
        a = Attention(name, m, "mla", 1, 1, 1)
        a.refuse = "multi-head latent attention (DeepSeek) shares one compressed key/value"
        return a
    if all(isinstance(c.get(k), lin) for k in "qkvo") and hasattr(m, "relative_attention_bias"):
        a = Attention(name, m, "t5", 1, 1, 1)  # traced as it is (no stand-in), never pruned
        a.slices = [_Slice(c[r], "weight", 0, 0, r) for r in "qkv"]
        a.refuse = (
            f"{type(m).__name__}'s relative position bias is made for every head in the first "
            "layer and shared by all layers, so one layer cannot lose heads alone"
        )
        return a
    qkv, o, d = c.get("qkv_proj"), c.get("o_proj"), getattr(m, "head_dim", None)
    if isinstance(qkv, lin) and isinstance(o, lin) and d:
        heads = o.in_features // d
        kv = (qkv.out_features - heads * d) // (2 * d)
        if kv < 1 or heads % kv or qkv.out_features != (heads + 2 * kv) * d:
            return None
        a = Attention(name, m, "phi3", heads, kv, d, q=qkv, o=o, q_cols=heads * d)
        offsets = {"q": 0, "k": heads * d, "v": (heads + kv) * d}
        a.slices = [_Slice(qkv, "weight", 0, off, r) for r, off in offsets.items()]
        a.slices.append(_Slice(o, "weight", 1, 0, "o"))
        return a
    qkv, o = c.get("query_key_value"), c.get("dense")
    if isinstance(qkv, lin) and isinstance(o, lin):
        d = getattr(m, "head_size", None) or getattr(m, "head_dim", None) or 1
        heads = o.in_features // d
        a = Attention(name, m, "neox", heads, heads, d, q=qkv, o=o, q_cols=heads * d)
        a.slices = [_Slice(qkv, "weight", 0, i * d, r, 3 * d) for i, r in enumerate("qkv")]
        a.slices.append(_Slice(o, "weight", 1, 0, "o"))
        if qkv.out_features != 3 * heads * d or heads * d != o.in_features:
            a.refuse = (
                f"{type(m).__name__}'s fused query_key_value is not one q, k, v per head "
                "(multi-query or grouped layout: its key/value heads serve every query head)"
            )
        elif "Bloom" in type(m).__name__ or getattr(m, "alibi", False):
            a.refuse = (
                f"{type(m).__name__}'s ALiBi slopes are made for every head once, outside the "
                "layer, so a layer with fewer heads would get the wrong slopes"
            )
        return a
    return None


def find(model: nn.Module) -> list[Attention]:
    """Every attention module of ``model`` whose head layout is known."""
    modules = dict(model.named_modules())
    out = []
    for name, m in modules.items():
        parent = modules.get(name.rpartition(".")[0]) if name else None
        a = _adapt(name, m, parent)
        if a is not None:
            out.append(a)
    return out


@contextlib.contextmanager
def stand_in(attention: list[Attention]) -> Iterator[None]:
    """Each attention module (but ``nn.MultiheadAttention``, which Torch-Pruning models itself)
    runs ``O(Q(x))`` instead of attention while the dependency graph is traced."""
    patched = [a for a in attention if a.family != "mha" and a.q is not None]
    for a in patched:
        a.module.forward = a.stand_in
    try:
        yield
    finally:
        for a in patched:
            del a.module.forward


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
    for u in range(a.units):
        for role in ("v", "o"):
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
    m = a.module
    if a.family in ("hf", "phi3", "neox"):
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
        kept_heads = torch.tensor([u for u in range(a.units) if u not in set(drop)])
        _cut(m, "relative_position_bias_table", 1, kept_heads)
        m.num_heads = heads
        m.__class__ = PrunedShiftedWindowAttention
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


# Swin ------------------------------------------------------------------------------------------
def _regions(n: int, window: int, shift: int) -> torch.Tensor:
    """Region label of each of ``n`` positions after a cyclic shift by ``shift``: positions that
    wrapped around are not neighbours of the rest (Swin's shifted-window mask)."""
    r = torch.zeros(n)
    if shift:
        r[n - window : n - shift] = 1
        r[n - shift :] = 2
    return r


def _window_attention(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Swin's (shifted) window attention on ``x`` [B, H, W, C] with ``m.num_heads`` heads of the
    size the weights say (``qkv`` rows / 3 / heads), not ``C / heads``: pad to whole windows,
    roll by the shift, attend within each window (+ relative position bias, −100 between
    regions that the roll brought together), project, undo the roll and the padding."""
    B, H, W, C = x.shape
    wh, ww = m.window_size
    h = m.num_heads
    d = m.qkv.out_features // 3 // h
    pad_b, pad_r = (-H) % wh, (-W) % ww
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    Hp, Wp = H + pad_b, W + pad_r
    sh = (0 if wh >= Hp else m.shift_size[0], 0 if ww >= Wp else m.shift_size[1])
    if any(sh):
        x = torch.roll(x, (-sh[0], -sh[1]), (1, 2))
    nh, nw, N = Hp // wh, Wp // ww, wh * ww
    win = x.view(B, nh, wh, nw, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B * nh * nw, N, C)
    q, k, v = m.qkv(win).view(-1, N, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q * d**-0.5) @ k.transpose(-2, -1) + m.get_relative_position_bias()
    if any(sh):
        label = _regions(Hp, wh, sh[0])[:, None] * 3 + _regions(Wp, ww, sh[1])[None, :]
        label = label.view(nh, wh, nw, ww).permute(0, 2, 1, 3).reshape(nh * nw, N)
        mask = (label[:, None, :] != label[:, :, None]).to(attn.dtype) * -100.0
        attn = (attn.view(B, nh * nw, h, N, N) + mask.to(attn.device)[None, :, None]).view(
            -1, h, N, N
        )
    attn = F.dropout(attn.softmax(-1), m.attention_dropout, m.training)
    out = (attn @ v).transpose(1, 2).reshape(-1, N, h * d)
    out = F.dropout(m.proj(out), m.dropout, m.training)
    out = out.view(B, nh, nw, wh, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    if any(sh):
        out = torch.roll(out, sh, (1, 2))
    return out[:, :H, :W].contiguous()


class PrunedShiftedWindowAttention(ShiftedWindowAttention):
    """torchvision's Swin ``ShiftedWindowAttention`` after head removal: the same module with
    :func:`_window_attention` as its forward (the head size from the weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _window_attention(self, x)
