"""Language-model runs: a local Hugging Face causal LM pruned one shot from calibration text.

``admmprune run`` on a recipe with ``model: {hf: DIR}`` and ``data: {name: text, path: ...}``:

1. checks everything, writing nothing: the directory is a ``save_pretrained`` causal LM
   (loaded with ``local_files_only``, never ``trust_remote_code``), the tokenizer's vocabulary
   fits the model's embeddings, the text gives at least one ``seq_len`` window for
   calibration and one for perplexity, the constraints match layers;
2. tokenises the text into one stream: the last ``test_fraction`` of the tokens is the
   perplexity split, calibration windows (``oneshot.samples`` of ``seq_len`` tokens, starts
   drawn with the run's seed) come from the rest;
3. dense perplexity (:func:`admmprune.run.evaluate.perplexity`, non-overlapping windows), one-shot
   pruning (:func:`admmprune.oneshot`, block by block through the decoder layers), pruned
   perplexity;
4. writes ``model/`` (``save_pretrained``: safetensors, with the tokenizer), ``model-sparse/``
   (:func:`admmprune.save_sparse`), ``model.admmprune``
   (the packed file), ``summary.json`` and ``recipe.yaml``.

``constraints`` name layers as usual (e.g. ``"model.layers.*.mlp.*": {nm: "2:4"}``); a
``default_constraint`` covers every other Linear / ``Conv1D`` inside the decoder blocks, never
the embeddings or the output head.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from .config import Recipe, RecipeError

__all__ = ["LMPrepared", "plan", "prepare", "run"]


@dataclass
class LMPrepared:
    recipe: Recipe
    run_dir: Path
    model: nn.Module
    tokenizer: object
    calibration: list[dict]
    test_tokens: torch.Tensor
    spec: object  # a spec dict, or one Constraint for every layer of the blocks
    facts: dict = field(default_factory=dict)
    continue_command: str | None = None


def _transformers():
    try:
        import transformers
    except ImportError:
        raise RecipeError("model.hf needs the [hf] extra: pip install 'admmprune[hf]'") from None
    return transformers


def _load_model(path: str):
    tr = _transformers()
    d = Path(path)
    if not (d / "config.json").is_file():
        raise RecipeError(
            f"model.hf {path!r} is not a save_pretrained directory (no config.json there); "
            "point it at the folder model.save_pretrained(...) wrote."
        )
    try:
        return tr.AutoModelForCausalLM.from_pretrained(
            d, local_files_only=True, trust_remote_code=False
        ).eval()
    except (ValueError, OSError, KeyError) as e:
        raise RecipeError(
            f"model.hf {path!r} cannot be loaded as a causal LM by transformers "
            f"{tr.__version__}: {str(e).splitlines()[0]}"
        ) from None


def _load_tokenizer(path: str):
    tr = _transformers()
    p = Path(path)
    try:
        if p.is_file():
            return tr.PreTrainedTokenizerFast(tokenizer_file=str(p))
        return tr.AutoTokenizer.from_pretrained(p, local_files_only=True, trust_remote_code=False)
    except (ValueError, OSError) as e:
        raise RecipeError(
            f"data.tokenizer {path!r} cannot be loaded: {str(e).splitlines()[0]}"
        ) from None


def _read_text(path: str | None) -> str:
    if not path:
        raise RecipeError("data.name: text needs data.path: a .txt file or a folder of them")
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise RecipeError(f"data.path {path!r} holds no .txt file")
        return "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    if not p.is_file():
        raise RecipeError(f"data.path {path!r} does not exist")
    return p.read_text(encoding="utf-8")


def _calibration(pool: torch.Tensor, samples: int, seq_len: int, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, pool.numel() - seq_len + 1, (samples,), generator=g)
    windows = torch.stack([pool[s : s + seq_len] for s in starts.tolist()])
    return [{"input_ids": w} for w in windows.split(batch)]


def _spec(model: nn.Module, spec: dict, default) -> dict:
    """The recipe's spec on an LM: ``default_constraint`` covers the Linear / ``Conv1D`` layers
    of the decoder blocks that ``constraints`` does not name (never the embeddings or the
    head); every target must be a layer one-shot pruning reconstructs."""
    from ..solvers.oneshot.blocks import _blocks_spec
    from ..solvers.oneshot.driver import check
    from ..weights.select import select

    spec = {k: v for k, v in spec.items() if v is not None}
    chosen = select(model, spec) if spec else []
    named = {t.module_name for t in chosen} | {t.name for t in chosen}
    if default is not None:
        spec |= {k: c for k, c in _blocks_spec(model, default)[0].items() if k not in named}
    check(model, spec)  # a clear error for an embedding, a norm, a Filters set …
    return spec


def load(recipe: Recipe):
    """Model, tokenizer and the text's tokens split into ``(pool, test)`` (the last
    ``test_fraction`` held out), every check made; plus the facts for the summary."""
    d = recipe.data
    text = _read_text(d.path)
    model = _load_model(recipe.model.hf)
    tokenizer = _load_tokenizer(d.tokenizer or recipe.model.hf)
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise RecipeError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only "
            f"{vocab}: they do not belong together (data.tokenizer / model.hf)."
        )
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None
    )
    if positions is not None and d.seq_len > positions:
        raise RecipeError(
            f"data.seq_len={d.seq_len} is longer than the {positions} positions "
            f"{type(model).__name__} has; use data.seq_len <= {positions}."
        )
    tokens = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    n_test = int(tokens.numel() * d.test_fraction)
    pool, test = tokens[: tokens.numel() - n_test], tokens[tokens.numel() - n_test :]
    if test.numel() < d.seq_len or pool.numel() < d.seq_len:
        raise RecipeError(
            f"the text gives {pool.numel()} calibration and {test.numel()} test tokens; each "
            f"part needs at least data.seq_len={d.seq_len}. Use more text or a shorter seq_len."
        )
    facts = {
        "tokens": int(tokens.numel()),
        "calibration_tokens_pool": int(pool.numel()),
        "test_tokens": int(test.numel()),
        "vocab_tokenizer": len(tokenizer),
        "vocab_model": int(vocab),
    }
    return model, tokenizer, pool, test, facts


def trains(recipe: Recipe) -> bool:
    """Whether an LM recipe goes through the training runner (any method but one-shot, or a
    stage with epochs) rather than the one-shot run below."""
    stages = ("pretrain", "admm", "retrain", "quantize")
    return recipe.method != "oneshot" or any(getattr(recipe, s).epochs > 0 for s in stages)


def prepare(recipe: Recipe, *, resume: bool = False, force: bool = False):
    """Every check of a one-shot language-model run; builds model, tokens and calibration,
    writes nothing (a recipe that :func:`trains` goes to :mod:`admmprune.run.lm_train`)."""
    from .rundir import check_run_dir

    if resume:
        raise RecipeError(
            "a one-shot model.hf run (no training epochs) takes minutes and has nothing to "
            "resume: run it again (add --force to replace its run dir)."
        )
    run_dir = Path(recipe.output_dir)
    check_run_dir(run_dir, False, force)
    model, tokenizer, pool, test, facts = load(recipe)
    o, d = recipe.oneshot, recipe.data
    calibration = _calibration(pool, o.samples, d.seq_len, o.batch_size, recipe.seed)
    try:
        spec = _spec(model, *recipe.spec())
    except ValueError as e:
        raise RecipeError(str(e)) from None
    return LMPrepared(recipe, run_dir, model, tokenizer, calibration, test, spec, facts)


def plan(p: LMPrepared) -> str:
    r, f = p.recipe, p.facts
    return "\n".join([
        f"model: {r.model.hf} ({type(p.model).__name__}, "
        f"{sum(x.numel() for x in p.model.parameters()):,} parameters)",
        f"text: {r.data.path}: {f['tokens']:,} tokens ({f['test_tokens']:,} held out for "
        f"perplexity, windows of {r.data.seq_len})",
        f"one-shot: {r.oneshot.solver} on {r.oneshot.samples} calibration windows",
        f"run dir: {p.run_dir} (model/, model-sparse/, model.admmprune, summary.json)",
    ])  # fmt: skip


def run(p: LMPrepared, log=print) -> dict:
    """Perplexity dense → one-shot prune → perplexity pruned; write the run dir."""
    from ..deployment.compressed import export_compressed
    from ..deployment.sparse_checkpoint import save_sparse
    from ..solvers.oneshot.driver import oneshot
    from .evaluate import perplexity

    r = p.recipe
    if p.run_dir.exists():
        shutil.rmtree(p.run_dir)  # only reached with --force (prepare refused otherwise)
    p.run_dir.mkdir(parents=True)
    (p.run_dir / "recipe.yaml").write_text(
        yaml.safe_dump(r.model_dump(mode="json"), sort_keys=False)
    )
    seq = r.data.seq_len
    t0 = time.perf_counter()
    dense = perplexity(p.model, p.test_tokens, seq)
    log(f"dense perplexity {dense:.3f} ({p.test_tokens.numel():,} test tokens)")
    o = r.oneshot
    masks = oneshot(
        p.model, p.spec, p.calibration, solver=o.solver, sequential=o.sequential, damp=o.damp,
        dense_target=o.dense_target, min_expert_tokens=o.min_expert_tokens, log=log,
        **o.options,
    )  # fmt: skip
    pruned = perplexity(p.model, p.test_tokens, seq)
    log(f"pruned perplexity {pruned:.3f}")
    p.model.save_pretrained(p.run_dir / "model", safe_serialization=True)
    p.tokenizer.save_pretrained(p.run_dir / "model")
    size = export_compressed(p.model, p.run_dir / "model.admmprune")
    sparse = save_sparse(p.model, p.run_dir / "model-sparse", tokenizer=p.tokenizer, overwrite=True)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    summary = {
        "model": r.model.hf,
        "perplexity_dense": dense,
        "perplexity_pruned": pruned,
        "perplexity_protocol": f"non-overlapping windows of {seq} tokens, last "
        f"{r.data.test_fraction:g} of the text",
        "kept_fraction": kept / max(total, 1),
        "layers": len(masks),
        "packed_bytes": size,
        "sparse_checkpoint_bytes": sparse,
        "seconds": time.perf_counter() - t0,
        "oneshot": masks.report.as_dict(),
        **p.facts,
    }
    (p.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"run dir: {p.run_dir}")
    return summary
