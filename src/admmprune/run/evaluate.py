"""Evaluation of language models: perplexity on a token stream.

The protocol (WikiText-style, as in the SparseGPT / Wanda papers): the test text is tokenised
once into one stream, cut into windows of ``seq_len`` tokens; each window is a separate input
(no state carried over), and every token but the window's first is predicted from the tokens
before it in the window::

    PPL = exp( Σ −log p(t_i | window prefix) / #predicted tokens )

With ``stride < seq_len`` windows overlap (start every ``stride`` tokens) and each window
scores only its last ``stride`` tokens (the first window all but its first): every token is
scored once, with up to ``seq_len − stride`` tokens of extra context. The incomplete tail window
is dropped.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..weights.forward import no_cache

__all__ = ["perplexity"]


def _logits(out) -> torch.Tensor:
    if torch.is_tensor(out):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if not torch.is_tensor(logits):
        raise ValueError(
            f"perplexity needs the model to return logits [batch, seq, vocab] (a tensor or an "
            f"output with .logits); it returned {type(out).__name__}."
        )
    return logits


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    seq_len: int,
    stride: int | None = None,
    *,
    batch_size: int = 8,
) -> float:
    """Perplexity of ``model`` (a causal LM: token ids → logits) on the 1-D token stream
    ``tokens``, with windows of ``seq_len`` every ``stride`` tokens (default ``seq_len``:
    non-overlapping); see the module docstring for the protocol."""
    tokens = torch.as_tensor(tokens)
    if tokens.dtype not in (torch.int32, torch.int64) or tokens.dim() != 1:
        raise ValueError(
            f"tokens must be a 1-D tensor of token ids, got {tokens.dtype} of shape "
            f"{tuple(tokens.shape)}; concatenate the tokenised test text into one stream."
        )
    stride = seq_len if stride is None else stride
    if seq_len < 2 or not 1 <= stride <= seq_len:
        raise ValueError(f"need seq_len >= 2 and 1 <= stride <= seq_len; got {seq_len}, {stride}.")
    if tokens.numel() < seq_len:
        raise ValueError(
            f"the token stream has {tokens.numel()} tokens, fewer than seq_len={seq_len}; "
            "use more text or a shorter seq_len."
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    starts = list(range(0, tokens.numel() - seq_len + 1, stride))
    training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        with no_cache(model):
            for b in range(0, len(starts), batch_size):
                chunk = starts[b : b + batch_size]
                ids = torch.stack([tokens[s : s + seq_len] for s in chunk]).long().to(device)
                logp = _logits(model(ids)).float().log_softmax(-1)[:, :-1]
                target = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # log p(t_i | t_<i)
                for row, s in enumerate(chunk):
                    first = 0 if s == 0 or stride == seq_len else seq_len - 1 - stride
                    scored = target[row, first:]
                    nll -= float(scored.double().sum())
                    count += scored.numel()
    finally:
        model.train(training)
    return math.exp(nll / count)
