"""Data-parallel runs: 2 gloo processes on CPU through torchrun (``admmprune run --nproc 2``)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from admmprune.run import distributed
from admmprune.run.cli import main
from admmprune.run.config import RecipeError
from admmprune.run.distributed import shard_order
from admmprune.run.parse import parse_recipe
from admmprune.run.pipeline import _check_environment

ROOT = Path(__file__).resolve().parents[1]


def recipe(out):
    # digits has 1,437 training images; holding out 1 makes the last batch of 28 split evenly
    return {
        "seed": 1,
        "output_dir": str(out),
        "device": "cpu",
        "progress": False,
        "model": {"name": "lenet300"},
        "data": {"name": "digits", "batch_size": 64, "val_size": 1},
        "pretrain": {"epochs": 2, "optimizer": {"name": "adam", "lr": 0.003}},
        "admm": {
            "epochs": 3,
            "update_every": 1,
            "rho": 0.01,
            "rho_growth": 1.5,
            "optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9},
        },
        "retrain": {"epochs": 1, "optimizer": {"name": "adam", "lr": 0.001}},
        "constraints": {"fc1": {"unstructured": 0.05}, "fc2": {"filters": 0.5, "columns": 0.5}},
    }


def cli(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "admmprune", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env, **kw,
    )  # fmt: skip


def load(run_dir):
    masks = torch.load(run_dir / "masks.pt", weights_only=True)["masks"]
    return masks, torch.load(run_dir / "model.pt", weights_only=True)


def test_shards_cover_each_global_batch_equally():
    order = torch.randperm(150)
    parts = [shard_order(order, 64, r, 2) for r in range(2)]
    assert [len(p) for p in parts] == [32 + 32 + 11, 32 + 32 + 11]  # the last 22 of 23 kept
    for b in range(3):
        got = torch.cat([p[b * 32 : (b + 1) * 32] for p in parts])
        assert torch.equal(
            got.sort().values, order[b * 64 : (b + 1) * 64][: len(got)].sort().values
        )
    assert torch.equal(shard_order(order, 64, 0, 1), order)


def test_two_process_run_equals_one_process_and_resumes_after_sigkill(tmp_path):
    # one test: the uninterrupted two-process run is both the one-process run's match and the
    # killed run's reference (each torchrun run costs ~25 s here)
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump(recipe(tmp_path / "one")))
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump(recipe(tmp_path / "two")))
    r1 = cli("run", str(one))
    assert r1.returncode == 0, r1.stderr
    r2 = cli("run", str(two), "--nproc", "2")
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout.count("run dir:") == 1  # rank 0 alone prints
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["distributed"] == {
        "world_size": 2,
        "backend": "gloo",
        "masks_and_weights_identical_on_all_ranks": True,
    }
    (m1, w1), (m2, w2) = load(tmp_path / "one"), load(tmp_path / "two")
    assert all(torch.equal(m1[k], m2[k]) for k in m1)  # same masks as one process
    # Not bit-identical: one mean over 64 samples and the average of two means over 32 round
    # differently (~1e-8 per step), and Adam divides tiny noisy gradients by their own size;
    # measured after these 6 epochs: at most 3e-5 (SGD alone: 1e-7).
    assert all((w1[k] - w2[k]).abs().max() < 1e-3 for k in w1)

    # killed mid-ADMM (the launcher and both ranks), resumed: the uninterrupted run bit for bit
    path = tmp_path / "k.yaml"
    path.write_text(yaml.safe_dump(recipe(tmp_path / "k")))
    proc = subprocess.Popen(
        [sys.executable, "-m", "admmprune", "run", str(path), "--nproc", "2"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    ckpt = tmp_path / "k" / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, "finished before it could be killed"
        if ckpt.exists():
            try:
                st = torch.load(ckpt, weights_only=True)
            except Exception:  # being replaced this instant
                continue
            # past ADMM's first epoch; a fast machine may write retrain's first checkpoint
            # before this loop sees ADMM's later ones, so any point beyond counts
            stages = ["pretrain", "admm", "retrain"]
            if (stages.index(st["stage"]), st["epoch"]) >= (1, 1):
                break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = cli("run", str(path), "--nproc", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    mk, wk = load(tmp_path / "k")
    assert all(torch.equal(m2[k], mk[k]) for k in m2)
    assert all(torch.equal(w2[k], wk[k]) for k in w2)


def test_global_batch_must_split_over_the_processes(tmp_path, capsys, monkeypatch):
    r = recipe(tmp_path / "odd")
    r["data"]["batch_size"] = 63
    path = tmp_path / "odd.yaml"
    path.write_text(yaml.safe_dump(r))

    def launched(*a):
        raise AssertionError("torchrun started for a recipe it must refuse")

    monkeypatch.setattr(distributed, "launch_args", launched)
    assert main(["run", str(path), "--nproc", "2"]) == 2  # refused before any process starts
    assert "batch_size 63 does not split over 2 processes" in capsys.readouterr().err
    assert not (tmp_path / "odd").exists()
    # the ranks' own check, for torchrun started by hand
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RecipeError, match="use a multiple of 2"):
        _check_environment(parse_recipe(r))


def _ddp_grad_mode_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    import admmprune as ap

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same model on both ranks
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    admm = ap.ADMM(model, {"0": ap.Unstructured(0.25)}, rho=0.5, mode="grad")
    ddp = DistributedDataParallel(model)
    torch.manual_seed(1 + rank)  # different data on each rank
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    nn.functional.cross_entropy(ddp(x), y).backward()
    torch.save({"grad": model[0].weight.grad, "x": x, "y": y}, f"{out}/rank{rank}.pt")
    admm.close()
    dist.destroy_process_group()


def test_grad_mode_term_survives_ddp_averaging(tmp_path):
    """The in-place grad hook runs before DDP's reducer reads the gradient: every rank ends with
    mean(model gradients) + rho·(W − Z + U), the term neither lost nor counted twice."""
    import socket

    import torch.multiprocessing as mp
    from torch import nn

    import admmprune as ap

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_grad_mode_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    admm = ap.ADMM(model, {"0": ap.Unstructured(0.25)}, rho=0.5)
    plain = []
    for s in saved:
        model.zero_grad()
        nn.functional.cross_entropy(model(s["x"]), s["y"]).backward()
        plain.append(model[0].weight.grad.clone())
    W = model[0].weight.detach()
    expected = (plain[0] + plain[1]) / 2 + 0.5 * (W - admm._state["0.weight"].T)
    assert not torch.allclose(expected, (plain[0] + plain[1]) / 2, atol=1e-3)
    for s in saved:
        torch.testing.assert_close(s["grad"], expected, rtol=1e-5, atol=1e-6)
