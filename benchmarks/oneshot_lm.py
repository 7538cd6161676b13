"""One-shot pruning of a small causal LM: perplexity of magnitude, Wanda, SparseGPT and ADMM
(ours; ``admm-dense``: with ``dense_target=True``) at 50–80 % (per row) and 2:4 / 4:8,
optionally against llm-compressor; joint 4-bit.

Everything is rebuilt offline, and cached in ``--out``:

- **Corpus**: English documentation already on every machine that runs admmprune:
  ``pydoc_data.topics`` (the language reference's help topics) and every docstring of 80+
  characters in the standard library's modules (``test``, ``idlelib``, ``lib2to3`` and
  ``site-packages`` excluded; PSF License) and in torch's and numpy's (``PACKAGES``:
  BSD-3-Clause; test modules excluded), files in sorted order, duplicates dropped. Split by
  document (its SHA-1): 1 in 20 to test, 1 in 20 to validation, the rest trains the model and
  gives the calibration windows (drawn with ``--seed``). ``corpus.json`` in ``--out`` records
  the sources, versions and the corpus hash; a cache of another corpus is refused.
  ``--corpus topics`` keeps the help topics only (seconds instead of minutes of parsing: the
  test suite's quick run).
- **Tokenizer**: byte-level BPE, ``--vocab`` tokens, trained on the training split with
  ``tokenizers``.
- **Model**: a LLaMA-architecture ``transformers`` causal LM (``--layers`` × ``--hidden``,
  tied embeddings), trained by this script with AdamW for ``--train-minutes`` (2 CPU threads:
  about 7 M parameters in 20 minutes), keeping the weights of the best validation perplexity
  (checked every ``--eval-every`` steps); ``--device cuda`` trains, prunes and evaluates on a
  GPU.

Then each solver prunes a fresh copy of the dense model from the same calibration windows
(``--samples`` × ``--seq-len`` tokens; every Linear of the decoder blocks, sequential block by
block) and the table reports test perplexity (non-overlapping ``--seq-len`` windows), pruning
seconds and the peak bytes of Grams + cached block inputs. ``--llmcompressor-python PY`` runs
vllm-project/llm-compressor's ``SparseGPTModifier`` / ``WandaPruningModifier`` (``oneshot``)
in that interpreter (its own venv) on the same saved model and calibration windows; its
SparseGPT chooses unstructured masks per layer (per block of 128 columns, as the paper), and
its sequential pipeline calibrates every module of a decoder layer from one pass through the
still-dense layer; so each of its rows sits next to ours run the same way ("(llmc protocol)":
``sequential="layers"``, its per-row counts ``int(d·s)`` pruned, SparseGPT masked per layer).

    python benchmarks/oneshot_lm.py [--train-minutes 20] [--llmcompressor-python PY]

Writes ``results.md``, ``results.json`` and ``perplexity_vs_sparsity.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

import admmprune as ap
from admmprune.deployment.storage import storage
from admmprune.run.evaluate import perplexity

HERE = Path(__file__).resolve().parent
SOLVERS = ("magnitude", "wanda", "sparsegpt", "admm", "admm-dense")
# admm-dense: ADMM with dense_target=True (each layer fits the dense model's output)
SETTINGS = {
    "50%": lambda: ap.Unstructured(0.5, per_row=True),
    "60%": lambda: ap.Unstructured(0.4, per_row=True),
    "70%": lambda: ap.Unstructured(0.3, per_row=True),
    "80%": lambda: ap.Unstructured(0.2, per_row=True),
    "2:4": lambda: ap.NM(2, 4),
    "4:8": lambda: ap.NM(4, 8),
}
JOINT = {
    "50% + 4 bit": lambda: ap.Unstructured(0.5, per_row=True) & ap.Quantized(4),
    "2:4 + 4 bit": lambda: ap.NM(2, 4) & ap.Quantized(4),
}


# Packages whose docstrings join the interpreter's own (core dependencies of admmprune, so on
# every machine that runs this): name -> license.
PACKAGES = {"torch": "BSD-3-Clause", "numpy": "BSD-3-Clause"}


def _docstrings(root: Path, skip) -> tuple[list[str], int]:
    docs, files = [], 0
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).parts
        if skip(rel) or any(part in ("test", "tests", "testing") for part in rel):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        files += 1
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    docs.append(doc)
    return docs, files


def corpus(kind: str = "full") -> tuple[dict[str, str], dict]:
    """English documentation already on the machine (see the module docstring), deduplicated,
    split by document: a document's SHA-1 puts it in test (1 in 20), validation (1 in 20) or
    train, so the three splits share no text and no source. ``kind="topics"``: the help topics
    only (0.5 MB of text, no parsing: for quick runs; the full corpus parses every module)."""
    import importlib
    import pydoc_data.topics

    docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    sources = [f"pydoc_data.topics of Python {sys.version.split()[0]} (PSF License)"]
    if kind == "full":
        stdlib = Path(ast.__file__).resolve().parent
        found, files = _docstrings(stdlib, lambda rel: rel[0] in STDLIB_SKIP)
        docs += found
        sources.append(f"docstrings of {files} stdlib modules (PSF License)")
        for name, license_ in PACKAGES.items():
            mod = importlib.import_module(name)
            found, files = _docstrings(Path(mod.__file__).resolve().parent, lambda rel: False)
            docs += found
            version = mod.__version__
            sources.append(f"docstrings of {files} modules of {name} {version} ({license_})")
    docs = list(dict.fromkeys(docs))  # overloads and re-exports repeat docstrings
    splits: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for doc in docs:
        bucket = hashlib.sha1(doc.encode()).digest()[0] % 20
        splits["test" if bucket == 0 else "validation" if bucket == 1 else "train"].append(doc)
    text = {k: "\n\n".join(v) for k, v in splits.items()}
    return text, {
        "sources": sources,
        "documents": {k: len(v) for k, v in splits.items()},
        "chars": {k: len(v) for k, v in text.items()},
        "sha1": hashlib.sha1("\0".join(docs).encode()).hexdigest(),
    }


STDLIB_SKIP = ("site-packages", "test", "idlelib", "lib2to3")


def tokenizer(path: Path, text: str, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not path.is_file():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train_from_iterator([text], trainer)
        tok.save(str(path))
    return PreTrainedTokenizerFast(tokenizer_file=str(path))


def train(args, ids: torch.Tensor, val: torch.Tensor, vocab: int, out: Path, sha1: str):
    """AdamW on a cosine schedule over the time budget; keeps the weights of the best
    validation perplexity (checked every ``--eval-every`` steps, and at the end)."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        intermediate_size=int(args.hidden * 8 / 3) // 16 * 16,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=True,
    )
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(cfg).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(args.seed)
    budget, start, step, losses = args.train_minutes * 60, time.perf_counter(), 0, []
    val = val[: 128 * args.seq_len]
    best = (math.inf, 0, None)

    def check():
        nonlocal best
        ppl = perplexity(model.eval(), val, args.seq_len)
        model.train()
        print(f"step {step}: validation perplexity {ppl:.2f}", flush=True)
        if ppl < best[0]:
            best = (ppl, step, copy.deepcopy(model.state_dict()))

    model.train()
    while time.perf_counter() - start < budget:
        frac = (time.perf_counter() - start) / budget  # cosine on the time budget
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * frac))
        starts = torch.randint(0, ids.numel() - args.seq_len - 1, (args.batch,), generator=g)
        x = torch.stack([ids[s : s + args.seq_len] for s in starts.tolist()]).to(args.device)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            print(f"step {step}: loss {sum(losses[-50:]) / 50:.3f}", flush=True)
        if step % args.eval_every == 0:
            check()
    check()
    model.load_state_dict(best[2])
    model.eval().cpu().save_pretrained(out)
    info = {
        "corpus_sha1": sha1,
        "steps": step,
        "best_step": best[1],
        "validation_ppl": best[0],
        "tokens_seen": step * args.batch * args.seq_len,
        "final_loss": sum(losses[-50:]) / max(len(losses[-50:]), 1),
        "minutes": (time.perf_counter() - start) / 60,
        "device": args.device,
    }
    (out / "training.json").write_text(json.dumps(info, indent=1))
    return info


def load(path: Path):
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(path).eval()


def peak(report) -> int:
    return report.gram_bytes_peak + report.activation_bytes_peak


def ours(dense: Path, solver: str, constraint, calibration, test, seq_len: int,
         sequential=True, device="cpu") -> dict:  # fmt: skip
    model = load(dense).to(device)  # pruned and evaluated there
    t = time.perf_counter()
    masks = ap.oneshot(
        model, constraint, calibration, solver=solver.removesuffix("-dense"),
        sequential=sequential, dense_target=solver.endswith("-dense"),
    )  # fmt: skip
    seconds = time.perf_counter() - t
    layers = set(masks)
    st = storage(model)
    bits = sum(v["bits"] for k, v in st["layers"].items() if k in layers)
    raw = sum(m.numel() * 32 for m in masks.values())
    return {
        "ppl": perplexity(model, test, seq_len),
        "seconds": seconds,
        "solve_seconds": sum(r.seconds for r in masks.report.layers.values()),
        "peak_bytes": peak(masks.report),
        "kept": sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()),
        "storage_ratio": raw / bits,
    }


def llmc_spec(model, setting: str) -> dict:
    """The setting with llm-compressor's counts: it prunes ``int(d·s)`` of a row of ``d``
    weights where admmprune keeps ``keep_count(keep, d)`` (at 80 % a row of 256 keeps 52 there,
    51 here: alone that moves Wanda's perplexity by 3 %); so one keep per layer width."""
    c = SETTINGS[setting]()
    if not setting.endswith("%"):
        return c
    s = round(1 - c.keep, 6)  # the value llm-compressor is given

    def kept(d: int) -> float:
        return (d - int(d * s)) / d

    return {
        name: ap.Unstructured(kept(m.in_features), per_row=c.per_row)
        for name, m in model.named_modules()
        if name.startswith("model.layers.") and isinstance(m, torch.nn.Linear)
    }


def llmcompressor(py: str, dense: Path, calib_file: Path, method: str, setting: str, out: Path):
    """Run llm-compressor in its own interpreter; returns the pruned directory or the error."""
    if setting.endswith("%"):
        sparsity, structure = round(1 - SETTINGS[setting]().keep, 6), "0:0"
    else:
        sparsity, structure = 0.5, setting
    target = out / f"llmc-{method}-{setting.replace(':', '_').replace('%', '')}"
    cmd = [
        py,
        str(HERE / "_llmcompressor_prune.py"),
        str(dense),
        str(calib_file),
        method,
        str(sparsity),
        structure,
        str(target),
        str(out / "tokenizer.json"),
    ]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return None, (done.stderr or done.stdout).strip().splitlines()[-1:]
    return target, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=HERE / "results" / "oneshot_lm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--train-minutes", type=float, default=20.0)
    p.add_argument("--eval-every", type=int, default=200, help="validation checks (steps)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--samples", type=int, default=128, help="calibration windows")
    p.add_argument("--solvers", default=",".join(SOLVERS))
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--skip-joint", action="store_true")
    p.add_argument(
        "--corpus",
        choices=("full", "topics"),
        default="full",
        help="full (the module docstring's) or topics (pydoc_data.topics only: quick runs)",
    )
    p.add_argument("--llmcompressor-python", default=None)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    text, provenance = corpus(args.corpus)
    stamp = args.out / "corpus.json"  # the tokenizer and model cached here belong to it
    if stamp.is_file() and json.loads(stamp.read_text()).get("sha1") != provenance["sha1"]:
        sys.exit(
            f"{args.out} caches a tokenizer and model of another corpus ({stamp}); pass another "
            "--out, or move that directory away to rebuild them."
        )
    if not stamp.is_file() and (args.out / "tokenizer.json").is_file():
        sys.exit(f"{args.out} holds a tokenizer of an unknown corpus; pass another --out.")
    stamp.write_text(json.dumps(provenance, indent=1))
    tok = tokenizer(args.out / "tokenizer.json", text["train"], args.vocab)
    ids = {k: torch.tensor(tok(v)["input_ids"], dtype=torch.long) for k, v in text.items()}
    train_ids, test = ids["train"], ids["test"]
    n_train = train_ids.numel()
    provenance["tokens"] = {k: v.numel() for k, v in ids.items()}
    print(provenance, flush=True)

    dense = args.out / "dense"
    if (dense / "config.json").is_file():
        training = json.loads((dense / "training.json").read_text())
    else:
        training = train(args, train_ids, ids["validation"], len(tok), dense, provenance["sha1"])
    g = torch.Generator().manual_seed(args.seed + 1)
    starts = torch.randint(0, n_train - args.seq_len, (args.samples,), generator=g)
    windows = torch.stack([train_ids[s : s + args.seq_len] for s in starts.tolist()])
    calibration = [{"input_ids": w} for w in windows.split(16)]
    torch.save(windows, args.out / "calibration.pt")
    model = load(dense).to(args.device)
    params = sum(x.numel() for x in model.parameters())
    dense_ppl = perplexity(model, test, args.seq_len)
    print(f"dense: {params / 1e6:.2f} M parameters, test perplexity {dense_ppl:.2f}", flush=True)

    rows = []
    for setting in args.settings.split(","):
        for solver in args.solvers.split(","):
            r = ours(dense, solver, SETTINGS[setting](), calibration, test, args.seq_len,
                     device=args.device)  # fmt: skip
            rows.append({"setting": setting, "method": solver, **r})
            print(rows[-1], flush=True)
        if args.llmcompressor_python:
            for method in ("sparsegpt", "wanda"):
                # llm-compressor's protocol: every module of a decoder layer calibrated from one
                # pass (sequential="layers"); its SparseGPT masks per layer (the paper's)
                spec = llmc_spec(model, setting)
                if method == "sparsegpt" and setting.endswith("%"):
                    spec = {k: ap.Unstructured(c.keep) for k, c in spec.items()}
                r = ours(dense, method, spec, calibration, test, args.seq_len, sequential="layers")
                rows.append({"setting": setting, "method": f"{method} (llmc protocol)", **r})
                print(rows[-1], flush=True)
                target, info = llmcompressor(
                    args.llmcompressor_python,
                    dense,
                    args.out / "calibration.pt",
                    method,
                    setting,
                    args.out,
                )
                if target is None:
                    rows.append(
                        {"setting": setting, "method": f"llmcompressor-{method}", "error": info}
                    )
                else:
                    m = load(target)
                    rows.append(
                        {
                            "setting": setting,
                            "method": f"llmcompressor-{method}",
                            "ppl": perplexity(m, test, args.seq_len),
                            "seconds": info,
                        }
                    )
                print(rows[-1], flush=True)
    if not args.skip_joint:
        for setting, make in JOINT.items():
            for solver in ("sparsegpt", "admm", "admm-dense"):
                r = ours(dense, solver, make(), calibration, test, args.seq_len,
                         device=args.device)  # fmt: skip
                rows.append({"setting": setting, "method": solver, **r})
                print(rows[-1], flush=True)

    result = {
        "provenance": provenance,
        "training": training,
        "params": params,
        "dense_ppl": dense_ppl,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"LLaMA {args.layers}x{args.hidden}, {params / 1e6:.2f} M parameters, vocab {len(tok)}, "
        f"trained {training['steps']} steps ({training['tokens_seen']:,} tokens, "
        f"{training['minutes']:.1f} min on {training['device']}); dense test perplexity "
        f"{dense_ppl:.2f} on {test.numel():,} tokens (windows of {args.seq_len}); "
        f"{args.samples} calibration windows; {torch.get_num_threads()} threads",
        "",
        "| setting | method | perplexity | seconds | peak MiB | storage ratio |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['setting']} | {r['method']} | failed: {r['error']} | | | |")
            continue
        lines.append(
            f"| {r['setting']} | {r['method']} | {r['ppl']:.2f} | {r['seconds']:.1f} | "
            + (
                f"{r['peak_bytes'] / 2**20:.1f} | {r['storage_ratio']:.2f}x |"
                if "peak_bytes" in r
                else " | |"
            )
        )
    text_out = "\n".join(lines) + "\n"
    print(text_out)
    (args.out / "results.md").write_text(text_out)
    plot(rows, args.settings.split(","), dense_ppl, args.out / "perplexity_vs_sparsity.png")


def plot(rows, settings, dense_ppl, path):
    """Perplexity per method: unstructured rates as lines (left), N:M patterns (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [[s for s in settings if s.endswith("%")], [s for s in settings if ":" in s]]
    panels = [p for p in panels if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, xs in zip(axes[0], panels):
        for method in dict.fromkeys(r["method"] for r in rows):
            ys = [
                next(
                    (
                        r["ppl"]
                        for r in rows
                        if r["method"] == method and r["setting"] == s and "ppl" in r
                    ),
                    float("nan"),
                )
                for s in xs
            ]
            ax.plot(xs, ys, marker="o", label=method, ls="-" if xs[0].endswith("%") else "")
        ax.axhline(dense_ppl, color="gray", ls="--", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity (per row)" if xs[0].endswith("%") else "N:M")
        ax.set_ylabel("test perplexity")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
