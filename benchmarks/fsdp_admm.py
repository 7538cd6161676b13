"""ADMM on a model sharded by FSDP2 (``fully_shard``) under torchrun, checked against one process.

    torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_admm.py               # CPU, gloo
    torchrun --standalone --nproc_per_node N benchmarks/fsdp_admm.py --device cuda # N GPUs, nccl

A tiny LLaMA (transformers) is sharded layer by layer and trained a few Adam steps on random
tokens with ADMM (mode ``grad``: the penalty's gradient joins the reduced gradient of each
shard), per-tensor Unstructured at 90 % on the MLPs and 2:4 on attention, then hard-pruned.
Each rank also trains the unsharded model on the same tokens and compares its shard's masks
with the matching rows of the one-process masks. Prints a table; ``--out DIR`` writes JSON.
Exit status 1 when a mask differs.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import admmprune as ap

SPEC = {"model.layers.*.mlp.*_proj": ap.Unstructured(0.1), "*.self_attn.*_proj": ap.NM(2, 4)}


def _model(device: torch.device):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return tf.LlamaForCausalLM(cfg).to(device)


def _train(model, device, steps: int) -> tuple[dict, float]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    admm = ap.ADMM(model, SPEC, rho=1e-2, mode="grad", metric=opt)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 128, (4, 32), generator=g).to(device)
    tic = time.perf_counter()
    for step in range(steps):
        loss = model(tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 4 == 3:
            admm.update()
    masks = admm.prune()
    return {n: m.cpu() for n, m in masks.items()}, time.perf_counter() - tic


def main() -> None:
    ap_ = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap_.add_argument("--device", default="cpu")
    ap_.add_argument("--steps", type=int, default=8)
    ap_.add_argument("--out", default=None)
    args = ap_.parse_args()
    device = torch.device(args.device)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fsdp_admm.py --device cuda: no CUDA device is available here.")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    model = _model(device)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    sharded, seconds = _train(model, device, args.steps)
    reference, ref_seconds = _train(_model(device), device, args.steps)
    rows = []
    for name, mask in sharded.items():
        block = reference[name].chunk(world)[rank]
        differ = int((block != mask).sum()) if block.shape == mask.shape else -1
        rows.append({"name": name, "rows": tuple(mask.shape), "differ": differ,
                     "kept": float(mask.float().mean())})  # fmt: skip
    bad = sum(r["differ"] != 0 for r in rows)
    flag = torch.tensor([bad], device=device)
    dist.all_reduce(flag)
    if rank == 0:
        print(f"{'parameter':<40} {'shard':>12} {'kept':>6} {'differ':>7}")
        for r in rows:
            print(f"{r['name']:<40} {r['rows']!s:>12} {r['kept']:6.3f} {r['differ']:7d}")
        equal = int(flag) == 0
        print(f"world {world} on {device.type}: masks equal to one process on every rank: {equal}; "
              f"{seconds:.1f} s sharded, {ref_seconds:.1f} s unsharded")  # fmt: skip
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "fsdp_admm.json"), "w") as f:
                json.dump({"world": world, "device": device.type, "equal": int(flag) == 0,
                           "rank0": rows, "seconds": seconds}, f, indent=1)  # fmt: skip
    dist.destroy_process_group()
    raise SystemExit(1 if int(flag) else 0)


if __name__ == "__main__":
    main()
