"""Export a finished run: the packed file (:mod:`admmprune.compressed`), ONNX of the compact model.

The run's model is rebuilt from ``summary.json``'s model description and ``model.pt`` (loaded
``weights_only``); the compact model is rebuilt by :func:`admmprune.compact`, which is
deterministic, so nothing is ever unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ._io import safe_load
from .compact import compact
from .compressed import export_compressed
from .report import read_summary

__all__ = ["export_onnx", "export_run", "load_run_model"]


def load_run_model(run_dir: str | os.PathLike) -> tuple[nn.Module, dict]:
    """The finished run's (masked, possibly quantized) model in eval mode, and its model spec."""
    from .models import build_model

    run_dir = Path(run_dir)
    spec = read_summary(run_dir).get("storage", {}).get("model_spec")
    if not spec:
        raise ValueError(
            f"{str(run_dir)!r}: summary.json has no model description; re-run the recipe."
        )
    kwargs = dict(spec)
    model = build_model(kwargs.pop("name"), **kwargs)
    model.load_state_dict(safe_load(run_dir / "model.pt", "the run's model"))
    return model.eval(), spec


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike) -> None:
    """``torch.onnx.export`` with a dynamic batch dimension, then ``onnx.checker`` on the file."""
    try:
        import onnx
    except ImportError:
        raise ValueError(
            "ONNX export needs the onnx extra: pip install 'admmprune[onnx]'"
        ) from None
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        model.eval(),
        (example_input,),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        dynamo=True,
        verbose=False,
    )
    onnx.checker.check_model(onnx.load(str(path)))


def export_run(
    run_dir: str | os.PathLike, out: str | os.PathLike | None = None, onnx_path=None
) -> list[str]:
    """Write the run's packed file (and ONNX of its compact model); returns lines to print."""
    run_dir = Path(run_dir)
    model, spec = load_run_model(run_dir)
    out = Path(out) if out else run_dir / "model.admmprune"
    lines = [f"wrote {out} ({export_compressed(model, out, spec):,} bytes)"]
    if onnx_path:
        x = torch.zeros(1, spec["in_channels"], spec["input_size"], spec["input_size"])
        small, report = compact(model, x)
        export_onnx(small, x, onnx_path)
        lines.append(
            f"wrote {onnx_path} (compact model: {sum(report.removed.values())} channels removed)"
        )
    return lines
