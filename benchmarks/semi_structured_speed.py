"""2:4 on the GPU's sparse tensor cores: per-layer and whole-model latency of a LLaMA-shaped
causal LM, dense fp16 against the same model pruned 2:4 and converted by
:func:`admmprune.deployment.sparse.to_semi_structured`, at batch 1 / 16 / 64 × seq 256, and the
outputs' difference against the masked model run dense (the same zeros, dense kernels).

The weights are random (latency does not depend on them) and pruned 2:4 by magnitude
(``admmprune.prune`` with ``NM(2, 4)`` on every Linear of the decoder blocks; the embeddings
and ``lm_head`` stay dense). Per layer, each distinct Linear shape of one block is timed alone
on a ``[batch·seq, in]`` input; whole-model times are full forwards (logits included).
Paired timing (``admmprune.deployment.latency.measure_paired``, CUDA-synchronised).

    python benchmarks/semi_structured_speed.py                 # needs CUDA (Ampere or newer)
    python benchmarks/semi_structured_speed.py --hidden 4096 --intermediate 11008 --layers 2

``--cpu-plumbing`` runs every step on the CPU with the conversion left out (dense against
dense, float32): it checks this script, and its times mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn

import admmprune as ap
from admmprune.deployment.latency import measure_paired
from admmprune.deployment.sparse import to_semi_structured


def build(args, device: torch.device, dtype: torch.dtype) -> nn.Module:
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128,
        max_position_embeddings=args.seq_len,
    )
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ap.prune(
        model, {"model.layers.*.self_attn.*": ap.NM(2, 4), "model.layers.*.mlp.*": ap.NM(2, 4)}
    )
    return model.to(device, dtype)


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """One Linear per distinct weight shape of the first decoder block, keyed by the names of
    every Linear of that shape (``"self_attn.q_proj/k_proj"``)."""
    by_shape: dict[tuple, list] = {}
    for name, m in model.model.layers[0].named_modules():
        if isinstance(m, nn.Linear):
            by_shape.setdefault(tuple(m.weight.shape), []).append((name, m))
    return {
        "/".join([ms[0][0]] + [n.rpartition(".")[2] for n, _ in ms[1:]]): ms[0][1]
        for ms in by_shape.values()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-plumbing", action="store_true", help="check the script on a CPU")
    p.add_argument("--out", default="benchmarks/results/semi_structured_speed.json")
    args = p.parse_args()
    if args.cpu_plumbing:
        device, dtype = torch.device("cpu"), torch.float32
    elif not torch.cuda.is_available():
        sys.exit(
            "semi_structured_speed.py needs a CUDA GPU with sparse tensor cores (Ampere or "
            "newer); none is here. Run it on one, or pass --cpu-plumbing to check the script."
        )
    else:
        device, dtype = torch.device("cuda"), torch.float16
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (plumbing)"

    dense = build(args, device, dtype)  # the masked model, computed with dense kernels
    sparse = copy.deepcopy(dense)
    left_dense = {} if args.cpu_plumbing else to_semi_structured(sparse)
    print(
        f"{where}, {dtype}; LLaMA {args.layers}×{args.hidden} (MLP {args.intermediate}); "
        f"{len(left_dense)} Linears left dense; medians of {args.rounds} paired runs\n"
    )
    for name, why in left_dense.items():
        print(f"  left dense: {name}: {why}")
    rows = []
    print("| part | batch × seq | dense ms | 2:4 ms | speedup | max |Δ| / max |y| |")
    print("|---|---:|---:|---:|---:|---:|")
    sparse_block = dict(sparse.model.layers[0].named_modules())
    blocks = block_linears(dense)
    for batch in args.batches:
        tokens = batch * args.seq_len
        for names, lin in blocks.items():
            x = torch.randn(tokens, lin.in_features, device=device, dtype=dtype)
            pair = {"dense": lin, "2:4": sparse_block[names.partition("/")[0]]}
            with torch.no_grad():
                ms = measure_paired(pair, x, args.rounds)
                want, got = lin(x), pair["2:4"](x)
            part = f"{names} {tuple(lin.weight.shape)}"
            rows.append(_row(part, batch, args.seq_len, ms, want, got))
        ids = torch.randint(0, args.vocab, (batch, args.seq_len), device=device)
        with torch.no_grad():
            ms = measure_paired({"dense": dense, "2:4": sparse}, ids, args.rounds)
            want, got = dense(ids).logits, sparse(ids).logits
        rows.append(_row("whole model", batch, args.seq_len, ms, want, got))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    two_four = [
        n for n, m in dense.named_modules()
        if isinstance(m, nn.Linear) and m.in_features % 4 == 0
        and int(m.weight.reshape(m.out_features, -1, 4).ne(0).sum(-1).max()) <= 2
    ]  # fmt: skip
    meta = {"device": where, "dtype": str(dtype), "layers": args.layers, "hidden": args.hidden,
            "intermediate": args.intermediate, "two_four_linears": len(two_four),
            "left_dense": left_dense}  # fmt: skip
    out.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    print(f"\nwrote {out}")


def _row(part: str, batch: int, seq: int, ms: dict, want: torch.Tensor, got: torch.Tensor):
    diff = float((got.float() - want.float()).abs().max() / want.float().abs().max())
    row = {"part": part, "batch": batch, "seq": seq, "dense_ms": ms["dense"],
           "sparse_ms": ms["2:4"], "speedup": ms["dense"] / ms["2:4"],
           "rel_diff": diff}  # fmt: skip
    print(f"| {part} | {batch} × {seq} | {ms['dense']:.3f} | {ms['2:4']:.3f} | "
          f"{row['speedup']:.2f}x | {diff:.1e} |", flush=True)  # fmt: skip
    return row


if __name__ == "__main__":
    main()
