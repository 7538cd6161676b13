"""Language-model training runs: a recipe with ``model: {hf: DIR}``, ``data: {name: text}`` and
training stages goes through the runner of image runs (:mod:`.runner`), unchanged.

The text's tokens (the last ``test_fraction`` held out, as for one-shot LM runs) are cut into
non-overlapping windows of ``seq_len`` tokens: the training windows are shuffled by the run's
seed like images, and the loss is the model's own next-token cross-entropy
(``objective="next_token"``: token ``t+1`` from tokens ``≤ t`` inside each window). Every stage
works as for images: ``compress`` with ``method: admm | gradual | magnitude | iterative``
(``admm.metric``, ``admm.state_dtype``, ``admm.init: oneshot``: the one-shot solution from
``oneshot.samples`` training windows), masked ``retrain``, ``quantize``; ``clip_grad_norm`` and
``amp`` (bf16 autocast) per recipe. Each evaluation reports held-out perplexity
(``test_perplexity`` in ``metrics.jsonl``: ``exp`` of the mean loss over the held-out windows).
Checkpoints and ``--resume`` are the runner's: bit-exact after SIGKILL or Ctrl-C.

At the end (:func:`finish`): ``model/`` (``save_pretrained`` with the tokenizer), ``model-sparse/``
(:func:`admmprune.save_sparse`), ``masks.pt``,
``model.admmprune`` (the packed file), ``summary.json`` with perplexity at each step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..deployment.compressed import export_compressed
from ..deployment.sparse_checkpoint import save_sparse
from ..weights.select import select
from .config import Recipe, RecipeError
from .data import DataBundle, TokenWindows
from .finish import write_run_files
from .lm import _spec, load
from .report import summarize
from .rundir import check_run_dir, load_resume_state, same_data
from .runner import Prepared
from .train import resolve_device

__all__ = ["finish", "prepare"]


def windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``tokens`` as non-overlapping windows ``[N, seq_len]`` (a shorter tail is left out)."""
    n = tokens.numel() // seq_len
    return tokens[: n * seq_len].view(n, seq_len)


def prepare(recipe: Recipe, *, resume: bool = False, force: bool = False) -> Prepared:
    """Every check of an LM training run, writing nothing (see the module docstring)."""
    run_dir = Path(recipe.output_dir)
    check_run_dir(run_dir, resume, force)
    resume_state = load_resume_state(run_dir, recipe) if resume else None
    model, tokenizer, pool, test, facts = load(recipe)
    L = recipe.data.seq_len
    data = DataBundle(
        train=TokenWindows(windows(pool, L)),
        val=None,
        test=TokenWindows(windows(test, L)),
        num_classes=int(facts["vocab_model"]),
        in_channels=1,
        input_size=L,
        objective="next_token",
    )
    fingerprint = data.fingerprint()
    if resume_state is not None:
        same_data(run_dir, resume_state, recipe, fingerprint)
    try:
        device = resolve_device(recipe.device)
        spec = _spec(model, *recipe.spec())  # one-shot's checks too: admm.init / method oneshot
        names = {t.name: repr(t.constraint) for t in select(model, spec)}
        quant = {}
        if recipe.quantize.layers:
            quant = {t.name: repr(t.constraint) for t in select(model, recipe.quantize_spec())}
    except RecipeError:
        raise
    except ValueError as e:
        raise RecipeError(str(e)) from None
    facts |= {"train_windows": len(data.train), "test_windows": len(data.test)}
    extra = {
        "groups": [],
        "constraint_names": names,
        "quant_names": quant,
        "data_fingerprint": fingerprint,
        "tokenizer": tokenizer,
        "facts": facts,
    }
    model = model.to(device)
    return Prepared(
        recipe, run_dir, data, model, device, spec, None, resume_state, extra, finish=finish
    )


def finish(run) -> dict:
    """An LM run's finishing steps: final perplexity, ``model/`` (``save_pretrained`` with
    the tokenizer), ``masks.pt``, the packed file and ``summary.json``; rank 0 writes."""
    final = run.evaluate()
    run.masks.detach()
    agree = run.world.all_equal([*run.masks.values(), *run.model.parameters()])
    if not agree:
        raise RuntimeError("ranks disagree on the final masks or weights; please report it.")
    r, p = run.r, run.p
    summary = summarize(run.model, p.extra["constraint_names"], r, run.info, final)
    summary["perplexity"]["protocol"] = (
        f"exp(mean next-token loss) over {len(p.data.test)} non-overlapping windows of "
        f"{r.data.seq_len} tokens, the last {r.data.test_fraction:g} of the text"
    )
    summary["text"] = p.extra["facts"]
    if not run.world.main:
        return summary
    out = run.dir / "model"
    run.model.save_pretrained(out, safe_serialization=True)
    p.extra["tokenizer"].save_pretrained(out)
    run.masks.save(run.dir / "masks.pt")
    summary["packed_bytes"] = export_compressed(run.model, run.dir / "model.admmprune")
    summary["sparse_checkpoint_bytes"] = save_sparse(
        run.model, run.dir / "model-sparse", tokenizer=p.extra["tokenizer"], overwrite=True
    )
    write_run_files(run.dir, summary)
    return summary
