"""ADMM on a language model's own loss (issue 28): one-shot vs training-time pruning of a small
causal LM at the same number of training tokens.

The dense model, tokenizer and corpus are ``oneshot_lm.py``'s (English documentation already on
the machine, split by document; a LLaMA-architecture LM trained here, cached in ``--out``). Each
method runs as an LM recipe through ``admmprune``'s own runner (``method``, ``admm.*`` keys),
from the same dense model, on the same fine-tuning text (the first ``--tokens`` tokens of the
``--fine-text`` split: train, seen in pretraining, or validation, never trained on;
non-overlapping windows of ``--seq-len``, shuffled by the seed), every training method for
``--epochs`` epochs in all (compression + masked retraining), so all see the same tokens:

- ``oneshot sparsegpt`` / ``oneshot admm``: layer-wise, no training;
- ``oneshot admm + FT``: then masked fine-tuning for all the epochs;
- ``gradual magnitude``: the cubic schedule over the compression epochs, then retraining;
- ``ADMM``: global ADMM from the magnitude projection; ``ADMM metric``: objective-aware
  (Adam's second moment); ``ADMM metric ← oneshot``: started from the one-shot ADMM solution.

Perplexity of the test split (non-overlapping ``--seq-len`` windows) of each run's saved
``model/``, seconds, peak RSS (each run in a process of its own), ADMM state bytes per
constrained weight; ``results.md``, ``results.json``
and ``perplexity_vs_sparsity.png`` in ``--out``.

    python benchmarks/admm_lm.py [--train-minutes 20] [--sparsities 70,90] [--epochs 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import resource
import time
from pathlib import Path

import torch
import yaml

from admmprune.run.evaluate import perplexity
from admmprune.run.parse import parse_recipe
from admmprune.run.pipeline import prepare, run

HERE = Path(__file__).resolve().parent


def _oneshot_lm():
    """oneshot_lm.py beside this script: the corpus, tokenizer and dense model."""
    spec = importlib.util.spec_from_file_location("oneshot_lm", HERE / "oneshot_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


METHODS = ("oneshot sparsegpt", "oneshot admm", "oneshot admm + FT", "gradual magnitude",
           "ADMM", "ADMM metric", "ADMM metric <- oneshot")  # fmt: skip


def recipe(method: str, args, setting: str, paths: dict, out: Path) -> dict:
    constraint = {"nm": "2:4"} if setting == "2:4" else {
        "unstructured": 1 - int(setting.rstrip("%")) / 100, "per_row": True}  # fmt: skip
    adamw = {"name": "adamw", "lr": args.lr}
    r = {
        "seed": args.seed, "output_dir": str(out), "device": args.device, "progress": False,
        "model": {"hf": str(paths["dense"])},
        "data": {"name": "text", "path": str(paths["text"]), "tokenizer": str(paths["tokenizer"]),
                 "seq_len": args.seq_len, "batch_size": args.batch,
                 "test_fraction": paths["test_fraction"]},
        "default_constraint": constraint,
        "oneshot": {"solver": "admm", "samples": args.samples, "batch_size": 16},
    }  # fmt: skip
    compress, retrain = args.epochs - args.retrain, args.retrain
    if method.startswith("oneshot"):
        r["method"] = "oneshot"
        r["oneshot"]["solver"] = method.split()[1]
        if method.endswith("+ FT"):
            r["retrain"] = {"epochs": args.epochs, "optimizer": adamw}
        return r
    r["method"] = "gradual" if method.startswith("gradual") else "admm"
    r["admm"] = {"epochs": compress, "optimizer": adamw, "clip_grad_norm": 1.0,
                 "updates_per_epoch": args.updates, "rho": args.rho, "rho_growth": args.rho_growth,
                 "lr_reset": False}  # fmt: skip
    if "metric" in method:
        r["admm"]["metric"] = "adam"
    if "oneshot" in method:
        r["admm"]["init"] = "oneshot"
    r["retrain"] = {"epochs": retrain, "optimizer": adamw}
    return r


def _run_recipe(r: dict | None, conn) -> None:
    """One method's run in a process of its own, so its peak RSS is its own: sends back the
    summary, the seconds and the peak RSS in bytes (``r=None``: imports only)."""
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    summary = {} if r is None else run(prepare(parse_recipe(r), force=True), log=lambda *a: None)
    seconds = time.perf_counter() - t0
    conn.send((summary, seconds, _peak_rss()))


def _peak_rss() -> int:
    """This process's peak resident bytes: VmHWM, which starts afresh at exec (``ru_maxrss``
    would carry the forking parent's peak into a spawned child)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no /proc: an upper bound


def _in_process(r: dict | None) -> tuple[dict, float, int]:
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_run_recipe, args=(r, send))
    child.start()
    try:
        return receive.recv()
    except EOFError:
        child.join()  # for its exit code
        where = r["output_dir"] if r else "imports"
        raise SystemExit(f"the run of {where} died (exit code {child.exitcode})") from None
    finally:
        child.join()  # a second join returns at once


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=HERE / "results" / "admm_lm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning AdamW lr")
    p.add_argument("--train-minutes", type=float, default=20.0, help="dense pretraining")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--device", default="cpu")
    p.add_argument("--samples", type=int, default=64, help="calibration windows")
    p.add_argument("--tokens", type=int, default=200_000, help="fine-tuning text tokens")
    p.add_argument(
        "--fine-text",
        choices=("train", "validation"),
        default="train",
        help="the split the fine-tuning text comes from: train (seen in pretraining) "
        "or validation (never trained on; the dense model's checkpoint choice)",
    )
    p.add_argument("--epochs", type=int, default=3, help="training epochs of every method")
    p.add_argument("--retrain", type=int, default=1, help="of which masked retraining")
    p.add_argument("--updates", type=int, default=8, help="ADMM Z/U updates per epoch")
    p.add_argument("--rho", type=float, default=0.01)
    p.add_argument("--rho-growth", type=float, default=1.3)
    p.add_argument("--sparsities", default="70,90")
    p.add_argument("--nm", action="store_true", help="also 2:4")
    p.add_argument("--methods", default=",".join(METHODS))
    args = p.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    args.lr_dense, lr = 3e-3, args.lr

    base = _oneshot_lm()
    text, provenance = base.corpus()
    tok = base.tokenizer(args.out / "tokenizer.json", text["train"], args.vocab)
    ids = {k: torch.tensor(tok(v)["input_ids"], dtype=torch.long) for k, v in text.items()}
    if args.tokens > ids[args.fine_text].numel():
        p.error(
            f"--tokens {args.tokens} is more than the {args.fine_text} split's "
            f"{ids[args.fine_text].numel():,} tokens"
        )
    dense = args.out / "dense"
    if not (dense / "config.json").is_file():
        args.lr = args.lr_dense
        base.train(args, ids["train"], ids["validation"], len(tok), dense, provenance["sha1"])
        args.lr = lr
    tok.save_pretrained(dense)
    # the fine-tuning text, then the test split: the recipe holds out the tail
    fine = tok.decode(ids[args.fine_text][: args.tokens])
    text_file = args.out / "text.txt"
    text_file.write_text(fine + "\n\n" + text["test"], encoding="utf-8")
    total = len(tok(text_file.read_text(encoding="utf-8"))["input_ids"])
    test_ids = ids["test"]
    paths = {"dense": dense, "text": text_file, "tokenizer": args.out / "tokenizer.json",
             "test_fraction": test_ids.numel() / total}  # fmt: skip
    import transformers

    dense_ppl = perplexity(base.load(dense), test_ids, args.seq_len)
    baseline_rss = _in_process(None)[2]  # a process that only imports what a run imports
    settings = [f"{s}%" for s in args.sparsities.split(",")] + (["2:4"] if args.nm else [])
    rows = []
    for setting in settings:
        for method in args.methods.split(","):
            out = args.out / "runs" / f"{setting.replace(':', '-').rstrip('%')}-{method}".replace(
                " ", "_").replace("<-", "from")  # fmt: skip
            r = recipe(method, args, setting, paths, out)
            (args.out / "recipes").mkdir(exist_ok=True)
            (args.out / "recipes" / f"{out.name}.yaml").write_text(yaml.safe_dump(r))
            summary, seconds, peak = _in_process(r)
            model = transformers.AutoModelForCausalLM.from_pretrained(out / "model").eval()
            row = {
                "setting": setting, "method": method,
                "perplexity": perplexity(model, test_ids, args.seq_len), "seconds": seconds,
                "train_tokens": 0 if method in METHODS[:2] else args.epochs * args.tokens,
                "peak_rss_mib": peak / 2**20,
                "admm_state_bytes_per_weight": summary.get("admm_state", {}).get(
                    "bytes_per_constrained_weight"),
            }  # fmt: skip
            rows.append(row)
            print(row, flush=True)
    training = json.loads((dense / "training.json").read_text())
    result = {"dense_perplexity": dense_ppl, "baseline_rss_mib": baseline_rss / 2**20,
              "dense_training": training, "args": {k: str(v) for k, v in vars(args).items()},
              "rows": rows}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    lines = [f"dense test perplexity {dense_ppl:.2f} ({training['tokens_seen']:,} pretraining "
             f"tokens); every training method {args.epochs} epochs × {args.tokens:,} tokens",
             f"peak RSS of each run's process (one that only imports: {baseline_rss / 2**20:.0f} "
             "MiB)", "", "| setting | method | perplexity | seconds | peak RSS MiB |",
             "|---|---|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {r['setting']} | {r['method']} | {r['perplexity']:.2f} | {r['seconds']:.0f} "
              f"| {r['peak_rss_mib']:.0f} |" for r in rows]  # fmt: skip
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, settings, dense_ppl, args.out / "perplexity_vs_sparsity.png")


def plot(rows, settings, dense_ppl, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # by sparsity, whatever order --sparsities gave; 2:4 last
    settings = sorted(settings, key=lambda s: (s == "2:4", s != "2:4" and float(s.rstrip("%"))))
    fig, ax = plt.subplots(figsize=(7, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((settings.index(r["setting"]), r["perplexity"], r["setting"] == "2:4")
                     for r in rows if r["method"] == method)  # fmt: skip
        line = [p[:2] for p in pts if not p[2]]  # a line over the sparsities; 2:4 a point apart
        nm = [p[:2] for p in pts if p[2]]
        color = None
        if line:
            color = ax.plot(*zip(*line), "o-", label=method)[0].get_color()
        if nm:
            ax.plot(*zip(*nm), "o", color=color, label=None if line else method)
    ax.axhline(dense_ppl, color="k", ls=":", label="dense")
    ax.set_xticks(range(len(settings)), settings)
    ax.set_yscale("log")
    ax.set_ylabel("test perplexity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
