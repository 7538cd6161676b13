"""Is a pruned language model smaller on disk and faster at generating? (issue 30)

For each model and sparsity (per-row unstructured by magnitude, and 2:4), side by side in one
run: ``generate`` (batch 1, greedy, KV cache) of the masked dense model and of the same model
with :func:`admmprune.deployment.decode.to_sparse_decode` (each pruned Linear on the sparse CPU
kernel where its paired timing is faster), alternated ``--repeats`` times, medians; the greedy
tokens of the two must be equal. Per layer: the dense and sparse GEMV's milliseconds against
the time the bytes they must read take at the machine's measured read bandwidth (a streaming
sum over 1 GiB). Checkpoint bytes: :func:`admmprune.save_sparse` with fp16 values against
``save_pretrained`` in fp16 (the whole checkpoint, and the decoder blocks alone).

Models: a LLaMA-shaped model (``--hidden``, intermediate 2.6875×, ``--layers`` blocks, random
weights: speed does not depend on what was learned), and the benchmark LM (``--lm``: a
``save_pretrained`` folder, e.g. admm_lm.py's ``dense/``) when given.

    python benchmarks/sparse_decode.py [--hidden 4096] [--layers 2] [--new-tokens 128]
        [--lm benchmarks/results/admm_lm/dense] [--out benchmarks/results/sparse_decode]

On CUDA (``--device cuda``) the sparse form is 2:4 through ``to_semi_structured`` (fp16).
Writes ``OUT/sparse_decode.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import admmprune as ap
from admmprune.deployment.decode import SparseDecodeLinear, kernel_available, to_sparse_decode

HERE = Path(__file__).resolve().parent


def llama_shaped(hidden: int, layers: int, vocab: int, seed: int):
    import transformers as tr

    torch.manual_seed(seed)
    cfg = tr.LlamaConfig(vocab_size=vocab, hidden_size=hidden,
                         intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers,
                         num_attention_heads=max(hidden // 128, 1),
                         num_key_value_heads=max(hidden // 128, 1), max_position_embeddings=1024,
                         tie_word_embeddings=False)  # fmt: skip
    return tr.LlamaForCausalLM(cfg).eval()


def read_bandwidth(device: str) -> float:
    """Bytes per second a streaming sum over 1 GiB reads (the GEMV's ceiling)."""
    x = torch.ones(1 << 28, device=device)  # 1 GiB of fp32
    x.sum()
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        if device == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(ts)


def generate_seconds(model, ids, new_tokens: int, device: str) -> tuple[float, torch.Tensor]:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, use_cache=True)  # fmt: skip
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def checkpoint_bytes(masked, blocks_prefix: str) -> dict:
    from safetensors import safe_open

    with tempfile.TemporaryDirectory() as tmp:
        sparse = ap.save_sparse(masked, Path(tmp) / "s", dtype=torch.float16)
        # the blocks' share read from the file itself: each tensor's stored bytes
        with safe_open(str(next((Path(tmp) / "s").glob("*.safetensors"))), "pt") as f:
            sparse_blocks = sum(f.get_tensor(k).nbytes for k in f.keys()  # noqa: SIM118
                                if k.startswith(blocks_prefix))  # fmt: skip
        half = copy.deepcopy(masked).half()
        half.save_pretrained(Path(tmp) / "d", safe_serialization=True)
        dense = sum(f.stat().st_size for f in (Path(tmp) / "d").glob("*.safetensors"))
    state = masked.state_dict()
    blocks = sum(t.numel() * 2 for n, t in state.items() if n.startswith(blocks_prefix))
    return {"sparse_bytes": sparse, "dense_fp16_bytes": dense, "ratio": sparse / dense,
            "blocks_fp16_bytes": blocks, "blocks_sparse_bytes": sparse_blocks,
            "blocks_ratio": sparse_blocks / blocks}  # fmt: skip


def layer_rows(model, bandwidth: float) -> list[dict]:
    rows = []
    report = model.decode_report
    modules = dict(model.named_modules())
    for name, (dense_ms, sparse_ms) in report.timings_ms.items():
        m = modules[name]
        if isinstance(m, SparseDecodeLinear):
            nnz, n = m.val.numel(), m.in_features * m.out_features
            sparse_bytes = nnz * (4 + m.col.element_size()) + m.ptr.numel() * 8
        else:
            nnz, n = int((m.weight != 0).sum()), m.weight.numel()
            k = m.in_features
            sparse_bytes = nnz * (4 + (2 if k <= 1 << 16 else 4)) + (m.out_features + 1) * 8
        rows.append({
            "layer": name, "kept": nnz / n, "dense_ms": dense_ms, "sparse_ms": sparse_ms,
            "chosen": "sparse" if name in report.sparse else "dense",
            "dense_efficiency": n * 4 / bandwidth * 1e3 / dense_ms,
            "sparse_efficiency": sparse_bytes / bandwidth * 1e3 / sparse_ms,
        })  # fmt: skip
    return rows


def one_model(label: str, dense, args, settings, bandwidth: float) -> list[dict]:
    prefix = "model.layers" if hasattr(dense, "model") and hasattr(dense.model, "layers") else ""
    spec_key = f"{prefix}.*" if prefix else "*"
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, dense.config.vocab_size, (1, args.prompt), generator=g).to(args.device)
    out = []
    for setting in settings:
        constraint = ap.NM(2, 4) if setting == "2:4" else ap.Unstructured(
            1 - int(setting.rstrip("%")) / 100, per_row=True)  # fmt: skip
        masked = copy.deepcopy(dense)
        ap.prune(masked, {spec_key: constraint})
        masked.to(args.device)
        if not args.decode:
            row = {"model": label, "setting": setting, "device": args.device,
                   "checkpoint": checkpoint_bytes(masked, prefix)}  # fmt: skip
            out.append(row)
            print(_line(row), flush=True)
            del masked
            continue
        fast = copy.deepcopy(masked)
        t0 = time.perf_counter()
        if args.device == "cuda":
            from admmprune.deployment.sparse import to_semi_structured

            masked.half()
            fast.half()
            left = to_semi_structured(fast)
            chosen = sum(1 for n, m in fast.named_modules() if isinstance(m, nn.Linear)) - len(left)
            lrows = []
        else:
            to_sparse_decode(fast, batch=1, rounds=args.rounds)
            chosen = len(fast.decode_report.sparse)
            lrows = layer_rows(fast, bandwidth)
        convert_s = time.perf_counter() - t0
        dense_s, sparse_s, same = [], [], True
        with torch.no_grad():
            for _ in range(args.repeats):
                s, a = generate_seconds(masked, ids, args.new_tokens, args.device)
                dense_s.append(s)
                s, b = generate_seconds(fast, ids, args.new_tokens, args.device)
                sparse_s.append(s)
                same &= torch.equal(a, b)
        row = {
            "model": label, "setting": setting, "device": args.device,
            "threads": torch.get_num_threads(), "new_tokens": args.new_tokens,
            "dense_tokens_per_s": args.new_tokens / statistics.median(dense_s),
            "sparse_tokens_per_s": args.new_tokens / statistics.median(sparse_s),
            "greedy_tokens_equal": same, "layers_sparse": chosen, "convert_seconds": convert_s,
            "layers": lrows,
        }  # fmt: skip
        row["speedup"] = row["sparse_tokens_per_s"] / row["dense_tokens_per_s"]
        if lrows:
            sp = [r for r in lrows if r["chosen"] == "sparse"]
            row["median_sparse_efficiency"] = (
                statistics.median(r["sparse_efficiency"] for r in sp) if sp else None)  # fmt: skip
            row["median_dense_efficiency"] = statistics.median(r["dense_efficiency"] for r in lrows)
        if args.checkpoint and args.device == "cpu":
            row["checkpoint"] = checkpoint_bytes(masked, prefix)
        out.append(row)
        print(_line(row), flush=True)
        del masked, fast
    return out


def _line(r: dict) -> str:
    ck = r.get("checkpoint", {})
    eff = r.get("median_sparse_efficiency")
    eff = "" if eff is None else f"{eff:.2f}"
    ratio = f"{ck['ratio']:.3f} / {ck['blocks_ratio']:.3f}" if ck else ""
    if "speedup" not in r:  # --no-decode
        return f"| {r['model']} | {r['setting']} | | | | | | {ratio} | |"
    return (f"| {r['model']} | {r['setting']} | {r['dense_tokens_per_s']:.2f} | "
            f"{r['sparse_tokens_per_s']:.2f} | {r['speedup']:.2f}x | {r['layers_sparse']} | "
            f"{eff} | {ratio} | {'yes' if r['greedy_tokens_equal'] else 'NO'} |")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--lm", type=Path, help="a save_pretrained causal LM (the benchmark's)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15, help="paired timings per layer")
    p.add_argument("--sparsities", default="50,70,90,95")
    p.add_argument("--no-nm", dest="nm", action="store_false")
    p.add_argument("--no-checkpoint", dest="checkpoint", action="store_false")
    p.add_argument(
        "--no-decode", dest="decode", action="store_false",
        help="checkpoint bytes only (no kernel conversion, no generate): for models too large to "
        "time here",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "results" / "sparse_decode")
    args = p.parse_args()
    if not args.decode and (not args.checkpoint or args.device != "cpu"):
        p.error("--no-decode measures the checkpoint bytes only: on the CPU, without "
                "--no-checkpoint")  # fmt: skip
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.device == "cpu":
        ok, why = kernel_available()
        if not ok:
            raise SystemExit(f"the decode kernel is not available here: {why}")
        settings = [f"{s}%" for s in args.sparsities.split(",")] + (["2:4"] if args.nm else [])
    else:
        if not torch.cuda.is_available():
            raise SystemExit("sparse_decode.py --device cuda: no CUDA device is available here.")
        settings = ["2:4"]
    bandwidth = read_bandwidth(args.device)
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s, {torch.get_num_threads()} threads")
    print("| model | setting | dense tok/s | sparse tok/s | speedup | sparse layers | "
          "GEMV / bytes limit | ckpt ratio (all / blocks) | greedy equal |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    rows = []
    models = [(f"LLaMA-shaped {args.layers}x{args.hidden}", lambda: llama_shaped(
        args.hidden, args.layers, args.vocab, args.seed))]  # fmt: skip
    if args.lm:
        import transformers as tr

        load = lambda: tr.AutoModelForCausalLM.from_pretrained(args.lm).eval()  # noqa: E731
        models.insert(0, (f"benchmark LM ({args.lm.name})", load))
    for label, build in models:
        rows += one_model(label, build(), args, settings, bandwidth)
    result = {"bandwidth_bytes_per_s": bandwidth, "threads": torch.get_num_threads(),
              "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}  # fmt: skip
    (args.out / "sparse_decode.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out / 'sparse_decode.json'}")


if __name__ == "__main__":
    main()
