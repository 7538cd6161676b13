"""The finishing steps of a run, over a finished (pruned, possibly quantized) model.

The runner calls them in this order; each works alone on a model::

    zero_dead_inputs(model, x1)            (compact.py) consumers of removable channels → 0
    compact_stats(model, x1, xb)           the compact model: MACs, parameters, latency
    model_spec(recipe, data)               what rebuilds the architecture
    storage_stats(model, path, spec, q)    the accounting, and the packed file at ``path``
    write_run_files(run_dir, summary)      summary.json, layers.md, the plots
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..deployment.compressed import export_compressed
from ..deployment.latency import measure_paired
from ..deployment.storage import storage
from ..structure.compact import CompactionError, compact
from .plots import write_plots
from .report import layer_table

__all__ = ["compact_stats", "model_spec", "storage_stats", "write_run_files"]


def compact_stats(model: nn.Module, x1: torch.Tensor, xb: torch.Tensor) -> dict:
    """Remove the zero channel groups (:func:`compact`, traced on ``x1``); MACs, parameters
    and latency on the batch ``xb`` before/after.

    Timed as deployed (see latency.py): BN folded where torch.fx can trace the model, conv nets
    in NHWC; in alternation, so that a busy machine slows both alike. The compact model is not
    kept: :func:`compact` on the saved weights rebuilds it.
    """
    try:
        small, report = compact(model, x1)
    except CompactionError as e:  # the run's files still get written; the summary says why
        return {"refused": str(e)}
    models, channels_last = {"dense": model, "compact": small}, xb.ndim == 4
    try:
        fold_bn = True
        t = measure_paired(models, xb, 10, fold_bn=True, channels_last=channels_last)
    except ValueError:  # torch.fx cannot trace this model
        fold_bn = False
        t = measure_paired(models, xb, 10, channels_last=channels_last)
    return {
        "channels_removed": sum(report.removed.values()),
        "heads_removed": sum(report.heads_removed.values()),
        "skipped": report.skipped,  # root layer → why its zero channels stayed
        "zero_channels_not_removable": report.total_not_removable,
        "macs_dense": report.macs_before,
        "macs_compact": report.macs_after,
        "mac_reduction": report.mac_reduction,
        "all_macs_dense": report.all_macs_before,  # every matmul, attention's included
        "all_macs_compact": report.all_macs_after,
        "macs_compact_sparse": report.sparse_macs_after,  # zero weights (e.g. columns) skipped
        "params_compact": report.params_after,
        "latency_batch": xb.shape[0],
        "latency_threads": torch.get_num_threads(),
        "latency_channels_last": channels_last,
        "latency_bn_folded": fold_bn,
        "latency_dense_ms": t["dense"],
        "latency_compact_ms": t["compact"],
        "speedup": t["dense"] / t["compact"],
    }


def model_spec(recipe, data) -> dict:
    """The model description the packed file and ``admmprune export`` rebuild it from."""
    return {
        "name": recipe.model.name,
        "num_classes": data.num_classes,
        "in_channels": data.in_channels,
        "input_size": data.input_size,
        "kwargs": recipe.model.kwargs,
    }


def storage_stats(model: nn.Module, path: Path, spec: dict, quantized: set | dict) -> dict:
    """Storage accounting, and the packed file written to ``path`` with its real size;
    ``quantized``: the names of the quantized parameters (their distinct values counted)."""
    s = storage(model)
    nbytes = export_compressed(model, path, spec)
    return {
        "model_spec": spec,
        "total_raw_bits": s["total_raw"],
        "total_bits": s["total_bits"],
        "rate": s["total_raw"] / s["total_bits"],
        "weights_raw_bits": s["weights_raw"],
        "weights_bits": s["weights_bits"],
        "weights_rate": s["weights_raw"] / s["weights_bits"],
        "weights_rate_without_index": s["weights_raw"] / max(s["weights_value_bits"], 1),
        "weights_index_bits": s["weights_index_bits"],
        "index_bound_bits": s["index_bound_bits"],
        "file_bytes": nbytes,
        "formats": {k: v["format"] for k, v in s["layers"].items()},
        "distinct_values": {
            name: int(p.detach().unique().numel())
            for name, p in model.named_parameters()
            if name in quantized
        },
    }


def write_run_files(run_dir: Path, summary: dict) -> None:
    """``summary.json``, ``layers.md`` and the plots of a finished run."""
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (run_dir / "layers.md").write_text(layer_table(summary) + "\n")
    write_plots(run_dir, summary)
