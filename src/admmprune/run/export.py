"""Export a finished run: the packed file (:mod:`admmprune.deployment.compressed`), ONNX of the
compact model.

The run's model is rebuilt from ``summary.json``'s model description and ``model.pt`` (loaded
``weights_only``); the compact model is rebuilt by :func:`admmprune.compact`, which is
deterministic, so nothing is ever unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .._io import safe_load
from ..deployment.compressed import export_compressed
from ..structure.compact import compact
from .report import read_summary

__all__ = ["export_onnx", "export_run", "load_run_model"]


def load_run_model(run_dir: str | os.PathLike) -> tuple[nn.Module, dict]:
    """The finished run's (masked, possibly quantized) model in eval mode, and its model spec."""
    from ..models import build_model

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


#: protobuf's limit on one message: an ONNX file above it must keep its weights outside
_PROTOBUF_LIMIT = 2**31 - 1


def export_onnx(
    model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike
) -> list[Path]:
    """``torch.onnx.export`` with a dynamic batch dimension, then ``onnx.checker`` on the file.

    The weights are embedded in the one file when they fit under protobuf's 2 GB limit;
    otherwise they go to ``PATH.data`` beside it (keep the two together). Returns the files
    written.
    """
    try:
        import onnx
    except ImportError:
        raise ValueError(
            "ONNX export needs the onnx extra: pip install 'admmprune[onnx]'"
        ) from None
    path = Path(path)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    external = nbytes > _PROTOBUF_LIMIT // 2  # headroom for the graph itself
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # a stale one from an earlier export would be misleading
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        model.eval(),
        (example_input,),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        dynamo=True,
        external_data=external,
        verbose=False,
    )
    onnx.checker.check_model(str(path))  # by path: works with external data too
    return [path, data] if data.exists() else [path]


def _check_writable(path: Path, flag: str) -> None:
    """A file can be written at ``path``: its folder exists and it is not itself a folder."""
    if path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a folder; give a file name.")
    if not path.parent.is_dir():
        raise ValueError(
            f"{flag} {str(path)!r}: folder {str(path.parent)!r} does not exist; create it first."
        )
    if not os.access(path.parent, os.W_OK):
        raise ValueError(f"{flag} {str(path)!r}: folder {str(path.parent)!r} is not writable.")


def _lm_run_model(run_dir: Path):
    """An LM run's pruned model and tokenizer from its ``model/`` (``save_pretrained``)."""
    try:
        import transformers
    except ImportError:
        raise ValueError(
            "exporting an LM run needs the hf extra: pip install 'admmprune[hf]'"
        ) from None
    folder = run_dir / "model"
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder)


def export_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    onnx_path=None,
    sparse: str | os.PathLike | None = None,
) -> list[str]:
    """Write the run's packed file (and ONNX of its compact model, or for an LM run the sparse
    checkpoint :func:`admmprune.save_sparse` writes, to the folder ``sparse``); returns lines
    to print. Every output path is checked before anything is written.
    """
    from ..deployment.sparse_checkpoint import SPARSE_FILE, save_sparse

    run_dir = Path(run_dir)
    lm = (run_dir / "model" / "config.json").is_file()
    out = Path(out) if out else run_dir / "model.admmprune"
    _check_writable(out, "--out")
    if onnx_path:
        if lm:
            raise ValueError(
                f"{str(run_dir)!r} is a language-model run: --onnx exports image models; "
                "use --sparse DIR (a sparse Hugging Face checkpoint)."
            )
        onnx_path = Path(onnx_path)
        _check_writable(onnx_path, "--onnx")
        if onnx_path.resolve() == out.resolve():
            raise ValueError(f"--onnx and --out are the same file {str(out)!r}; give two names.")
    if sparse:
        sparse = Path(sparse)
        if not lm:
            raise ValueError(
                f"--sparse writes a Hugging Face sparse checkpoint; {str(run_dir)!r} is not a "
                "language-model run (no model/config.json)."
            )
        if (sparse / SPARSE_FILE).exists():
            raise ValueError(
                f"--sparse {str(sparse)!r} already holds a sparse checkpoint; give a new folder."
            )
    if lm:
        model, tokenizer = _lm_run_model(run_dir)
        lines = [f"wrote {out} ({export_compressed(model, out):,} bytes)"]
        if sparse:
            nbytes = save_sparse(model, sparse, tokenizer=tokenizer)
            lines.append(f"wrote {sparse / SPARSE_FILE} ({nbytes:,} bytes; with config, tokenizer)")
        return lines
    model, spec = load_run_model(run_dir)
    lines = [f"wrote {out} ({export_compressed(model, out, spec):,} bytes)"]
    if onnx_path:
        x = torch.zeros(1, spec["in_channels"], spec["input_size"], spec["input_size"])
        small, report = compact(model, x)
        files = export_onnx(small, x, onnx_path)
        lines.append(
            f"wrote {files[0]} ({files[0].stat().st_size:,} bytes; compact model: "
            f"{sum(report.removed.values())} channels removed)"
        )
        lines += [f"wrote {f} ({f.stat().st_size:,} bytes; the weights: keep it beside "
                  f"{files[0].name})" for f in files[1:]]  # fmt: skip
    return lines
