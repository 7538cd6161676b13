r"""Per-head biases made outside an attention layer, read by a layer that lost heads.

Some models build one bias per head once, for every layer, outside the attention modules:
Bloom's ALiBi slopes (``alibi [B·H, 1, S]``), Falcon's ALiBi folded into the attention mask
(``[B, H, Q, S]``), T5's relative position bias (``position_bias [1, H, Q, S]``, made by the
first layer of a stack from its ``relative_attention_bias`` table and handed to every later
layer through the layer's outputs). Head ``h`` of a layer adds slice ``h`` of that bias to its
scores ``q_h k_hᵀ/√d``; a layer that keeps heads ``K`` must add exactly slices ``K``::

    scores_h = q_h k_hᵀ/√d + B[:, h],   h ∈ K

:func:`read_kept_heads` records ``K`` (original head indices) on the module and, once per
module, registers hooks that hand it ``B[:, K]`` and, where the layer passes the bias on (T5),
give the full ``B`` back to the next layer. Hooks and ``K`` travel with ``copy.deepcopy``.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

__all__: list[str] = []  # internal: heads._drop uses it

_KEPT = "_admmprune_kept_heads"  # original indices of the heads a module still has
_HEADS = "_admmprune_original_heads"
_STASH = "_admmprune_bias_stash"  # T5: the full bias of the call in flight


def read_kept_heads(module: nn.Module, family: str, heads: int, kept: list[int]) -> None:
    """After removing heads from ``module`` (``heads`` before, ``kept`` of them left, indices
    into its current heads), make it read only its kept heads' bias slices."""
    if not hasattr(module, _KEPT):
        setattr(module, _KEPT, list(range(heads)))
        setattr(module, _HEADS, heads)
        setattr(module, _STASH, [])
        if family == "bloom":
            module.register_forward_pre_hook(_bloom_pre, with_kwargs=True)
        elif family == "falcon":
            module.register_forward_pre_hook(_falcon_pre, with_kwargs=True)
        elif family == "t5":
            module.register_forward_pre_hook(_t5_pre, with_kwargs=True)
            module.register_forward_hook(_t5_post)
            table = getattr(module, "relative_attention_bias", None)
            if isinstance(table, nn.Embedding):  # the first layer makes the bias itself
                table.register_forward_hook(functools.partial(_t5_table_post, module))
    old = getattr(module, _KEPT)
    setattr(module, _KEPT, [old[i] for i in kept])


def _index(module: nn.Module, device) -> torch.Tensor:
    return torch.tensor(getattr(module, _KEPT), device=device)


def _arg(args, kwargs, name: str, position: int):
    return kwargs[name] if name in kwargs else args[position] if len(args) > position else None


def _put(args, kwargs, name: str, position: int, value):
    if name in kwargs or len(args) <= position:
        return args, {**kwargs, name: value}
    return (*args[:position], value, *args[position + 1 :]), kwargs


def _bloom_pre(module, args, kwargs):
    """``alibi [B·H, 1, S]`` → ``[B·|K|, 1, S]``."""
    alibi = _arg(args, kwargs, "alibi", 2)
    H = getattr(module, _HEADS)
    if alibi is None or alibi.shape[0] % H:
        return None
    B = alibi.shape[0] // H
    kept = alibi.view(B, H, *alibi.shape[1:]).index_select(1, _index(module, alibi.device))
    return _put(args, kwargs, "alibi", 2, kept.reshape(-1, *alibi.shape[1:]))


def _falcon_pre(module, args, kwargs):
    """An attention mask carrying ALiBi ``[B, H, Q, S]`` → ``[B, |K|, Q, S]``."""
    mask = _arg(args, kwargs, "attention_mask", 1)
    if not torch.is_tensor(mask) or mask.dim() != 4 or mask.shape[1] != getattr(module, _HEADS):
        return None  # [B, 1, Q, S]: the same for every head
    kept = mask.index_select(1, _index(module, mask.device))
    return _put(args, kwargs, "attention_mask", 1, kept)


def _t5_pre(module, args, kwargs):
    """A ``position_bias`` handed in ``[1, H, Q, S]`` → its kept slices (the full one kept for
    the next layer); none handed in: the layer makes its own (see the two hooks below)."""
    bias = _arg(args, kwargs, "position_bias", 3)
    getattr(module, _STASH).append(bias)
    if bias is None or bias.shape[1] != getattr(module, _HEADS):
        return None
    return _put(args, kwargs, "position_bias", 3, bias.index_select(1, _index(module, bias.device)))


def _t5_table_post(owner, table, args, values):
    """The first layer's bias table lookup ``[Q, S, H]``: the full bias is kept for the next
    layer, the layer itself (``owner``) reads its kept heads."""
    stash = getattr(owner, _STASH)
    if stash and stash[-1] is None:
        stash[-1] = values.permute(2, 0, 1).unsqueeze(0)
    return values.index_select(-1, _index(owner, values.device))


def _t5_post(module, args, out):
    """Pass on the full bias: the one handed in, the one the table made, or zeros (a layer
    without a table makes ``[1, |K|, Q, S]`` zeros)."""
    full = getattr(module, _STASH).pop()
    made = out[1]
    if full is None and torch.is_tensor(made):
        shape = (made.shape[0], getattr(module, _HEADS), *made.shape[2:])
        full = made.new_zeros(shape)
    return (out[0], full, *out[2:])
