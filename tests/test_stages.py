"""The pipeline as stages: the runner knows no stage by name; a new stage is one class; runs
started by the pipeline before the stage classes resume after them; the finishing steps work
alone; the demo's metrics rows are those of the pipeline before the stage classes."""

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import admmprune as ap
from admmprune._io import safe_load
from admmprune.run import pipeline, runner
from admmprune.run.config import StageCfg
from admmprune.run.finish import compact_stats, model_spec, storage_stats, write_run_files
from admmprune.run.parse import load_recipe
from admmprune.run.stages import STAGES, Stage
from test_pipeline import ROOT

FIXTURES = Path(__file__).parent / "fixtures"
SRC = ROOT / "src" / "admmprune" / "run"


def same_arithmetic(now: dict, then: dict) -> bool:
    """Does this CPU round like the one that wrote a fixture? Judged on a run's first metrics
    row (pretrain epoch 1): one epoch of SGD turns any difference in the last bits into one
    far above 1e-9 (the fixtures were written on an Intel CPU; an AMD EPYC differs by 5e-4)."""
    a, b = flat_numbers(now), flat_numbers(then)
    return a.keys() == b.keys() and a == pytest.approx(b, rel=1e-9, abs=1e-12)


@pytest.mark.xdist_group("demo")
def test_the_demo_writes_the_metrics_rows_of_the_pipeline_before_the_stages(demo_run):
    """fixtures/demo_metrics.jsonl: `admmprune demo` before the stage classes. On a CPU that
    rounds like the fixture's, every number to 1e-9 relative; on another, the same rows,
    keys and non-numeric values, and accuracies within 2 points (the last-bit differences
    grow through training)."""
    code, run_dir, _ = demo_run
    assert code == 0
    now = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    before = [json.loads(x) for x in (FIXTURES / "demo_metrics.jsonl").open()]
    assert len(now) == len(before) == 46
    exact = same_arithmetic(now[0], before[0])
    for a, b in zip(now, before):
        assert list(a) == list(b)  # the same rows, their keys in the same order
        if not exact:
            assert flat_others(a) == flat_others(b)
            for key in ("train_acc", "test_acc"):
                if key in a:
                    assert a[key] == pytest.approx(b[key], abs=0.02), key
            continue
        # the logged penalty is an fp32 sum whose reduction changed since (torch.dist): the
        # gradient and so every other number are the same to the last bits
        fa, fb = flat_numbers(a), flat_numbers(b)
        if "penalty" in fa:
            assert fa.pop("penalty") == pytest.approx(fb.pop("penalty"), rel=1e-5)
        assert fa == pytest.approx(fb, rel=1e-9, abs=1e-12)
        assert flat_others(a) == flat_others(b)


def flat_numbers(row: dict) -> dict:
    from admmprune.run.parse import flatten

    return {k: v for k, v in flatten(row).items() if isinstance(v, float | int)}


def flat_others(row: dict) -> dict:
    from admmprune.run.parse import flatten

    return {k: v for k, v in flatten(row).items() if not isinstance(v, float | int)}


def fixture_recipe(out: Path):
    return load_recipe(FIXTURES / "resume_v1.yaml", {"output_dir": str(out)})


@pytest.mark.parametrize("fixture", ["resume_v0", "resume_v1"])
def test_a_run_started_before_the_stage_classes_resumes_after_them(tmp_path, fixture):
    """Checkpoints older pipelines wrote mid-ADMM (make_resume_fixture.py): v0 before this
    session (unsealed, no data fingerprint), v1 just before the stage classes. Resumed here,
    each ends exactly where an uninterrupted run ends."""
    ref = pipeline.run(pipeline.prepare(fixture_recipe(tmp_path / "ref")), log=lambda *a: None)
    old = tmp_path / "old"
    shutil.copytree(FIXTURES / fixture, old)
    state = safe_load(old / "checkpoint.pt", "fixture")
    assert (state["stage"], state["epoch"], state["batch"]) == ("admm", 1, 3)
    assert ("data_fingerprint" in state) == (fixture == "resume_v1")
    resumed = pipeline.run(pipeline.prepare(fixture_recipe(old), resume=True), log=lambda *a: None)
    a, b = (safe_load(d / "model.pt", "model") for d in (tmp_path / "ref", old))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    first = [json.loads(next((d / "metrics.jsonl").open())) for d in (tmp_path / "ref", old)]
    if same_arithmetic(*first):  # this CPU computes the fixture's first epochs bit for bit
        assert resumed["accuracy"] == ref["accuracy"]
        assert all(torch.equal(a[k], b[k]) for k in a)
    else:  # the checkpoint still loads and finishes; the bits before it were another CPU's
        assert resumed["accuracy"] == pytest.approx(ref["accuracy"], abs=0.03)
        kept = [{k: int(t.count_nonzero()) for k, t in m.items() if t.ndim > 1} for m in (a, b)]
        assert kept[0] == kept[1]  # the same constrained counts


CALLS: list = []


class Recorder(Stage):
    """A test-only stage after the others: records what the runner calls, trains for real,
    keeps a counter in its checkpoint entry, and presses Ctrl-C once when asked."""

    name = "record"
    stop_at: tuple | None = None  # (epoch, batch) at which to set the runner's stop flag

    def __init__(self, run) -> None:
        super().__init__(run)
        self.steps = 0

    @property
    def cfg(self):
        return StageCfg(epochs=2, optimizer={"name": "sgd", "lr": 0.01})

    def begin(self, opt, state) -> None:
        if state is not None:
            self.steps = state["record"]["steps"]
        CALLS.append(("begin", None if state is None else (state["epoch"], state["batch"])))

    def before_epoch(self, epoch) -> None:
        CALLS.append(("before_epoch", epoch))

    def on_step(self, epoch):
        def step(b):
            self.steps += 1
            if Recorder.stop_at == (epoch, b):
                Recorder.stop_at = None
                self.run.flag.stop = True

        return step

    def end_epoch(self, epoch, res, opt, sched):
        CALLS.append(("end_epoch", epoch, self.steps))
        return {"recorded_steps": self.steps}, sched

    def end(self) -> None:
        CALLS.append(("end", self.steps))

    def state_dict(self) -> dict:
        return {"record": {"steps": self.steps}}


def test_a_new_stage_is_one_class_run_by_the_real_runner_with_resume(tmp_path):
    stages = (*STAGES, Recorder)
    quiet = {"log": lambda *a: None, "stages": stages}
    CALLS.clear()
    ref = pipeline.run(pipeline.prepare(fixture_recipe(tmp_path / "ref")), **quiet)
    uninterrupted = list(CALLS)
    steps = runner._steps_per_epoch(pipeline.prepare(fixture_recipe(tmp_path / "x")))
    assert uninterrupted == [
        ("begin", None),
        ("before_epoch", 0),
        ("end_epoch", 1, steps),
        ("before_epoch", 1),
        ("end_epoch", 2, 2 * steps),
        ("end", 2 * steps),
    ]
    CALLS.clear()
    Recorder.stop_at = (1, 4)  # Ctrl-C in the new stage's second epoch, after its batch 4
    with pytest.raises(pipeline.Interrupted, match="record epoch 2/2, after batch 4"):
        pipeline.run(pipeline.prepare(fixture_recipe(tmp_path / "int")), **quiet)
    state = safe_load(tmp_path / "int" / "checkpoint.pt", "ckpt")
    assert (state["stage"], state["epoch"], state["batch"]) == ("record", 1, 4)
    assert state["record"] == {"steps": steps + 4}
    CALLS.clear()
    resumed = pipeline.run(pipeline.prepare(fixture_recipe(tmp_path / "int"), resume=True), **quiet)
    assert [("begin", (1, 4)), ("before_epoch", 1), ("end_epoch", 2, 2 * steps),
                     ("end", 2 * steps)] == CALLS  # fmt: skip
    assert resumed["accuracy"] == ref["accuracy"]
    a, b = (safe_load(tmp_path / d / "model.pt", "m") for d in ("ref", "int"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (tmp_path / "int" / "metrics.jsonl").open()]
    assert [r["recorded_steps"] for r in rows if r["stage"] == "record"] == [steps, 2 * steps]


def function_lengths(path: Path) -> dict[str, int]:
    tree = ast.parse(path.read_text())
    return {
        node.name: node.end_lineno - node.lineno + 1
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }


@pytest.mark.parametrize("module", ["pipeline.py", "runner.py", "stages.py", "finish.py"])
def test_no_long_functions_and_no_stage_names_in_the_runner(module):
    lengths = function_lengths(SRC / module)
    assert max(lengths.values()) <= 60, sorted(lengths.items(), key=lambda kv: -kv[1])[:3]
    if module in ("pipeline.py", "runner.py"):
        text = (SRC / module).read_text()
        for name in ("pretrain", "admm", "retrain", "quantize"):
            assert f'== "{name}"' not in text and f"'{name}'" not in text, name


def test_finishing_steps_work_alone(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    with torch.no_grad():
        model[0].weight[::2] = 0
        model[0].bias[::2] = 0
    model.eval()
    x1, xb = torch.randn(1, 1, 8, 8), torch.randn(4, 1, 8, 8)
    stats = compact_stats(model, x1, xb)
    assert stats["channels_removed"] == 4 and stats["mac_reduction"] > 1.5
    assert stats["latency_batch"] == 4 and stats["speedup"] > 0
    recipe = fixture_recipe(tmp_path / "unused")
    data = type("D", (), {"num_classes": 4, "in_channels": 1, "input_size": 8})()
    spec = model_spec(recipe, data)
    assert spec == {"name": "tiny_models:mlp", "num_classes": 4, "in_channels": 1,
                    "input_size": 8, "kwargs": {}}  # fmt: skip
    st = storage_stats(model, tmp_path / "m.admmprune", spec, {"3.weight"})
    assert st["file_bytes"] == (tmp_path / "m.admmprune").stat().st_size
    assert st["distinct_values"] == {"3.weight": int(model[3].weight.unique().numel())}
    back = ap.load_compressed(tmp_path / "m.admmprune", model)
    assert torch.equal(back[0].weight, model[0].weight)
    summary = {"layers": [], "constrained_layers": {"weights": 1, "nonzero": 1, "rate": 1.0}}
    write_run_files(tmp_path, summary)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert (tmp_path / "layers.md").is_file()
