"""Recipes, the command line, checkpoints and resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from admmprune._io import safe_load
from admmprune.run.cli import main
from admmprune.run.config import RecipeError
from admmprune.run.parse import load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[1]


def tiny_recipe(out, **changes):
    """Digits + LeNet-300-100, a few epochs of each stage: seconds on CPU."""
    r = {
        "seed": 1,
        "output_dir": str(out),
        "device": "cpu",
        "progress": False,
        "model": {"name": "lenet300"},
        "data": {"name": "digits", "batch_size": 64},
        "pretrain": {"epochs": 3, "optimizer": {"name": "adam", "lr": 0.003}},
        "admm": {
            "epochs": 6,
            "update_every": 2,
            "rho": 0.01,
            "rho_growth": 1.5,
            "optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9},
        },
        "retrain": {"epochs": 3, "optimizer": {"name": "adam", "lr": 0.001}},
        "constraints": {"fc1": {"unstructured": 0.05}, "fc2": {"filters": 0.5, "columns": 0.5}},
    }
    for k, v in changes.items():
        r[k] = v
    return r


def shortened(recipe, admm_epochs=2):
    """``recipe`` with one epoch of pretraining and retraining and ``admm_epochs`` of ADMM
    (a Z/U update each): seconds, for tests that run recipes rather than study training."""
    r = dict(recipe)
    r["pretrain"] = {**r["pretrain"], "epochs": 1}
    r["admm"] = {**r["admm"], "epochs": admm_epochs, "update_every": 1}
    r["retrain"] = {**r["retrain"], "epochs": 1}
    return r


def write(path, recipe):
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "admmprune", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def masks_of(run_dir):
    return safe_load(Path(run_dir) / "masks.pt", "masks")["masks"]


@pytest.mark.xdist_group("demo")
def test_demo_end_to_end_in_process(demo_run, capsys):
    # The README's first command runs exactly this (`make demo` → `admmprune demo`).
    code, run_dir, out = demo_run
    assert code == 0
    assert "test accuracy: dense" in out and "compression: constrained layers" in out
    assert "| fc1.weight | 500×200 | Unstructured(keep=0.02) | 2,000 / 100,000 | 2.00 |" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["constrained_layers"]["rate"] > 20
    assert summary["accuracy"]["final"] >= summary["accuracy"]["dense"] - 0.01
    for name in ("metrics.jsonl", "model.pt", "masks.pt", "layers.md", "recipe.yaml"):
        assert (run_dir / name).is_file()
    for name in ("kept.png", "residuals.png", "training.png"):  # plots in every run dir
        png = (run_dir / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert {r["stage"] for r in rows} == {"pretrain", "admm", "prune", "retrain"}
    updates = [r for r in rows if r.get("event") == "update"]
    assert len(updates) == 5 and all("primal" in v for v in updates[0]["layers"].values())
    # the report command re-prints it
    assert main(["report", str(run_dir)]) == 0
    assert "compression: constrained layers" in capsys.readouterr().out


def test_shortened_recipe_via_subprocess(tmp_path):
    r = write(tmp_path / "r.yaml", tiny_recipe(tmp_path / "run"))
    proc = run_cli("run", str(r))
    assert proc.returncode == 0, proc.stderr
    assert "compression: constrained layers" in proc.stdout
    W = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["fc1.weight"]
    assert int((W != 0).sum()) <= round(0.05 * W.numel())
    W2 = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["fc2.weight"]
    assert int((W2.abs().sum(1) > 0).sum()) <= 50 and int((W2.abs().sum(0) > 0).sum()) <= 150


def _wait_for_checkpoint(run_dir, proc, stage, epoch, timeout=120):
    ckpt = Path(run_dir) / "checkpoint.pt"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run finished before it could be interrupted"
        if ckpt.exists():
            try:
                st = safe_load(ckpt, "ckpt")
            except ValueError:  # being replaced this instant
                continue
            if st["stage"] == stage and st["epoch"] >= epoch:
                return st
        time.sleep(0.01)
    raise AssertionError("no checkpoint in time")


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    ref = write(tmp_path / "ref.yaml", shortened(tiny_recipe(tmp_path / "ref"), 4))
    assert run_cli("run", str(ref)).returncode == 0

    recipe = shortened(tiny_recipe(tmp_path / "killed"), 4)
    path = write(tmp_path / "killed.yaml", recipe)
    proc = subprocess.Popen(
        [sys.executable, "-m", "admmprune", "run", str(path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    st = _wait_for_checkpoint(tmp_path / "killed", proc, "admm", 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert st["stage"] == "admm" and not (tmp_path / "killed" / "summary.json").exists()

    # without --resume the run dir is protected
    again = run_cli("run", str(path))
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = run_cli("run", str(path), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout

    a, b = masks_of(tmp_path / "ref"), masks_of(tmp_path / "killed")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    sa = json.loads((tmp_path / "ref" / "summary.json").read_text())
    sb = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert sa["accuracy"] == sb["accuracy"]
    wa = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)
    wb = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # metrics.jsonl has no duplicated epochs after the resume
    rows = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").open()]
    keys = [(r["stage"], r.get("epoch"), r.get("update")) for r in rows]
    assert len(keys) == len(set(keys))


def test_ctrl_c_saves_mid_epoch_and_resumes_identically(tmp_path):
    # Bigger batches count: batch 8 makes epochs long enough to interrupt mid-epoch; one
    # epoch of the stages around ADMM, whose second epoch is interrupted
    base = shortened(tiny_recipe(tmp_path / "ref", data={"name": "digits", "batch_size": 8}), 3)
    assert run_cli("run", str(write(tmp_path / "ref.yaml", base))).returncode == 0
    recipe = dict(base, output_dir=str(tmp_path / "int"))
    path = write(tmp_path / "int.yaml", recipe)
    proc = subprocess.Popen(
        [sys.executable, "-m", "admmprune", "run", str(path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_checkpoint(tmp_path / "int", proc, "admm", 1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err
    st = safe_load(tmp_path / "int" / "checkpoint.pt", "ckpt")
    assert st["stage"] == "admm"
    resumed = run_cli("run", str(path), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = masks_of(tmp_path / "ref"), masks_of(tmp_path / "int")
    assert all(torch.equal(a[n], b[n]) for n in a)
    wa = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)
    wb = torch.load(tmp_path / "int" / "model.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_force_replaces_and_resume_needs_same_recipe(tmp_path):
    path = write(tmp_path / "r.yaml", shortened(tiny_recipe(tmp_path / "run")))
    assert run_cli("run", str(path)).returncode == 0
    (tmp_path / "run" / "mine.txt").write_text("user file")
    changed = write(tmp_path / "r2.yaml", shortened(tiny_recipe(tmp_path / "run", seed=7)))
    proc = run_cli("run", str(changed), "--resume")
    assert proc.returncode == 2 and "differs" in proc.stderr
    assert (tmp_path / "run" / "mine.txt").exists()
    proc = run_cli("run", str(changed), "--force")
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "run" / "mine.txt").exists()


def test_every_shipped_recipe_validates():
    recipes = sorted((ROOT / "configs").glob("*.yaml"))
    assert recipes, "configs/ holds at least the demo recipe"
    for path in recipes:
        recipe = load_recipe(path)
        spec, default = recipe.spec()
        assert spec or default or recipe.coupled(), path  # something is constrained


def test_authors_layout_is_converted():
    r = parse_recipe(
        {
            "model": {"name": "lenet5"},
            "prune_ratios": {"conv1.weight": 0.8, "fc1.weight": 0.991},
            "rho": 0.001,
            "admm_epoch": 4,
            "multi_rho": True,
            "sparsity_type": "irregular",
        }
    )
    assert r.constraints == {
        "conv1.weight": {"unstructured": 0.2},
        "fc1.weight": {"unstructured": 0.009},
    }
    assert (r.admm.rho, r.admm.update_every, r.admm.rho_growth) == (0.001, 4, 1.3)
    r = parse_recipe(
        {
            "model": {"name": "lenet5"},
            "prune_ratios": {"conv1": 0.5},
            "sparsity_type": "filter+column",
        }
    )
    assert r.constraints == {"conv1": {"filters": 0.5, "columns": 0.5}}


def corrupt_checkpoint(tmp_path):
    p = tmp_path / "corrupt.pt"
    p.write_bytes(b"\x00garbage")
    return str(p)


BAD = [
    ("unknown_key", lambda t: {"epochs": 3}, "epochs: unknown key; allowed here: seed"),
    ("nested_unknown_key", lambda t: {"admm": {"rho_grow": 2}}, "admm.rho_grow: unknown key"),
    ("negative_lr", lambda t: {"pretrain": {"optimizer": {"lr": -0.1}}}, "pretrain.optimizer.lr"),
    ("keep_1.5", lambda t: {"constraints": {"fc1": {"unstructured": 1.5}}}, "fraction KEPT"),
    ("unknown_constraint", lambda t: {"constraints": {"fc1": {"rows": 0.5}}}, "'unstructured'"),
    ("wrong_type", lambda t: {"admm": {"epochs": "ten"}}, "admm.epochs"),
    ("unknown_optimizer", lambda t: {"retrain": {"optimizer": {"name": "lion"}}}, "'sgd'"),
    (
        "missing_data_dir",
        lambda t: {"data": {"name": "mnist", "dir": str(t / "nope")}},
        "does not exist",
    ),
    ("mnist_without_dir", lambda t: {"data": {"name": "mnist"}}, "needs a data dir"),
    ("unknown_model", lambda t: {"model": {"name": "resnet9000"}}, "unknown model 'resnet9000'"),
    ("bad_import_path", lambda t: {"model": {"name": "nopkg.mod:make"}}, "cannot import model"),
    (
        "pattern_matches_nothing",
        lambda t: {"constraints": {"conv9": {"filters": 0.5}}},
        "'conv9' matches no",
    ),
    (
        "two_keys_one_layer",
        lambda t: {"constraints": {"fc*": {"unstructured": 0.5}, "fc1": {"unstructured": 0.1}}},
        "claimed by two",
    ),
    (
        "wrong_rank",
        lambda t: {"constraints": {"fc1.bias": {"filters": 0.5}}},
        "at least 2 dimensions",
    ),
    (
        "corrupt_checkpoint",
        lambda t: {"model": {"name": "lenet300", "checkpoint": corrupt_checkpoint(t)}},
        "cannot read model checkpoint",
    ),
    (
        "missing_checkpoint",
        lambda t: {"model": {"name": "lenet300", "checkpoint": str(t / "x.pt")}},
        "no such file",
    ),
    ("nothing_constrained", lambda t: {"constraints": {"fc1": None}}, "no layer is constrained"),
    (
        "bad_sparsity_type",
        lambda t: {"constraints": None, "prune_ratios": {"fc1": 0.5}, "sparsity_type": "pattern"},
        "sparsity_type",
    ),
    ("bad_device", lambda t: {"device": "tpu"}, "device 'tpu'"),
    ("quantize_1_bit", lambda t: {"quantize": {"layers": {"fc1": 1}}}, "quantize.layers.fc1"),
    (
        "quantize_unknown_layer",
        lambda t: {"quantize": {"layers": {"conv7": 4}}},
        "'conv7' matches no",
    ),
    ("quantize_without_layers", lambda t: {"quantize": {"epochs": 2}}, "quantize.layers is empty"),
    ("adam_metric_with_sgd", lambda t: {"admm": {"metric": "adam"}}, "admm.metric: adam reads"),
    (
        "oneshot_start_with_filters",
        lambda t: {"admm": {"init": "oneshot"}},
        "'fc2.weight': Filters removes output rows",
    ),
    (
        "metric_without_admm",
        lambda t: {"method": "gradual", "admm": {"metric": "fisher"}},
        "is the metric of ADMM's projection, but method is gradual",
    ),
]


@pytest.mark.parametrize("case,change,message", BAD, ids=[b[0] for b in BAD])
def test_bad_recipes_fail_clearly_and_leave_nothing(tmp_path, case, change, message, capsys):
    recipe = tiny_recipe(tmp_path / "run")
    for k, v in change(tmp_path).items():
        if v is None:
            recipe.pop(k)
        elif isinstance(v, dict) and isinstance(recipe.get(k), dict) and k != "constraints":
            recipe[k] = {**recipe[k], **v}
        else:
            recipe[k] = v
    path = write(tmp_path / "bad.yaml", recipe)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "run").exists()


def test_not_yaml_and_missing_recipe(tmp_path, capsys):
    (tmp_path / "x.yaml").write_text("model: [unclosed")
    assert main(["run", str(tmp_path / "x.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "not a finished admmprune run" in capsys.readouterr().err


def test_recipe_errors_are_recipe_errors():
    with pytest.raises(RecipeError, match="mapping"):
        parse_recipe(["a"])
    assert os.path.islink(ROOT / "configs" / "demo_digits.yaml")  # one source for the demo


def resnet20_recipe(tmp_path, **changes):
    """ResNet-20 on a small fake CIFAR-shaped .npz, coupled channel groups at half."""
    from test_models_data import fake_npz

    recipe = {
        "seed": 0,
        "output_dir": str(tmp_path / "run"),
        "device": "cpu",
        "progress": False,
        "model": {"name": "resnet20"},
        "data": {"name": "npz", "path": str(fake_npz(tmp_path / "d.npz", hw=32)), "batch_size": 32},
        "pretrain": {"epochs": 1},
        "admm": {"epochs": 2, "updates_per_epoch": 2, "rho": 0.05, "rho_growth": 2.0},
        "retrain": {"epochs": 1},
        "coupled_channels": {"keep": 0.5},
    }
    return recipe | changes


def test_coupled_channels_recipe_compacts_exactly(tmp_path):
    recipe = resnet20_recipe(tmp_path)
    assert main(["run", str(write(tmp_path / "r.yaml", recipe))]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    k = summary["compact"]
    assert k["zero_channels_not_removable"] == 0
    assert k["channels_removed"] > 200  # half of every coupled group
    assert k["dead_input_weights_zeroed"] > 0  # consumers' slices of removed channels
    assert k["mac_reduction"] > 2.5  # conv MACs scale with in × out channels: about 4x
    constraints = {layer["constraint"] for layer in summary["layers"]}
    assert all(c.startswith("ChannelGroup(") for c in constraints)


def test_filter_plus_column_on_a_resnet_via_recipe(tmp_path):
    """StructADMM's combination: coupled channel groups plus a column set on the same convs."""
    from admmprune.sets.constraints import keep_count

    recipe = resnet20_recipe(
        tmp_path,
        pretrain={"epochs": 0},
        admm={"epochs": 1, "updates_per_epoch": 2, "rho": 0.05},
        coupled_channels={"keep": 0.75},
        constraints={"layer*.conv*": {"columns": 0.4}},
    )
    assert main(["run", str(write(tmp_path / "r.yaml", recipe))]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["compact"]["zero_channels_not_removable"] == 0
    both = [x for x in summary["layers"] if ".conv" in x["name"]]
    assert both and all(" & Columns(keep=0.4)" in x["constraint"] for x in both)
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    for x in both:
        W = state[x["name"]]
        M = W.reshape(W.shape[0], -1)
        assert int(M.ne(0).any(0).sum()) <= keep_count(0.4, M.shape[1])  # the column set
        assert int(M.ne(0).any(1).sum()) <= keep_count(0.75, M.shape[0])  # and the group's


def test_only_columns_or_unstructured_sit_on_a_channel_group(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path / "run", coupled_channels={"keep": 0.5})
    recipe["constraints"] = {"fc1": {"filters": 0.5}}
    assert main(["run", str(write(tmp_path / "r.yaml", recipe))]) == 2
    assert "only a columns or unstructured constraint" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_coupled_channels_list_one_shot_then_compact(tmp_path):
    recipe = {
        "seed": 0,
        "output_dir": str(tmp_path / "run"),
        "device": "cpu",
        "progress": False,
        "model": {"name": "lenet5"},
        "data": {"name": "digits", "batch_size": 64},
        "pretrain": {"epochs": 1},
        "retrain": {"epochs": 1},
        "coupled_channels": [{"layers": "conv1", "keep": 0.5}, {"layers": "fc1", "keep": 0.2}],
    }
    assert main(["run", str(write(tmp_path / "r.yaml", recipe))]) == 0  # no ADMM epochs
    k = json.loads((tmp_path / "run" / "summary.json").read_text())["compact"]
    assert k["zero_channels_not_removable"] == 0
    assert k["channels_removed"] == 10 + 400  # conv1 20 → 10 filters, fc1 500 → 100 neurons


def test_coupled_channels_entries_must_not_overlap(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path / "run", coupled_channels=[{"keep": 0.5}, {"keep": 0.3}])
    recipe["constraints"] = {}
    assert main(["run", str(write(tmp_path / "r.yaml", recipe))]) == 2
    assert "constrain each parameter once" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_coupled_channels_needs_admm(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path / "run", method="magnitude", coupled_channels={"keep": 0.5})
    assert main(["run", str(write(tmp_path / "r.yaml", recipe))]) == 2
    assert "coupled_channels works with method: admm" in capsys.readouterr().err


def test_l1_channel_ranking_is_one_shot_only(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path / "run", coupled_channels={"keep": 0.5, "norm": "l1"})
    recipe["constraints"] = {}
    assert main(["run", str(write(tmp_path / "r.yaml", recipe))]) == 2
    assert "norm: l1 ranks channels for one-shot pruning" in capsys.readouterr().err


def quantized_recipe(out):
    return tiny_recipe(
        out,
        retrain={"epochs": 2, "optimizer": {"name": "adam", "lr": 0.001}},
        quantize={
            "epochs": 3,
            "layers": {"fc1": 3, "fc2": "ternary", "fc3": 4},
            "rho": 0.01,
            "rho_growth": 2.0,
            "updates_per_epoch": 2,
            "optimizer": {"name": "adam", "lr": 0.0005},
        },
    )


def test_prune_then_quantize_recipe_lands_on_levels_and_exports(tmp_path):
    from admmprune import load_compressed

    out = tmp_path / "q"
    assert (
        main(["run", str(write(tmp_path / "q.yaml", quantized_recipe(out))), "--no-progress"]) == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    W = torch.load(out / "model.pt", weights_only=True)
    masks = masks_of(out)
    for name, levels in (("fc1.weight", 7), ("fc2.weight", 3), ("fc3.weight", 15)):
        assert W[name].unique().numel() <= levels, name  # every weight on a level (0 included)
        assert torch.all(W[name][~masks[name]] == 0) if name in masks else True
    assert summary["storage"]["distinct_values"]["fc2.weight"] <= 3
    assert summary["accuracy"]["final"] >= summary["accuracy"]["dense"] - 0.05
    # the packed file is what the accounting says, and loads back to the same model
    st = summary["storage"]
    assert abs(8 * st["file_bytes"] - st["total_bits"]) <= 0.05 * st["total_bits"]
    assert st["rate"] > 20 and st["weights_rate"] > st["rate"]
    model = load_compressed(out / "model.admmprune")
    assert all(torch.equal(model.state_dict()[k], W[k]) for k in W)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").open()]
    assert sum(r.get("event") == "update" and r["stage"] == "quantize" for r in rows) == 6

    # `admmprune export`: the packed file again (same bytes) and ONNX of the compact model
    assert (
        main(
            [
                "export",
                str(out),
                "--out",
                str(tmp_path / "again.bin"),
                "--onnx",
                str(tmp_path / "m.onnx"),
            ]
        )
        == 0
    )
    assert (tmp_path / "again.bin").read_bytes() == (out / "model.admmprune").read_bytes()
    import onnxruntime

    x = torch.randn(5, 1, 8, 8)
    sess = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    (logits,) = sess.run(None, {"input": x.numpy()})
    with torch.no_grad():
        expected = model.eval()(x)
    assert (torch.from_numpy(logits) - expected).abs().max() <= 1e-4


def test_resume_in_the_quantize_stage_is_exact(tmp_path):
    ref = write(tmp_path / "ref.yaml", shortened(quantized_recipe(tmp_path / "ref")))
    assert run_cli("run", str(ref)).returncode == 0
    path = write(tmp_path / "k.yaml", shortened(quantized_recipe(tmp_path / "k")))
    proc = subprocess.Popen(
        [sys.executable, "-m", "admmprune", "run", str(path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for_checkpoint(tmp_path / "k", proc, "quantize", 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_cli("run", str(path), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    wa = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)
    wb = torch.load(tmp_path / "k" / "model.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_masked_mapping_recipe_lands_on_levels(tmp_path):
    r = quantized_recipe(tmp_path / "mm")
    r["quantize"] = {**r["quantize"], "method": "masked_mapping", "mapping_share": 0.4}
    assert main(["run", str(write(tmp_path / "mm.yaml", r)), "--no-progress"]) == 0
    W = torch.load(tmp_path / "mm" / "model.pt", weights_only=True)
    assert W["fc1.weight"].unique().numel() <= 7 and W["fc2.weight"].unique().numel() <= 3
    rows = [json.loads(x) for x in (tmp_path / "mm" / "metrics.jsonl").open()]
    shares = [r["frozen"]["fc1.weight"] for r in rows if r.get("event") == "freeze"]
    assert shares == pytest.approx([0.4, 0.8, 1.0], abs=0.01)


def test_ssauto_recipe_meets_the_mac_target_with_its_own_rates(tmp_path):
    recipe = {
        "seed": 0,
        "output_dir": str(tmp_path / "run"),
        "device": "cpu",
        "progress": False,
        "model": {"name": "lenet5"},
        "data": {"name": "digits", "batch_size": 64},
        "pretrain": {"epochs": 2, "optimizer": {"name": "adam", "lr": 0.003}},
        "method": "ssauto",
        "ssauto": {"layers": ["conv2", "fc1"], "target": 0.3, "by": "macs", "updates_per_epoch": 2},
        "admm": {"epochs": 2, "optimizer": {"name": "adam", "lr": 0.001}},
        "retrain": {"epochs": 1},
    }
    assert main(["run", str(write(tmp_path / "r.yaml", recipe))]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").open()]
    updates = [r for r in rows if r.get("event") == "update"]
    assert len(updates) == 4 and all("lambda" in r for r in updates)
    assert updates[-1]["kept"] == pytest.approx(0.3, abs=0.02)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    kept = {x["name"]: x["kept"] / x["total"] for x in summary["layers"]}
    assert (
        set(kept) == {"conv2.weight", "fc1.weight"} and kept["conv2.weight"] != kept["fc1.weight"]
    )


def test_ssauto_recipe_refuses_constraints(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path / "run", method="ssauto", ssauto={"layers": ["fc1"]})
    assert main(["run", str(write(tmp_path / "r.yaml", recipe))]) == 2
    assert "ssauto.layers" in capsys.readouterr().err


@pytest.mark.parametrize("updates_per_epoch", [0, 2])
def test_admm_schedule_restarts_only_at_epoch_end_updates(tmp_path, updates_per_epoch):
    """``lr_reset`` restarts a cosine schedule at each Z/U update that falls at an epoch end
    (every ``update_every`` epochs); with updates inside the epochs one schedule spans the
    stage (it once restarted every epoch there, leaving every other epoch at lr 0)."""
    admm = {
        "epochs": 4,
        "update_every": 2,
        "updates_per_epoch": updates_per_epoch,
        "rho": 0.01,
        "optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9},
        "schedule": {"name": "cosine"},
    }
    out = tmp_path / "run"
    recipe = tiny_recipe(out, admm=admm, retrain={"epochs": 1})
    assert main(["run", str(write(tmp_path / "r.yaml", recipe)), "--no-progress"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").open()]
    lrs = [r["lr"] for r in rows if r["stage"] == "admm" and "epoch" in r and "event" not in r]
    if updates_per_epoch:  # cosine over the 4 epochs: 0.02 · (1 + cos(π·e/4)) / 2
        assert lrs == pytest.approx([0.02 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)])
    else:  # cosine over each 2-epoch period, restarted at the updates
        assert lrs == pytest.approx([0.02, 0.01, 0.02, 0.01])


def test_head_groups_recipe_removes_heads_and_counts_attention_macs(tmp_path):
    recipe = tiny_recipe(
        tmp_path / "run",
        model={"name": "tiny_models:vit"},
        coupled_channels={"kind": "heads", "keep": 0.5},
        constraints={},
        pretrain={"epochs": 1},
        admm={"epochs": 2, "update_every": 1, "rho": 0.05},
        retrain={"epochs": 1},
    )
    assert main(["run", str(write(tmp_path / "r.yaml", recipe))]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    k = summary["compact"]
    assert k["heads_removed"] == 2  # 4 → 2 heads
    assert k["all_macs_compact"] < k["all_macs_dense"]
    assert {x["constraint"] for x in summary["layers"]} == {
        "ChannelGroup('encoder.layers.encoder_layer_0.self_attention', keep=0.5, n=4, heads)"
    }
