"""The plots written into every run dir (PNG, matplotlib's Agg backend, no display needed).

- ``kept.png``: kept fraction per constrained layer;
- ``residuals.png``: primal ||W − Z|| and dual rho·||Z_k − Z_{k−1}|| per ADMM update, per layer;
- ``training.png``: train loss and test accuracy per epoch, stage by stage.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["PLOTS", "write_plots"]

PLOTS = ("kept.png", "residuals.png", "training.png")


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.open()] if path.exists() else []


def _short(name: str, width: int = 32) -> str:
    """A tick label that fits: the end of a long parameter name is the part that differs."""
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def write_plots(run_dir: str | Path, summary: dict) -> list[Path]:
    """Write the run's plots from ``metrics.jsonl`` and ``summary``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = _rows(run_dir)
    written = []

    layers = summary["layers"]
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(layers) + 2), 3.5))
    ax.bar(range(len(layers)), [100 * x["kept"] / x["total"] for x in layers])
    ax.set_xticks(range(len(layers)), [_short(x["name"]) for x in layers], rotation=60, ha="right")
    ax.set_ylabel("kept (%)")
    ax.set_title("kept weights per layer")
    fig.tight_layout()
    written.append(_save(fig, run_dir / "kept.png"))

    updates = [r for r in rows if r.get("event") == "update" and r["stage"] == "admm"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name in updates[0]["layers"] if updates else []:
        for ax, key in zip(axes, ("primal", "dual")):
            ax.plot(
                range(1, len(updates) + 1), [r["layers"][name][key] for r in updates], label=name
            )
    for ax, key in zip(axes, ("primal ||W − Z||", "dual rho·||Z_k − Z_k−1||")):
        ax.set_xlabel("ADMM update")
        ax.set_title(key)
        if updates:
            ax.set_yscale("log")
    if updates and len(updates[0]["layers"]) <= 12:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, run_dir / "residuals.png"))

    epochs = [r for r in rows if "epoch" in r and "train_loss" in r]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    for i, r in enumerate(epochs):
        r["_x"] = i + 1
    for stage in dict.fromkeys(r["stage"] for r in epochs):
        part = [r for r in epochs if r["stage"] == stage]
        ax_loss.plot([r["_x"] for r in part], [r["train_loss"] for r in part], "o-", label=stage)
        ax_acc.plot([r["_x"] for r in part], [100 * r["test_acc"] for r in part], "o-", label=stage)
    ax_loss.set_title("train loss")
    ax_acc.set_title("test accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch (all stages)")
        if epochs:
            ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, run_dir / "training.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
