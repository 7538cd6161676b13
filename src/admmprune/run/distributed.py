"""Data-parallel runs on PyTorch's own engine: torchrun + DistributedDataParallel.

``torchrun --nproc_per_node N -m admmprune run RECIPE`` (or ``admmprune run RECIPE --nproc N``,
which launches exactly that) starts N processes; each joins the process group from torchrun's
environment (gloo on CPU, nccl on CUDA). Multi-node runs use torchrun's own rendezvous flags
(``--nnodes``, ``--node_rank``, ``--rdzv_endpoint``); nothing here is node-specific.

What holds the ranks together:

- the model trains under ``DistributedDataParallel``; every global batch of B samples is split
  into N contiguous shards of B/N (B must divide by N), so the averaged gradient is the global
  batch's mean gradient; a last partial batch keeps the largest multiple of N samples;
- ADMM's Z and U, SS-Auto's Z, masks and the pruned weights are broadcast from rank 0 after
  every update and every hard prune, so they are identical on every rank by construction;
- only rank 0 writes (checkpoints, metrics, summary, model files) and prints; every rank reads
  the same checkpoint to resume;
- ``summary.json`` records the world size and that the masks were checked equal on all ranks.
"""

from __future__ import annotations

import hashlib
import os

import torch
import torch.distributed as dist

__all__ = ["World", "launch_args", "shard_order"]


class World:
    """This process's place in the run: ``rank``, ``size`` (1 when not distributed)."""

    def __init__(self) -> None:
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def backend(self) -> str | None:
        return dist.get_backend() if dist.is_available() and dist.is_initialized() else None

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        """Join the process group torchrun described (idempotent; no-op when not distributed)."""
        if not self.active or dist.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(self.local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def barrier(self) -> None:
        if self.active and dist.is_initialized():
            dist.barrier()

    @torch.no_grad()
    def broadcast(self, tensors) -> None:
        """Overwrite ``tensors`` on every rank with rank 0's values."""
        if not (self.active and dist.is_initialized()):
            return
        for t in tensors:
            if t.dtype == torch.bool:
                buf = t.to(torch.uint8)
                dist.broadcast(buf, 0)
                t.copy_(buf.bool())
            else:
                dist.broadcast(t, 0)

    def all_equal(self, tensors) -> bool:
        """Whether ``tensors`` hold the same bytes on every rank (a digest is compared)."""
        if not (self.active and dist.is_initialized()):
            return True
        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        mine = torch.tensor(list(h.digest()), dtype=torch.uint8)
        everyone = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(everyone, mine)
        return all(torch.equal(mine, other) for other in everyone)

    def close(self) -> None:
        """Leave the group together: a rank that tears gloo down while another still writes its
        files can abort at exit ("terminate called without an active exception")."""
        if self.active and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def shard_order(order: torch.Tensor, batch_size: int, rank: int, world: int) -> torch.Tensor:
    """This rank's part of a global batch order: each global batch of ``batch_size`` split into
    ``world`` equal contiguous shards (a last partial batch keeps a multiple of ``world``)."""
    if world == 1:
        return order
    b = batch_size // world
    parts = []
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        per = len(batch) // world if len(batch) < batch_size else b
        parts.append(batch[rank * per : (rank + 1) * per])
    return torch.cat(parts) if parts else order[:0]


def batch_split_error(batch_size: int, world: int) -> str | None:
    """Why a global batch of ``batch_size`` cannot run on ``world`` processes, or None."""
    if batch_size % world == 0:
        return None
    return (
        f"data.batch_size {batch_size} does not split over {world} processes; use a multiple "
        f"of {world} (it is the global batch)."
    )


def launch_args(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command line that runs ``admmprune`` with ``argv`` on ``nproc`` processes."""
    import sys

    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", "-m", "admmprune", *argv,
    ]  # fmt: skip
