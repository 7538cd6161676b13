"""Train and evaluate loops: deterministic batch order, resumable mid-epoch, ADMM-aware.

The batch order of epoch ``e`` in stage ``s`` is a permutation seeded by ``(seed, s, e)``, so a
run resumed from any batch sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..solvers.admm import ADMM

__all__ = [
    "EpochResult",
    "evaluate",
    "make_optimizer",
    "make_scheduler",
    "resolve_device",
    "train_epoch",
]


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA if available, else CPU. A CUDA device that is absent is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} asked for, but no CUDA device is available; use auto or cpu."
        )
    return device


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov,
        )
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg, epochs: int):
    """Per-epoch learning-rate schedule over ``epochs`` epochs."""
    if cfg.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    if cfg.name == "step":
        return torch.optim.lr_scheduler.StepLR(opt, cfg.step_size, cfg.gamma)
    if cfg.name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, cfg.milestones, cfg.gamma)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def batch_order(n: int, seed: int, stage: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + stage * 10_007 + epoch)
    return torch.randperm(n, generator=g)


@dataclass
class EpochResult:
    loss: float
    accuracy: float
    penalty: float
    batches: int  # batches done in this epoch so far (all of them unless interrupted)
    interrupted: bool
    sums: dict  # the running sums behind loss/accuracy/penalty: pass back as ``carry``


def _on_terminal() -> bool:
    """Progress bars redraw in place: worth it on a terminal, noise in a log file."""
    return sys.stderr.isatty()


def _batches(dataset: Dataset, order: torch.Tensor, batch_size: int, num_workers: int = 0):
    """Batches of ``dataset`` in ``order``: whole-batch indexing for in-memory tensor datasets,
    a DataLoader (optionally with workers) for everything else."""
    if num_workers == 0 and hasattr(dataset, "batch"):
        return (dataset.batch(order[i : i + batch_size]) for i in range(0, len(order), batch_size))
    return DataLoader(
        dataset, batch_size=batch_size, sampler=order.tolist(), num_workers=num_workers
    )


def _classify(out: torch.Tensor, y: torch.Tensor):
    """Cross-entropy of class logits; ``(loss, hits, count)``."""
    return nn.functional.cross_entropy(out.float(), y), out.argmax(1) == y, len(y)


def _next_token(out, y: torch.Tensor):
    """A causal LM's loss: token ``t+1`` predicted from tokens ``≤ t`` within each window
    (``y`` holds the window's tokens; a Hugging Face output's ``logits``)."""
    logits = getattr(out, "logits", out)[:, :-1].float()
    target = y[:, 1:]
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
    return loss, logits.argmax(-1) == target, target.numel()


#: what a batch's loss is, by ``DataBundle.objective``
OBJECTIVES = {"classify": _classify, "next_token": _next_token}


def _autocast(device: torch.device, amp: bool):
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)  # bf16: no GradScaler needed


def train_epoch(
    model: nn.Module,
    dataset: Dataset,
    optimizer: torch.optim.Optimizer,
    *,
    order: torch.Tensor,
    batch_size: int,
    device: torch.device,
    start_batch: int = 0,
    admm: ADMM | None = None,
    amp: bool = False,
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "",
    should_stop: Callable[[], bool] = lambda: False,
    on_step: Callable[[int], None] | None = None,
    carry: dict | None = None,
    status: Callable[[int], str] | None = None,
    objective: str = "classify",
    clip_grad_norm: float | None = None,
    grad_accum: int = 1,
) -> EpochResult:
    """One epoch over ``dataset`` in ``order`` from batch ``start_batch``; stops early (after a
    whole batch) when ``should_stop()`` turns true. ``on_step(b)`` runs after the optimizer step
    of batch ``b`` (1-based within the epoch).

    ``carry``: the ``sums`` of the interrupted part of this epoch, so the epoch's loss and
    accuracy count all of its batches. ``progress``: a bar on a terminal only, its postfix
    ending with ``status(b)`` (e.g. the whole run's ETA). ``objective``: ``"classify"`` or
    ``"next_token"`` (a causal LM; loss and accuracy per predicted token). ``clip_grad_norm``:
    the gradients' global norm is clipped to it before each step (the penalty's included).
    ``grad_accum``: each batch runs as that many micro-batches, each loss weighted by its share
    of the batch and their gradients summed, so the step is the whole batch's; ADMM's penalty
    (or its gradient, ``mode="grad"``) joins once per step.
    """
    loss_of = OBJECTIVES[objective]
    model.train()
    loader = _batches(dataset, order[start_batch * batch_size :], batch_size, num_workers)
    total = (len(order) + batch_size - 1) // batch_size
    bar = None
    if progress and _on_terminal():
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start_batch, desc=desc, leave=False, dynamic_ncols=True)
    c = carry or {}
    loss_sum, correct, seen = c.get("loss_sum", 0.0), c.get("correct", 0), c.get("seen", 0)
    pen_sum, done = c.get("pen_sum", 0.0), start_batch
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        parts = list(zip(x.chunk(grad_accum), y.chunk(grad_accum), strict=True))
        loss, hits, n = 0.0, 0, 0
        for i, (xi, yi) in enumerate(parts):
            last = i == len(parts) - 1
            with _autocast(device, amp):
                out = model(xi)
            part_loss, part_hits, part_n = loss_of(out, yi)
            share = len(xi) / len(x)  # every sample counts the same (images, fixed windows)
            total_loss = part_loss * share
            if last and admm is not None and admm.mode == "penalty":
                pen = admm.penalty()  # fp32, outside autocast; once per step
                total_loss = total_loss + pen
                pen_sum += float(pen.detach()) * (n + part_n)
            with _accumulating(model, admm, last):
                total_loss.backward()
            loss, hits, n = (
                loss + float(part_loss.detach()) * share,
                hits + int(part_hits.sum()),
                n + part_n,
            )
        if clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
        if on_step is not None:
            on_step(done + 1)
        loss_sum += loss * n
        correct += hits
        seen += n
        done += 1
        if bar is not None:
            bar.update(1)
            extra = {"run": status(done)} if status is not None else {}
            bar.set_postfix(
                loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}", **extra, refresh=False
            )
        if should_stop() and done < total:
            break
    if bar is not None:
        bar.close()
    sums = {"loss_sum": loss_sum, "correct": correct, "seen": seen, "pen_sum": pen_sum}
    n = max(seen, 1)
    return EpochResult(loss_sum / n, correct / n, pen_sum / n, done, done < total, sums)


def _accumulating(model: nn.Module, admm: ADMM | None, last: bool):
    """Around a micro-batch's backward: before the last one, DDP does not all-reduce yet and
    ADMM's ``mode="grad"`` hooks add nothing (the penalty's gradient joins once per step)."""
    if last:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    if hasattr(model, "no_sync"):
        stack.enter_context(model.no_sync())
    if admm is not None:
        stack.enter_context(admm.accumulating())
    return stack


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device,
    batch_size: int = 512,
    amp: bool = False,
    objective: str = "classify",
) -> tuple[float, float]:
    """Top-1 accuracy and mean cross-entropy on ``dataset`` (per predicted token for
    ``objective="next_token"``: the loss is log-perplexity)."""
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in _batches(dataset, torch.arange(len(dataset)), batch_size):
        x, y = x.to(device), y.to(device)
        with _autocast(device, amp):
            out = model(x)
        if objective == "next_token":
            loss, hits, n = _next_token(out, y)
            loss_sum += float(loss) * n
        else:
            out = out.float()
            loss_sum += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            hits, n = out.argmax(1) == y, len(y)
        correct += int(hits.sum())
        seen += n
    return correct / max(seen, 1), loss_sum / max(seen, 1)
