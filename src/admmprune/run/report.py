"""Run summaries and per-layer tables (JSON for machines, Markdown for people)."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from .plots import PLOTS

__all__ = ["layer_table", "print_report", "read_summary", "summarize"]


def summarize(
    model: nn.Module, constraint: dict[str, str], recipe, info: dict, final: dict
) -> dict:
    """Accuracy before/after, compression of the constrained layers and of the whole model.

    ``constraint`` maps each constrained parameter to its constraint's description.
    """
    params = dict(model.named_parameters())
    layers = []
    for name in constraint:
        W = params[name]
        layers.append(
            {
                "name": name,
                "shape": list(W.shape),
                "constraint": constraint[name],
                "total": W.numel(),
                "kept": int((W != 0).sum()),
            }
        )
    kept = sum(layer["kept"] for layer in layers)
    total = sum(layer["total"] for layer in layers)
    all_total = sum(p.numel() for p in params.values())
    all_nonzero = sum(int((p != 0).sum()) for p in params.values())
    return {
        "model": recipe.model.name or recipe.model.hf,
        "dataset": recipe.data.name,
        "seed": recipe.seed,
        "accuracy": {
            "start": info.get("start_acc"),
            "dense": info.get("dense_acc"),
            "pruned_before_retrain": info.get("pruned_acc"),
            "quantized": info.get("quantized_acc"),
            "final": final["test_acc"],
            **({"final_val": final["val_acc"]} if "val_acc" in final else {}),
        },
        "constrained_layers": {"weights": total, "nonzero": kept, "rate": total / max(kept, 1)},
        "all_parameters": {
            "params": all_total,
            "nonzero": all_nonzero,
            "rate": all_total / max(all_nonzero, 1),
        },
        "layers": layers,
        "seconds": info.get("times", {}),
        **(
            {"perplexity": {**info.get("perplexity", {}), "final": final["test_perplexity"]}}
            if "test_perplexity" in final
            else {}
        ),
        **({"admm_state": info["admm_state"]} if "admm_state" in info else {}),
    }


def layer_table(summary: dict) -> str:
    rows = [
        "| layer | shape | constraint | kept / total | kept % |",
        "|---|---|---|---:|---:|",
    ]
    for layer in summary["layers"]:
        shape = "×".join(map(str, layer["shape"]))
        pct = 100 * layer["kept"] / layer["total"]
        rows.append(
            f"| {layer['name']} | {shape} | {layer['constraint']} | "
            f"{layer['kept']:,} / {layer['total']:,} | {pct:.2f} |"
        )
    c = summary["constrained_layers"]
    rows.append(
        f"| **constrained total** | | | {c['nonzero']:,} / {c['weights']:,} | "
        f"{100 * c['nonzero'] / c['weights']:.2f} |"
    )
    return "\n".join(rows)


def _fmt(acc) -> str:
    return "–" if acc is None else f"{100 * acc:.2f} %"


def format_summary(summary: dict) -> str:
    a, c, p = summary["accuracy"], summary["constrained_layers"], summary["all_parameters"]
    lines = [
        f"model {summary['model']} on {summary['dataset']} (seed {summary['seed']})",
        f"test accuracy: dense {_fmt(a['dense'])} → pruned {_fmt(a['pruned_before_retrain'])} "
        + (
            f"→ retrained and quantized {_fmt(a['final'])}"
            if a.get("quantized") is not None
            else f"→ retrained {_fmt(a['final'])}"
        ),
        f"compression: constrained layers {c['rate']:.1f}× ({c['nonzero']:,} of {c['weights']:,} "
        f"weights kept); whole model {p['rate']:.1f}× ({p['nonzero']:,} of {p['params']:,} "
        "parameters non-zero)",
    ]
    if "refused" in summary.get("compact", {}):
        lines.append(f"compaction refused: {summary['compact']['refused']}")
    for layer, why in summary.get("compact", {}).get("skipped", {}).items():
        lines.append(f"compaction kept the zero channels of {layer}: {why}")
    if summary.get("compact", {}).get("channels_removed"):  # nothing removed: nothing to say
        k = summary["compact"]
        speed = (
            f"measured {k['speedup']:.2f}x faster"
            if k["speedup"] >= 1
            else f"measured {1 / k['speedup']:.2f}x slower"
        )
        lines.append(
            f"compacted: {k['channels_removed']} channels removed, {k['mac_reduction']:.2f}x fewer "
            f"MACs, {speed} (batch {k['latency_batch']}, {k['latency_threads']} threads); "
            f"{k['zero_channels_not_removable']} zero channels could not be removed"
        )
    if "storage" in summary:
        st = summary["storage"]
        lines.append(
            f"storage: {st['file_bytes']:,} bytes packed (model.admmprune), {st['rate']:.1f}x "
            f"smaller than fp32; Conv/Linear weights {st['weights_rate']:.1f}x "
            f"({st['weights_rate_without_index']:.1f}x not counting index bits)"
        )
    lines += ["", layer_table(summary)]
    return "\n".join(lines)


def read_summary(run_dir: str | Path) -> dict:
    """A finished run's ``summary.json``; a clear error when the run has not finished."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise ValueError(
            f"{str(run_dir)!r} has no summary.json: not a finished admmprune run "
            "(an unfinished one continues with `admmprune run RECIPE --resume`)."
        )
    return json.loads(path.read_text())


def print_report(run_dir: str | Path) -> str:
    """The summary of a finished run as text (what ``admmprune report RUN_DIR`` prints)."""
    run_dir = Path(run_dir)
    text = format_summary(read_summary(run_dir))
    files = ", ".join(
        n
        for n in ("metrics.jsonl", "model.pt", "masks.pt", "model.admmprune", "layers.md", *PLOTS)
        if (run_dir / n).exists()
    )
    return text + f"\n\nfiles in {run_dir}: summary.json, {files}"
