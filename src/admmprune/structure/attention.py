"""Attention modules whose head layout is known: one adapter per module family.

:func:`find` maps each attention module of a model to an :class:`Attention`: its projections
(Q, K, V, O, or one fused QKV), which slices of each parameter are head ``h`` (``_Slice``), the
number of units (key/value heads with their query heads under grouped-query attention), the
stand-in forward ``O(Q(x))`` the dependency graph traces instead of attention, and the reason a
family's heads cannot be removed (``refuse``). Families: Hugging Face ``q/k/v/o_proj`` (or
``out_proj`` / ``dense``), DistilBERT ``q_lin…``, fused ``qkv_proj`` (Phi-3), per-head
interleaved ``query_key_value`` (GPT-NeoX, Bloom), Falcon's three fused layouts (multi-query
included), T5's ``q/k/v/o`` (self and cross), BERT ``query/key/value``, GPT-2 ``Conv1D``, timm
``Attention``, ``nn.MultiheadAttention`` and torchvision's Swin. Per-head biases made outside
the layer (ALiBi, T5's relative position bias) follow removed heads (:mod:`.head_bias`).
:mod:`.heads` groups and removes heads; :mod:`.graph` reads the adapters here (never the other
way round).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)
from torch import nn

from ..weights.gemm import is_conv1d

__all__ = ["pruned_swin_class"]


@dataclass
class _Slice:
    """A block of one projection parameter: ``heads`` blocks of ``d`` indices along ``dim``
    starting at ``offset``, head ``h``'s at ``offset + h·stride`` (``stride`` 0: ``d``;
    ``3d`` where each head's q, k and v rows are interleaved, GPT-NeoX, Bloom); ``role``: q, k,
    v, o."""

    module: nn.Module
    attr: str
    dim: int
    offset: int
    role: str
    stride: int = 0
    # Falcon's grouped layout: each key/value head's block of ``period`` rows holds its query
    # heads, then its key, then its value (head ``h``: ``offset + (h // r)·period + (h % r)·d``)
    period: int = 0


@dataclass
class Attention:
    """One attention module's head layout (found by :func:`find`)."""

    name: str
    module: nn.Module
    family: str  # hf, bert, gpt2, timm, mha, swin, phi3, neox, bloom, falcon, t5, mla
    heads: int
    kv_heads: int
    head_dim: int
    slices: list[_Slice] = field(default_factory=list)
    q: nn.Module | None = None  # the module whose output holds the queries (fused: all of qkv)
    q_cols: int = 0  # the query columns of q's output
    o: nn.Module | None = None
    o_inside: bool = True  # BERT's O is a sibling module
    refuse: str | None = None  # why its heads cannot be removed
    # multi-query attention: one key/value head serves every query head, so the units are the
    # query heads (Q rows, O columns) and K, V stay whole
    shared_kv: bool = False

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
        if s.period:
            per = r if s.role in ("q", "o") else 1
            return [
                s.offset + h // per * s.period + h % per * d + i for h in heads for i in range(d)
            ]
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
        if self.family == "t5":  # (output, position bias, weights)
            return y, None, None
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
    """The adapter of module ``m`` (named ``name``, inside ``parent``), or None: not attention,
    or a layout none of the families below has."""
    if isinstance(m, nn.MultiheadAttention):
        return _adapt_mha(name, m)
    if "Cross" in type(m).__name__:
        return None
    c = dict(m.named_children())
    lin = (nn.Linear,)
    fused = _adapt_fused(name, m, c)
    if fused is not None:
        return fused
    if all(isinstance(c.get(k), lin) for k in ("q_lin", "k_lin", "v_lin", "out_lin")):  # DistilBERT
        c = {f"{r}_proj": c[f"{r}_lin"] for r in "qkv"} | {"o_proj": c["out_lin"]}
    if all(isinstance(c.get(k), lin) for k in ("q_proj", "k_proj", "v_proj")):
        return _adapt_hf(name, m, c)
    if all(isinstance(c.get(k), lin) for k in ("query", "key", "value")):
        return _adapt_bert(name, m, c, parent)
    if is_conv1d(c.get("c_attn")) and is_conv1d(c.get("c_proj")) and hasattr(m, "split_size"):
        return _adapt_gpt2(name, m, c)
    if isinstance(c.get("qkv"), lin) and isinstance(c.get("proj"), lin) and hasattr(m, "num_heads"):
        return _adapt_qkv(name, m, c)
    return None


def _adapt_mha(name: str, m: nn.MultiheadAttention) -> Attention:
    """``nn.MultiheadAttention`` with its packed ``in_proj_weight``."""
    a = Attention(name, m, "mha", m.num_heads, m.num_heads, m.head_dim)
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        a.refuse = "only packed in_proj_weight without bias_k/add_zero_attn is supported"
        return a
    E = m.embed_dim
    a.slices = [_Slice(m, "in_proj_weight", 0, i * E, r) for i, r in enumerate("qkv")]
    a.slices.append(_Slice(m.out_proj, "weight", 1, 0, "o"))
    return a


def _adapt_hf(name: str, m: nn.Module, c: dict) -> Attention | None:
    """Hugging Face ``q_proj / k_proj / v_proj`` with ``o_proj`` (``out_proj``, Phi's ``dense``),
    grouped-query included."""
    o = c.get("o_proj", c.get("out_proj", c.get("dense")))  # Phi: dense
    if not isinstance(o, nn.Linear):
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


def _adapt_bert(name: str, m: nn.Module, c: dict, parent: nn.Module | None) -> Attention | None:
    """BERT's ``query / key / value``, the output projection in ``parent.output.dense``."""
    o = getattr(getattr(parent, "output", None), "dense", None)
    heads, d = getattr(m, "num_attention_heads", None), getattr(m, "attention_head_size", None)
    if not isinstance(o, nn.Linear) or not heads or not d:
        return None
    a = Attention(name, m, "bert", heads, heads, d, q=c["query"], o=o, o_inside=False)
    a.slices = [_Slice(c[k], "weight", 0, 0, r) for k, r in zip(("query", "key", "value"), "qkv")]
    a.slices.append(_Slice(o, "weight", 1, 0, "o"))
    a.q_cols = heads * d
    return a


def _adapt_gpt2(name: str, m: nn.Module, c: dict) -> Attention | None:
    """GPT-2's fused ``c_attn`` (``Conv1D``: q, k, v side by side in its columns), ``c_proj``."""
    if getattr(m, "is_cross_attention", False):
        return None
    heads, S = m.num_heads, m.split_size
    a = Attention(name, m, "gpt2", heads, heads, S // heads, q=c["c_attn"], o=c["c_proj"])
    a.slices = [_Slice(c["c_attn"], "weight", 1, i * S, r) for i, r in enumerate("qkv")]
    a.slices.append(_Slice(c["c_proj"], "weight", 0, 0, "o"))
    a.q_cols = S
    return a


def _adapt_qkv(name: str, m: nn.Module, c: dict) -> Attention | None:
    """One ``qkv`` Linear ([q | k | v] rows) and ``proj``: torchvision's Swin, timm's
    ``Attention``."""
    heads = m.num_heads
    if hasattr(m, "relative_position_bias_table"):  # torchvision Swin
        d = c["qkv"].out_features // 3 // heads
        a = Attention(name, m, "swin", heads, heads, d, q=c["qkv"], o=c["proj"])
        a.q_cols = heads * d
        a.slices = [_Slice(c["qkv"], "weight", 0, i * heads * d, r) for i, r in enumerate("qkv")]
        a.slices.append(_Slice(c["proj"], "weight", 1, 0, "o"))
        if type(m) not in _swin_v1_classes():
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


def _adapt_fused(name: str, m: nn.Module, c: dict) -> Attention | None:
    """Fused Q/K/V projections: Phi-3's ``qkv_proj`` ([q | k | v] rows, grouped-query),
    GPT-NeoX's and Bloom's ``query_key_value`` (each head's q, k, v rows side by side),
    Falcon's three layouts; T5's q, k, v, o; a refusal that names multi-head latent attention
    (DeepSeek)."""
    lin = nn.Linear
    if "kv_a_proj_with_mqa" in c or "kv_b_proj" in c:
        a = Attention(name, m, "mla", 1, 1, 1)
        a.refuse = "multi-head latent attention (DeepSeek) shares one compressed key/value"
        return a
    if all(isinstance(c.get(k), lin) for k in "qkvo") and hasattr(m, "has_relative_attention_bias"):
        d = m.key_value_proj_dim  # T5: self and cross attention, a bias made outside
        heads = c["o"].in_features // d
        a = Attention(name, m, "t5", heads, heads, d, q=c["q"], o=c["o"], q_cols=heads * d)
        a.slices = [_Slice(c[r], "weight", 0, 0, r) for r in "qkv"]
        a.slices.append(_Slice(c["o"], "weight", 1, 0, "o"))
        return a
    falcon = _adapt_falcon(name, m, c)
    if falcon is not None:
        return falcon
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
        elif "Bloom" in type(m).__name__:  # ALiBi slopes made outside: see head_bias
            a.family = "bloom"
        elif getattr(m, "alibi", False):
            a.refuse = (
                f"{type(m).__name__}'s ALiBi slopes are made for every head once, outside the "
                "layer, in a way no adapter knows"
            )
        return a
    return None


def _adapt_falcon(name: str, m: nn.Module, c: dict) -> Attention | None:
    """Falcon's ``query_key_value`` in its three layouts: one q, k, v per head interleaved
    (as GPT-NeoX), multi-query ``[q heads | k | v]`` (the units are the query heads) and the
    grouped ``new_decoder_architecture`` (per key/value head: its queries, its key, its value);
    ALiBi, when on, comes in the attention mask (see head_bias)."""
    qkv, o = c.get("query_key_value"), c.get("dense")
    if not (hasattr(m, "new_decoder_architecture") and hasattr(m, "multi_query")):
        return None
    if not (isinstance(qkv, nn.Linear) and isinstance(o, nn.Linear)):
        return None
    d = m.head_dim
    heads, kv = o.in_features // d, m.num_kv_heads
    a = Attention(name, m, "falcon", heads, kv, d, q=qkv, o=o, q_cols=heads * d)
    if m.new_decoder_architecture:
        if kv < 1 or heads % kv or qkv.out_features != (heads + 2 * kv) * d:
            return None
        r = heads // kv
        period = (r + 2) * d
        a.slices = [_Slice(qkv, "weight", 0, off, role, period=period)
                    for role, off in (("q", 0), ("k", r * d), ("v", (r + 1) * d))]  # fmt: skip
    elif m.multi_query:
        if qkv.out_features != (heads + 2) * d:
            return None
        a.kv_heads, a.shared_kv = heads, True
        a.slices = [_Slice(qkv, "weight", 0, 0, "q")]
    else:
        if qkv.out_features != 3 * heads * d:
            return None
        a.slices = [_Slice(qkv, "weight", 0, i * d, r, 3 * d) for i, r in enumerate("qkv")]
    a.slices.append(_Slice(o, "weight", 1, 0, "o"))
    return a


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


_SWIN = "torchvision.models.swin_transformer"


@functools.cache
def pruned_swin_class() -> type[nn.Module]:
    """``PrunedShiftedWindowAttention``: torchvision's Swin ``ShiftedWindowAttention`` after
    head removal, the same module with :func:`_window_attention` as its forward (the head size
    from the weights). Made on first use: importing torchvision's models costs seconds, and a
    model without Swin never needs them."""
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    class PrunedShiftedWindowAttention(ShiftedWindowAttention):
        __doc__ = pruned_swin_class.__doc__

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return _window_attention(self, x)

    # one class under its public name, so pickle and torch.save find it here
    PrunedShiftedWindowAttention.__module__ = __name__
    PrunedShiftedWindowAttention.__qualname__ = "PrunedShiftedWindowAttention"
    return PrunedShiftedWindowAttention


def _swin_v1_classes() -> tuple[type, ...]:
    """The Swin V1 attention classes whose forward :func:`_window_attention` reproduces; none
    while torchvision's Swin is not imported (no module can be one then)."""
    swin = sys.modules.get(_SWIN)
    return () if swin is None else (swin.ShiftedWindowAttention, pruned_swin_class())


def __getattr__(name: str) -> type:
    if name == "PrunedShiftedWindowAttention":
        return pruned_swin_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
