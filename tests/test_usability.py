"""What a new user and bad input hit: resume identity, the continue command, errors that must
not be tracebacks, damaged files, `check`, `--set`, progress output, ONNX files, factories."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import admmprune as ap
from admmprune._io import atomic_save, safe_load
from admmprune.run.cli import main
from admmprune.run.report import format_summary
from test_models_data import fake_npz
from test_pipeline import ROOT, _wait_for_checkpoint, run_cli, shortened, tiny_recipe, write


def short_recipe(out, **changes):
    """tiny_recipe with one epoch per stage (two of ADMM): a few seconds."""
    return shortened(tiny_recipe(out, **changes)) | changes


def npz_recipe(out, path, **changes):
    r = short_recipe(out, model={"name": "lenet300"}, **changes)
    r["data"] = {"name": "npz", "dir": str(path), "batch_size": 32}
    return r


def finished(tmp_path, **changes) -> tuple[Path, Path]:
    """A finished short run: its recipe file and run dir."""
    path = write(tmp_path / "r.yaml", short_recipe(tmp_path / "run", **changes))
    assert main(["run", str(path)]) == 0
    return path, tmp_path / "run"


# resume: what is and is not part of a run's identity ------------------------------------------
def interrupt(path: Path, run_dir: Path, *extra: str):
    """Start a run and SIGKILL it once its first ADMM epoch is saved."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "admmprune", "run", str(path), *extra],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for_checkpoint(run_dir, proc, "admm", 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_resume_accepts_display_and_placement_flags(tmp_path):
    recipe = short_recipe(tmp_path / "run", device="auto", progress=True)
    recipe["admm"]["epochs"] = 4
    path = write(tmp_path / "r.yaml", recipe)
    interrupt(path, tmp_path / "run")
    proc = run_cli(
        "run", str(path), "--output-dir", str(tmp_path / "run"), "--resume", "--no-progress",
        "--device", "cpu",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "summary.json").is_file()


def test_resume_names_the_keys_that_differ(tmp_path, capsys):
    _, run_dir = finished(tmp_path)
    changed = short_recipe(run_dir, seed=7)
    changed["admm"]["rho"] = 0.5
    assert main(["run", str(write(tmp_path / "c.yaml", changed)), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "admm.rho (0.01 → 0.5)" in err and "seed (1 → 7)" in err
    assert "pretrain" not in err  # only the differing keys


def test_resume_from_another_folder_with_the_same_data_only(tmp_path, capsys):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    fake_npz(tmp_path / "a" / "d.npz", hw=28)
    shutil.copy(tmp_path / "a" / "d.npz", tmp_path / "b" / "d.npz")  # the same data, moved
    fake_npz(tmp_path / "c" / "d.npz", n_train=100, hw=28)  # other data
    recipe = npz_recipe(tmp_path / "run", tmp_path / "a")
    path = write(tmp_path / "r.yaml", recipe)
    assert main(["run", str(path)]) == 0
    (tmp_path / "run" / "summary.json").unlink()
    assert main(["run", str(path), "--resume", "--data-dir", str(tmp_path / "c")]) == 2
    assert "not the data" in capsys.readouterr().err
    assert main(["run", str(path), "--resume", "--data-dir", str(tmp_path / "b")]) == 0


def test_ctrl_c_prints_the_exact_continue_command_and_counts_from_one(tmp_path):
    """Followed literally, the printed command resumes this run dir; interrupted and resumed
    positions read the same; seconds and the interrupted epoch's loss carry over the resume."""
    # small batches put the interrupt mid-epoch; one epoch of pretraining and retraining
    base = shortened(tiny_recipe(tmp_path / "ref", data={"name": "digits", "batch_size": 8}), 3)
    assert run_cli("run", str(write(tmp_path / "ref.yaml", base))).returncode == 0
    path = write(tmp_path / "int.yaml", base)  # output_dir: ref; the flag sends it elsewhere
    proc = subprocess.Popen(
        [sys.executable, "-m", "admmprune", "run", str(path), "--output-dir", "int"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_checkpoint(tmp_path / "int", proc, "admm", 1)
    time.sleep(0.3)  # into the next epoch
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    command = err.split("Continue with: ")[1].strip()
    st = safe_load(tmp_path / "int" / "checkpoint.pt", "ckpt")
    words = shlex.split(command)
    assert words[0] == "admmprune" and "--resume" in words and "int" in words
    resumed = subprocess.run(
        [sys.executable, "-m", "admmprune", *words[1:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    stage, epoch, batch = st["stage"], st["epoch"], st["batch"]
    epochs = base[stage]["epochs"]
    where = (
        f"{stage} epoch {epoch + 1}/{epochs}, after batch {batch}/"
        if batch
        else f"epoch {epoch}/{epochs}"
    )
    assert where in err and where in resumed.stdout
    # the stage's seconds before the interruption were saved, and the summary adds them up
    before = st["info"]["times"][stage]
    summary = json.loads((tmp_path / "int" / "summary.json").read_text())
    assert before > 0 and summary["seconds"][stage] > before
    # the interrupted epoch's metrics row counts all its batches, as in the uninterrupted run
    rows = {
        run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").open()]
        for run in ("ref", "int")
    }
    epoch_rows = [
        [r for r in rows[run] if r.get("stage") == stage and "train_loss" in r]
        for run in ("ref", "int")
    ]
    assert epoch_rows[0] and [r["train_loss"] for r in epoch_rows[0]] == [
        r["train_loss"] for r in epoch_rows[1]
    ]
    assert [r["train_acc"] for r in epoch_rows[0]] == [r["train_acc"] for r in epoch_rows[1]]


# errors, not tracebacks ----------------------------------------------------------------------
def check_error(capsys, argv, message, nothing_at=None) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("admmprune: error: ") and message in err, err
    assert "Traceback" not in err
    if nothing_at is not None:
        assert not Path(nothing_at).exists()
    return err


def test_unknown_model_kwargs_name_the_accepted_ones(tmp_path, capsys):
    r = short_recipe(tmp_path / "run", model={"name": "lenet5", "kwargs": {"widht": 2}})
    err = check_error(
        capsys, ["run", str(write(tmp_path / "r.yaml", r))],
        "'lenet5' does not take 'widht'", tmp_path / "run",
    )  # fmt: skip
    assert "accepts: num_classes, in_channels, input_size" in err


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "tampered"])
def test_resume_refuses_a_damaged_checkpoint(tmp_path, capsys, damage):
    path, run_dir = finished(tmp_path)
    ckpt = run_dir / "checkpoint.pt"
    data = ckpt.read_bytes()
    half = len(data) // 2
    damaged = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "garbage": os.urandom(len(data)),
        "tampered": data[:half] + bytes([data[half] ^ 1]) + data[half + 1 :],
    }[damage]  # fmt: skip
    ckpt.write_bytes(damaged)
    check_error(capsys, ["run", str(path), "--resume"], str(ckpt))
    assert ckpt.read_bytes() == damaged  # left as it was


def test_a_flipped_weight_byte_in_the_checkpoint_is_refused(tmp_path, capsys):
    """A byte inside a stored weight used to load silently and change the final model."""
    path, run_dir = finished(tmp_path)
    ckpt = run_dir / "checkpoint.pt"
    data = bytearray(ckpt.read_bytes())
    state = safe_load(ckpt, "ckpt")
    w = state["model"]["fc1.weight"]
    needle = w.flatten()[100:104].numpy().tobytes()
    at = bytes(data).index(needle)
    data[at] ^= 0x10
    ckpt.write_bytes(bytes(data))
    check_error(capsys, ["run", str(path), "--resume"], "checksum mismatch")


def test_bad_data_and_recipe_files_are_errors(tmp_path, capsys):
    npz = fake_npz(tmp_path / "d.npz", hw=28)
    npz.write_bytes(npz.read_bytes()[:300])
    r = npz_recipe(tmp_path / "run", tmp_path)
    check_error(capsys, ["run", str(write(tmp_path / "r.yaml", r))], "cannot read npz file")
    r = short_recipe(tmp_path / "run2", data=None)
    path = write(tmp_path / "null.yaml", r)  # `data: null`: --data-dir fills in a section
    assert main(["check", str(path), "--data-dir", str(tmp_path)]) == 0
    assert "recipe OK" in capsys.readouterr().out
    (tmp_path / "latin1.yaml").write_bytes("model: {name: lenet5}  # Größe\n".encode("latin-1"))
    check_error(capsys, ["run", str(tmp_path / "latin1.yaml")], "not UTF-8")


def test_data_null_with_a_data_dir_becomes_that_data_section():
    from admmprune.run.parse import parse_recipe

    r = parse_recipe({"model": {"name": "lenet5"}, "data": None, "constraints": {"fc1": {
        "unstructured": 0.5}}}, {"data.dir": "/some/where"})  # fmt: skip
    assert r.data.dir == "/some/where" and r.data.name == "digits"


def test_export_checks_every_output_path_before_writing(tmp_path, capsys):
    _, run_dir = finished(tmp_path)
    packed = run_dir / "model.admmprune"
    before = packed.stat().st_mtime_ns, packed.read_bytes()
    missing = tmp_path / "missing" / "x.onnx"
    check_error(capsys, ["export", str(run_dir), "--onnx", str(missing)], "does not exist")
    check_error(capsys, ["export", str(run_dir), "--out", str(missing)], "does not exist")
    check_error(capsys, ["export", str(run_dir), "--out", str(tmp_path)], "is a folder")
    assert (packed.stat().st_mtime_ns, packed.read_bytes()) == before


# damaged files never load silently -----------------------------------------------------------
def test_every_single_byte_corruption_of_a_masks_file_is_refused(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    masks = ap.prune(model, {"0": ap.Unstructured(0.5)})
    path = tmp_path / "masks.pt"
    masks.save(path)
    data = path.read_bytes()
    assert ap.Masks.load(path, model)["0.weight"].sum() == 6
    for i in range(len(data)):
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :])
        with pytest.raises(ValueError, match=str(path)):
            ap.Masks.load(path, model)


def test_plain_torch_files_still_load(tmp_path):
    """Masks and checkpoints written before the seal (plain torch.save) still read, and sealed
    files read with torch.load."""
    model = nn.Sequential(nn.Linear(4, 3))
    masks = ap.prune(model, {"0": ap.Unstructured(0.5)})
    torch.save(masks.state_dict(), tmp_path / "old.pt")
    assert torch.equal(ap.Masks.load(tmp_path / "old.pt", model)["0.weight"], masks["0.weight"])
    atomic_save({"x": torch.ones(2)}, tmp_path / "new.pt")
    assert torch.equal(safe_load(tmp_path / "new.pt", "x")["x"], torch.ones(2))
    # and a sealed file is still an ordinary torch file for other tools
    assert torch.equal(torch.load(tmp_path / "new.pt", weights_only=True)["x"], torch.ones(2))


def test_any_load_error_names_the_file(tmp_path):
    bad = tmp_path / "bad.pt"
    for content in (b"\xff\xfe garbage", b"PK\x03\x04" + b"\x00" * 40, b""):
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=str(bad)):
            safe_load(bad, "masks")


# the new user's path ---------------------------------------------------------------------------
def test_check_validates_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    path = write(tmp_path / "r.yaml", short_recipe(tmp_path / "run"))
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "recipe OK" in out and "fc1.weight" in out and "Unstructured(keep=0.05)" in out
    assert "admm" in out and "nothing was written" in out
    assert not (tmp_path / "run").exists()
    bad = write(tmp_path / "b.yaml", short_recipe(tmp_path / "run", constraints={"fc9": {
        "unstructured": 0.5}}))  # fmt: skip
    check_error(capsys, ["check", str(bad)], "'fc9' matches no", tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "mine.txt").write_text("x")
    check_error(capsys, ["check", str(path)], "is not empty")  # the run dir is checked too


def test_set_overrides_are_validated_and_recorded(tmp_path, capsys):
    path = write(tmp_path / "r.yaml", short_recipe(tmp_path / "run"))
    check_error(capsys, ["check", str(path), "--set", "admm.rho=-1"], "admm.rho")
    check_error(capsys, ["check", str(path), "--set", "admm.rhoo=1"], "unknown key")
    check_error(capsys, ["check", str(path), "--set", "seed"], "KEY.PATH=VALUE")
    argv = ["run", str(path), "--set", "admm.rho=0.02", "--set", "constraints.fc1={filters: 0.5}"]
    assert main(argv) == 0
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert saved["admm"]["rho"] == 0.02 and saved["constraints"]["fc1"] == {"filters": 0.5}


def test_no_progress_bars_off_a_terminal_but_a_line_per_epoch_with_eta(tmp_path):
    r = short_recipe(tmp_path / "run", progress=True)
    proc = run_cli("run", str(write(tmp_path / "r.yaml", r)))
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr, proc.stderr[:300]
    epoch_lines = [x for x in proc.stdout.splitlines() if x.startswith("[admm ")]
    assert len(epoch_lines) == 2 and all("ETA" in x for x in epoch_lines)


def test_version_license_typing_and_changelog(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert (
        exit_.value.code == 0 and capsys.readouterr().out.strip() == f"admmprune {ap.__version__}"
    )
    assert 'license = "MIT"' in (ROOT / "pyproject.toml").read_text()
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert (Path(ap.__file__).parent / "py.typed").is_file()
    assert "## 0.1.0" in (ROOT / "CHANGELOG.md").read_text()


def test_onnx_export_is_one_runnable_file_and_every_file_is_reported(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime", reason="needs the onnx extra")
    _, run_dir = finished(tmp_path)
    capsys.readouterr()
    assert main(["export", str(run_dir), "--onnx", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    written = [line.split()[1] for line in out.splitlines() if line.startswith("wrote ")]
    on_disk = sorted(str(p) for p in tmp_path.glob("m.onnx*"))
    assert (
        sorted(w for w in written if Path(w).parent == tmp_path)
        == on_disk
        == [str(tmp_path / "m.onnx")]
    )
    alone = tmp_path / "elsewhere"
    alone.mkdir()
    shutil.copy(tmp_path / "m.onnx", alone / "m.onnx")  # the one file, nothing beside it
    sess = ort.InferenceSession(str(alone / "m.onnx"))
    (logits,) = sess.run(None, {"input": torch.randn(3, 1, 8, 8).numpy()})
    assert logits.shape == (3, 10)


FACTORY = """
from torch import nn


def make(num_classes, hidden=32):
    layers = [nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)
"""


def test_the_console_script_imports_a_factory_from_the_current_folder(tmp_path):
    (tmp_path / "mymodels.py").write_text(FACTORY)
    r = short_recipe(tmp_path / "run", model={"name": "mymodels:make", "kwargs": {"hidden": 16}})
    r["constraints"] = {"1": {"unstructured": 0.5}}
    write(tmp_path / "r.yaml", r)
    script = Path(sys.executable).parent / "admmprune"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [str(script), "check", "r.yaml"], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert "1.weight" in proc.stdout


def test_factory_gets_the_shape_arguments_it_names(monkeypatch):
    from admmprune.models import build_model

    def factory(num_classes, in_channels, width=4):
        return nn.Conv2d(in_channels, num_classes * width, 1)

    module = type(sys)("_adm_test_factories")
    module.factory = factory
    monkeypatch.setitem(sys.modules, "_adm_test_factories", module)
    m = build_model("_adm_test_factories:factory", num_classes=3, in_channels=2, input_size=8,
                    kwargs={"width": 2})  # fmt: skip
    assert (m.in_channels, m.out_channels) == (2, 6)
    with pytest.raises(ValueError, match="accepts: num_classes, in_channels, width"):
        build_model("_adm_test_factories:factory", num_classes=3, in_channels=2, input_size=8,
                    kwargs={"depth": 2})  # fmt: skip


def summary_with(compact: dict) -> dict:
    layer = {"name": "w", "shape": [2, 2], "constraint": "U", "total": 4, "kept": 2}
    return {
        "model": "m", "dataset": "d", "seed": 0, "layers": [layer],
        "accuracy": {"dense": 0.9, "pruned_before_retrain": 0.8, "final": 0.9},
        "constrained_layers": {"weights": 4, "nonzero": 2, "rate": 2.0},
        "all_parameters": {"params": 4, "nonzero": 2, "rate": 2.0},
        "compact": {"mac_reduction": 1.0, "latency_batch": 64, "latency_threads": 2,
                    "zero_channels_not_removable": 0, **compact},
    }  # fmt: skip


def test_the_compaction_line_is_honest():
    assert "compacted" not in format_summary(summary_with({"channels_removed": 0, "speedup": 0.45}))
    slow = format_summary(summary_with({"channels_removed": 3, "speedup": 0.5}))
    assert "measured 2.00x slower" in slow and "faster" not in slow
    fast = format_summary(summary_with({"channels_removed": 3, "speedup": 1.5}))
    assert "measured 1.50x faster" in fast


def test_compact_report_carries_macs():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with torch.no_grad():
        model[0].weight[4:] = 0
        model[0].bias[4:] = 0
    x = torch.randn(1, 3, 10, 10)
    _, report = ap.compact(model, x)
    assert report.macs_before == 8 * 27 * 64 + 4 * 72 * 36
    assert report.macs_after == 4 * 27 * 64 + 4 * 36 * 36
    assert report.mac_reduction == pytest.approx(report.macs_before / report.macs_after)


def test_tensorboard_logs_every_metrics_scalar(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="needs the tensorboard extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    closed = []
    original = SummaryWriter.close
    monkeypatch.setattr(SummaryWriter, "close", lambda w: (closed.append(w), original(w))[1])
    _, run_dir = finished(tmp_path, logging={"tensorboard": True})
    assert len(closed) == 1  # the run closes its writer (its file and thread) when it ends
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    for row in rows:
        if "train_loss" in row:
            assert f"{row['stage']}/epoch/train_loss" in tags
            assert f"{row['stage']}/epoch/test_acc" in tags
    assert any(t.startswith("admm/update/") for t in tags)
    losses = [e.value for e in acc.Scalars("admm/epoch/train_loss")]
    expected = [r["train_loss"] for r in rows if r.get("stage") == "admm" and "train_loss" in r]
    assert losses == pytest.approx(expected)


def test_tensorboard_without_the_extra_is_a_recipe_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import fails
    path = write(tmp_path / "r.yaml", short_recipe(tmp_path / "run", logging={"tensorboard": True}))
    check_error(capsys, ["run", str(path)], "admmprune[tensorboard]", tmp_path / "run")
