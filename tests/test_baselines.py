import itertools
import json

import pytest
import torch

from admmprune.run.cli import main
from admmprune.run.parse import parse_recipe
from admmprune.run.pipeline import prepare, run
from admmprune.sets.constraints import keep_count
from admmprune.solvers.baselines import cubic_keep, geometric_keep
from test_pipeline import tiny_recipe


def test_schedules_start_dense_and_end_at_target():
    assert geometric_keep(0.01, 0) == 1 and geometric_keep(0.01, 1) == pytest.approx(0.01)
    assert cubic_keep(0.01, 0) == 1 and cubic_keep(0.01, 1) == pytest.approx(0.01)
    path = [cubic_keep(0.1, f / 10) for f in range(11)]
    assert all(b <= a for a, b in itertools.pairwise(path))  # monotone
    assert path[1] - path[2] > path[8] - path[9]  # prunes fast early, slowly late (cubic)


def _run(tmp_path, method, **extra):
    recipe = tiny_recipe(tmp_path / method, method=method, **extra)
    recipe["admm"]["epochs"] = 4
    recipe["retrain"]["epochs"] = 2
    summary = run(prepare(parse_recipe(recipe)), log=lambda *_: None)
    weights = torch.load(tmp_path / method / "model.pt", weights_only=True)
    rows = [json.loads(x) for x in (tmp_path / method / "metrics.jsonl").open()]
    return summary, weights, rows


@pytest.mark.parametrize(
    "method,extra",
    [
        ("magnitude", {}),
        ("iterative", {"heuristic": {"cycles": 3}}),
        ("gradual", {"heuristic": {"prune_every": 5, "end": 0.5}}),
        ("admm", {}),
    ],
)
def test_each_method_reaches_exact_sparsity_and_keeps_zeros(tmp_path, method, extra):
    if method == "admm":
        extra = {}
    summary, W, rows = _run(tmp_path, method, **extra)
    fc1 = W["fc1.weight"]
    assert int((fc1 != 0).sum()) == keep_count(0.05, fc1.numel())  # exact: no zero was regrown
    fc2 = W["fc2.weight"]
    assert int((fc2.abs().sum(1) > 0).sum()) <= keep_count(0.5, 100)
    assert int((fc2.abs().sum(0) > 0).sum()) <= keep_count(0.5, 300)
    assert summary["accuracy"]["final"] > 0.8
    prunes = [r for r in rows if r.get("event") == "prune"]
    if method == "iterative":
        assert [r["kept"] for r in prunes] == sorted((r["kept"] for r in prunes), reverse=True)
        assert len(prunes) == 3
    if method == "gradual":
        assert len(prunes) > 5


def test_progressive_admm_rounds_hold_earlier_zeros(tmp_path):
    recipe = tiny_recipe(tmp_path / "prog")
    recipe["admm"].update(epochs=6, rounds=3, update_every=1)
    run(prepare(parse_recipe(recipe)), log=lambda *_: None)
    rows = [json.loads(x) for x in (tmp_path / "prog" / "metrics.jsonl").open()]
    prunes = [r for r in rows if r.get("event") == "prune" and r["stage"] == "admm"]
    assert [r["round"] for r in prunes] == [0, 1]
    assert prunes[0]["kept"] > prunes[1]["kept"]  # each round prunes further
    updates = [r for r in rows if r.get("event") == "update"]
    assert [u["round"] for u in updates] == [0, 0, 1, 1, 2, 2]
    W = torch.load(tmp_path / "prog" / "model.pt", weights_only=True)["fc1.weight"]
    assert int((W != 0).sum()) == keep_count(0.05, W.numel())


def test_method_is_validated(tmp_path, capsys):
    import yaml

    recipe = tiny_recipe(tmp_path / "x", method="lottery")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["run", str(tmp_path / "r.yaml")]) == 2
    assert (
        "'admm', 'magnitude', 'iterative', 'gradual', 'ssauto' or 'oneshot'"
        in capsys.readouterr().err
    )


def test_admm_updates_per_epoch(tmp_path):
    recipe = tiny_recipe(tmp_path / "steps")
    recipe["admm"].update(epochs=2, updates_per_epoch=4)
    run(prepare(parse_recipe(recipe)), log=lambda *_: None)
    rows = [json.loads(x) for x in (tmp_path / "steps" / "metrics.jsonl").open()]
    updates = [r["update"] for r in rows if r.get("event") == "update"]
    assert updates == list(range(1, 9))  # 23 batches per epoch: steps 5, 11, 17, 23
