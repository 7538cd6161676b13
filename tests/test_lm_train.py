"""Language-model training runs: an LM recipe with training stages (ADMM on the model's own
next-token loss, masked retraining) through the runner of image runs: exact sparsity,
perplexity reproduced from the saved files, bit-exact resume after SIGKILL, clear errors."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import admmprune as ap
from admmprune.run.evaluate import perplexity
from admmprune.sets.constraints import keep_count
from test_lm import _transformers, _write, lm_recipe
from test_pipeline import _wait_for_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def train_recipe(tmp_path, **admm):
    recipe = lm_recipe(tmp_path)
    recipe |= {
        "method": "admm",
        "data": recipe["data"] | {"batch_size": 8},
        "pretrain": {"epochs": 1, "optimizer": {"name": "adamw", "lr": 3e-3}},
        "admm": {"epochs": 3, "update_every": 1, "rho": 0.05, "rho_growth": 2.0,
                 "optimizer": {"name": "adamw", "lr": 1e-3}, "clip_grad_norm": 1.0} | admm,
        "retrain": {"epochs": 1, "optimizer": {"name": "adamw", "lr": 1e-3}},
        "default_constraint": {"unstructured": 0.25, "per_row": True},
    }  # fmt: skip
    return recipe


def test_lm_recipe_trains_admm_then_retrains_and_saves_pretrained(tmp_path):
    from admmprune.run.cli import main

    tr = _transformers()
    recipe = train_recipe(tmp_path, metric="adam", state_dtype="bfloat16")
    assert main(["run", _write(tmp_path / "r.yaml", recipe)]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if "test_perplexity" in r and r.get("stage") in ("admm", "retrain")]
    assert len(epochs) >= 4 and all(r["test_perplexity"] > 1 for r in epochs)
    assert {"start", "dense", "pruned_before_retrain", "final"} <= set(summary["perplexity"])
    # bf16 U, Z as a bitmask + bf16 values at 25 % kept: 2 + 1/8 + 0.5 bytes (fp32: 12)
    assert summary["admm_state"]["bytes_per_constrained_weight"] == pytest.approx(2.625, abs=0.01)
    back = tr.AutoModelForCausalLM.from_pretrained(run / "model")
    for name, layer in back.named_modules():
        if name.startswith("model.layers.") and isinstance(layer, torch.nn.Linear):
            kept = layer.weight.ne(0).sum(1)  # exact per row, after retraining too
            assert kept.eq(keep_count(0.25, layer.weight.shape[1])).all(), name
    # the final perplexity is reproducible from the saved files alone
    tokenizer = tr.AutoTokenizer.from_pretrained(run / "model")
    ids = torch.tensor(tokenizer((tmp_path / "corpus.txt").read_text())["input_ids"])
    test = ids[ids.numel() - int(ids.numel() * 0.1) :]
    test = test[: test.numel() // 32 * 32]
    assert perplexity(back, test, 32) == pytest.approx(summary["perplexity"]["final"], rel=1e-4)
    assert (run / "model.admmprune").is_file() and (run / "masks.pt").is_file()
    sparse = ap.load_sparse(run / "model-sparse")  # the same weights, in the sparse checkpoint
    assert all(torch.equal(t, back.state_dict()[n]) for n, t in sparse.state_dict().items())
    size = (run / "model-sparse" / "model-sparse.safetensors").stat().st_size
    assert summary["sparse_checkpoint_bytes"] == size


def test_lm_run_killed_mid_admm_resumes_bit_exactly(tmp_path):
    from safetensors.torch import load_file

    from admmprune.run.cli import main

    recipe = train_recipe(tmp_path, metric="fisher", state_dtype="float8")
    recipe["pretrain"]["epochs"] = 0
    recipe["admm"]["epochs"] = 4
    ref = dict(recipe, output_dir=str(tmp_path / "ref"))
    assert main(["run", _write(tmp_path / "ref.yaml", ref)]) == 0
    path = _write(tmp_path / "killed.yaml", recipe)
    proc = subprocess.Popen(
        [sys.executable, "-m", "admmprune", "run", path], cwd=ROOT, env=os.environ.copy(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    st = _wait_for_checkpoint(tmp_path / "run", proc, "admm", 2, timeout=180)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert st["stage"] == "admm" and not (tmp_path / "run" / "summary.json").exists()
    assert main(["run", path, "--resume"]) == 0
    a = load_file(tmp_path / "ref" / "model" / "model.safetensors")
    b = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    sa = json.loads((tmp_path / "ref" / "summary.json").read_text())
    sb = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert sa["perplexity"] == sb["perplexity"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"data": {"seq_len": 4096}}, "longer than the"),
        ({"admm": {"init": "oneshot"}, "default_constraint": {"filters": 0.5}},
         "Filters removes output rows"),
        ({"coupled_channels": {"keep": 0.5}}, "coupled_channels and method: ssauto are for image"),
    ],
)  # fmt: skip
def test_lm_training_bad_input_is_named_and_writes_nothing(tmp_path, capsys, change, message):
    from admmprune.run.cli import main

    recipe = train_recipe(tmp_path)
    for k, v in change.items():
        recipe[k] = recipe[k] | v if isinstance(recipe.get(k), dict) else v
    assert main(["run", _write(tmp_path / "r.yaml", recipe)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("eval_batch", [None, 3])
def test_lm_evaluation_batches_default_to_the_training_batch(tmp_path, monkeypatch, eval_batch):
    # 512 windows' logits at once took 3+ GiB for a 4k vocabulary (admm_lm's runs); unless
    # the recipe says otherwise an LM is evaluated in batches of its training batch
    from admmprune.run import runner
    from admmprune.run.cli import main

    sizes = []
    real = runner.evaluate
    monkeypatch.setattr(runner, "evaluate", lambda *a: sizes.append(a[3]) or real(*a))
    recipe = train_recipe(tmp_path)
    recipe["pretrain"]["epochs"], recipe["admm"]["epochs"], recipe["retrain"]["epochs"] = 0, 1, 0
    recipe["data"]["batch_size"] = 5
    if eval_batch:
        recipe["data"]["eval_batch_size"] = eval_batch
    assert main(["run", _write(tmp_path / "r.yaml", recipe)]) == 0
    assert sizes and set(sizes) == {eval_batch or 5}
