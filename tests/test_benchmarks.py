"""Benchmark scripts run end to end on the embedded digits data (shortened)."""

import contextlib
import importlib
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_script(command: str) -> subprocess.CompletedProcess:
    """``command`` (a benchmark script and its arguments, split as a shell would) run as
    ``__main__`` from the repository root, in this process: a subprocess would spend longer
    importing torch than most of these tiny runs take. Its exit status, stdout and stderr come
    back as ``subprocess.run`` gives them; the worker's thread count is kept (the scripts ask
    for 2 threads; on the test machine each worker has one core)."""
    script, *args = shlex.split(command)
    out, err, code = io.StringIO(), io.StringIO(), 0
    threads, cwd, argv, path = torch.get_num_threads(), os.getcwd(), sys.argv, list(sys.path)
    set_num_threads = torch.set_num_threads
    try:
        os.chdir(ROOT)
        sys.argv = [script, *args]
        sys.path.insert(0, str((ROOT / script).parent))  # the script's folder, as python does
        torch.set_num_threads = lambda n: None  # restored below
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(ROOT / script), run_name="__main__")
            except SystemExit as exc:
                if isinstance(exc.code, str):
                    print(exc.code, file=sys.stderr)
                code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        os.chdir(cwd)
        sys.argv, sys.path[:] = argv, path
    return subprocess.CompletedProcess(command, code, out.getvalue(), err.getvalue())


def test_mnist_admmnn_benchmark_tiny_run_writes_table_json_png(tmp_path):
    out = tmp_path / "bench"
    proc = run_script(
        "benchmarks/mnist_admmnn.py --dataset digits --rates 10 30 --dense-epochs 2 "
        f"--compress-epochs 1 --retrain-epochs 1 --updates-per-epoch 2 --device cpu --out {out} "
        "--pattern conv1=0.4 conv2=0.2 fc1=0.02 fc2=0.2"
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert {(r["method"], r["target_rate"]) for r in results["runs"]} == {
        (m, r) for m in ("admm", "magnitude", "iterative", "gradual") for r in (10.0, 30.0)
    }
    for r in results["runs"]:
        assert abs(r["rate"] - r["target_rate"]) / r["target_rate"] < 0.01  # rate hit
        assert 0 <= r["accuracy"] <= 1
        k = r["keep_fractions"]  # the given pattern, scaled by one factor
        assert k["conv1"] / k["fc1"] == pytest.approx(20, rel=1e-3)
        assert k["conv2"] == pytest.approx(k["fc2"], rel=1e-3)
    table = (out / "results.md").read_text()
    assert "| admm |" in table and "| 30x |" in table
    png = (out / "accuracy_vs_compression.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_mnist_admmnn_refuses_a_bad_pattern():
    for pattern, message in (
        ("conv1=0.2 conv2=0.1 fc1=x fc2=0.1", "write LAYER=VALUE"),
        ("conv1=0.2 conv2=0.1 fc1=2 fc2=0.1", "the value must be in (0, 1]"),
        ("conv1=0.2 fc1=0.01", "exactly the layers ['conv1', 'conv2', 'fc1', 'fc2']"),
    ):
        proc = run_script(f"benchmarks/mnist_admmnn.py --dataset digits --pattern {pattern}")
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_overhead_benchmark_small_run(tmp_path):
    proc = run_script(
        "benchmarks/overhead.py --batch 4 --rounds 2 --big 1 --repeats 1 "
        f"--out {tmp_path / 'o.json'}"
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "o.json").read_text())
    assert set(res["step"]["median_s"]) == {"plain", "penalty", "grad"}
    assert res["update"]["constrained_params"] >= 1_000_000


def test_overhead_loads_ssauto_of_a_git_revision_beside_this_one():
    import importlib.util

    spec = importlib.util.spec_from_file_location("overhead", ROOT / "benchmarks/overhead.py")
    overhead = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(overhead)
    from admmprune.solvers.ssauto import SSAuto

    ref = overhead.proximal_at("HEAD")
    assert ref.SSAuto is not SSAuto and ref.__name__ != SSAuto.__module__
    times = overhead.ssauto_update_times(1, True, ref.SSAuto)
    assert set(times) == {"first", "next", "admm"} and times["next"] > 0


def test_admmnns_compare_tiny_run_writes_table_and_json(tmp_path):
    out = tmp_path / "cmp"
    proc = run_script(
        f"benchmarks/admmnns_compare.py --dataset digits --quick --rates 10 --rounds 2 --out {out}"
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "results.json").read_text())
    rows = {r["config"]: r for r in res["rows"]}
    assert {"non-structured 10x", "structured", "structured + binary"} <= set(rows)
    for r in res["rows"]:  # indices cost bits: the with-index rate is never the higher one
        assert r["weights_rate"] <= r["weights_rate_without_index"] + 1e-9
        assert set(r["latency"]) == {"b1", "b64"}
    assert rows["structured"]["mac_reduction"] > 2  # compaction really removed filters
    assert (
        rows["non-structured 10x + mixed 5/4/3/4 bits"]["weights_rate"]
        > 3 * rows["non-structured 10x"]["weights_rate"]
    )
    assert "| structured + ternary |" in (out / "results.md").read_text()


def test_admmnns_compare_picks_kinds_quantizers_structure_and_bits(tmp_path):
    out = tmp_path / "cmp"
    proc = run_script(
        "benchmarks/admmnns_compare.py --dataset digits --quick --rounds 1 --kinds structured "
        "--quantizers mixed --structured conv1=0.3 conv2=0.2 fc1=0.05 "
        f"--bits conv1=4 conv2=3 fc1=2 fc2=3 --out {out}"
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "results.json").read_text())
    assert [r["config"] for r in res["rows"]] == ["structured", "structured + mixed 4/3/2/3 bits"]
    summary = json.loads((out / "runs" / "prune0" / "summary.json").read_text())
    assert summary["compact"]["dead_input_weights_zeroed"] > 0
    kept = {x["name"]: x["kept"] for x in summary["layers"]}
    assert kept["conv1.weight"] == 6 * 25  # 0.3 of 20 filters, one input channel
    for args, message in (
        ("--model resnet20 --bits conv1=4", "are for --model lenet5"),
        ("--bits conv1=4 conv2=3 fc1=0 fc2=3", "must be in (0, 16]"),
    ):
        proc = run_script(f"benchmarks/admmnns_compare.py --dataset digits {args}")
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_ssauto_vs_admm_tiny_run(tmp_path):
    out = tmp_path / "ss"
    proc = run_script(f"benchmarks/ssauto_vs_admm.py --dataset digits --quick --out {out}")
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "results.json").read_text())
    assert set(res["runs"]) == {"ssauto", "admm uniform", "admm ssauto-rates"}
    for r in res["runs"].values():  # every method meets the MAC target (±2 % + one group)
        assert abs(r["kept_macs"] - 0.5) < 0.05
    uniform = res["runs"]["admm uniform"]["rates"].values()
    assert max(uniform) - min(uniform) < 0.05  # uniform is uniform; SS-Auto's are its own
    ss = res["runs"]["ssauto"]
    # SS-Auto's coupled rows: its target is the compact model's MACs, and compact removes
    # every channel it killed (the uncoupled hard ADMM rows on residual convs cannot go)
    assert abs(ss["compact_macs"] - 0.5) < 0.05 and ss["channels_removed"] > 0
    assert ss["zero_channels_kept"] == 0
    assert res["runs"]["admm uniform"]["stage_ratio"] == 1.0 and ss["stage_ratio"] > 0
    assert res["dense_latency_ms"] > 0 and all(r["speedup"] > 0 for r in res["runs"].values())
    assert (out / "rates.png").read_bytes()[:4] == b"\x89PNG"


def speed_rows(tmp_path, args: str) -> list[dict]:
    """The rows of a tiny structured_speed.py run (ResNet-20 at 4x, batch 2, one round)."""
    out = tmp_path / "s.json"
    proc = run_script(
        "benchmarks/structured_speed.py --models resnet20 --reductions 4 --rounds 1 --batches 2 "
        f"--out {out} {args}"
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())["rows"]


def test_structured_speed_small_run(tmp_path):
    rows = speed_rows(tmp_path, "")
    assert {r["kind"] for r in rows} == {"channels", "columns", "filters+columns"}
    for r in rows:  # each kind hits the MAC reduction it was asked for
        assert abs(r["mac_reduction"] - 4) / 4 < 0.05, r


def test_structured_speed_deploy_run(tmp_path):
    (row,) = speed_rows(tmp_path, "--deploy --kinds channels")
    forms = ("eager", "compile:default")
    assert row["deploy_choice"]["dense"] in forms and row["deploy_choice"]["compact"] in forms
    proc = run_script("benchmarks/structured_speed.py --deploy --memory-format nchw")
    assert proc.returncode == 2 and "drop --memory-format" in proc.stderr


def test_column_forms_small_run(tmp_path):
    out = tmp_path / "c.json"
    proc = run_script(
        f"benchmarks/column_forms.py --model resnet20 --keep 0.25 --batch 2 --rounds 1 --out {out}"
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    *layers, total = rows
    # ResNet-20's 3x3 convs: the stem, the block convs of 3 widths, 2 strided ones
    assert {(r["in"], r["out"]) for r in layers} == {
        (3, 16), (16, 16), (16, 32), (32, 32), (32, 64), (64, 64)
    }  # fmt: skip
    assert sum(r["count"] for r in layers) == 19
    assert total["total"] and total["dense_ms"] == pytest.approx(
        sum(r["count"] * r["dense_ms"] for r in layers)
    )


def test_semi_structured_speed_plumbing_run_and_refusal(tmp_path):
    pytest.importorskip("transformers", reason="needs the [hf] extra")
    out = tmp_path / "s.json"
    proc = run_script(
        "benchmarks/semi_structured_speed.py --cpu-plumbing --hidden 256 --intermediate 512 "
        f"--layers 2 --vocab 500 --seq-len 8 --batches 1 2 --rounds 1 --out {out}"
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["two_four_linears"] == 2 * 7  # every Linear of both blocks, not lm_head
    parts = [r["part"] for r in result["rows"] if r["batch"] == 2]
    assert parts == [
        "self_attn.q_proj/k_proj/v_proj/o_proj (256, 256)",
        "mlp.gate_proj/up_proj (512, 256)",
        "mlp.down_proj (256, 512)",
        "whole model",
    ]
    assert all(r["rel_diff"] == 0 for r in result["rows"])  # dense vs dense in plumbing mode
    if not torch.cuda.is_available():
        proc = run_script(f"benchmarks/semi_structured_speed.py --out {out}.gpu")
        assert proc.returncode != 0 and "needs a CUDA GPU" in proc.stderr
        assert not Path(f"{out}.gpu").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals where no GPU is")
def test_gpu_checks_script_runs_every_step_and_fails_without_a_gpu(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_checks.sh", str(out)], cwd=ROOT, capture_output=True,
        text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable, "STEP_LIMIT": "120"},
    )  # fmt: skip
    assert proc.returncode == 1
    log = (out / "gpu_checks.log").read_text()
    ends = re.findall(r"^== (\S+): exit (\d+)", log, flags=re.M)
    assert [name for name, _ in ends] == [
        "env", "cuda-tests", "two-four", "compact-latency", "compact-deploy", "fsdp-admm",
        "sparse-decode",
    ]  # fmt: skip
    assert dict(ends)["fsdp-admm"] != "0" and "fsdp_admm.py --device cuda: no CUDA" in log
    assert dict(ends)["sparse-decode"] != "0" and "sparse_decode.py --device cuda: no CUDA" in log
    assert dict(ends)["cuda-tests"] == "0" and "needs a CUDA device" in log  # all skipped
    assert "needs a CUDA GPU" in log and "no CUDA device is available" in log


def test_oneshot_lm_tiny_run(tmp_path):
    pytest.importorskip("transformers", reason="needs the [hf] extra")
    out = tmp_path / "lm"
    proc = run_script(
        "benchmarks/oneshot_lm.py --train-minutes 0.02 --layers 1 --hidden 64 --vocab 300 "
        "--settings 50%,2:4 --solvers magnitude,admm --skip-joint --samples 4 --seq-len 32 "
        "--corpus topics "
        f"--eval-every 10 --out {out}"
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "results.json").read_text())
    rows = {(r["setting"], r["method"]): r for r in result["rows"]}
    assert set(rows) == {(s, m) for s in ("50%", "2:4") for m in ("magnitude", "admm")}
    for r in rows.values():
        assert r["kept"] == pytest.approx(0.5) and r["ppl"] > 1
    assert (out / "perplexity_vs_sparsity.png").read_bytes()[:4] == b"\x89PNG"


def test_admm_lm_measures_each_run_in_its_own_process_and_plots_by_sparsity(tmp_path, monkeypatch):
    # the whole benchmark needs oneshot_lm's corpus and tokenizer (minutes): its parts here.
    # Importable by name, as the spawned child imports it
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    admm_lm = importlib.import_module("admm_lm")
    summary, seconds, peak = admm_lm._in_process(None)  # a process that only imports
    assert summary == {} and seconds >= 0
    # its own peak, not this process's (which has run the tests so far)
    assert 50 * 2**20 < peak < 4 * 2**30
    rows = [{"setting": s, "method": m, "perplexity": p}
            for s, m, p in (("90%", "a", 9.0), ("2:4", "a", 2.0), ("70%", "a", 7.0))]  # fmt: skip
    admm_lm.plot(rows, ["90%", "2:4", "70%"], 1.0, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_cifar_structadmm_tiny_run(tmp_path):
    out = tmp_path / "cs"
    proc = run_script(f"benchmarks/cifar_structadmm.py --dataset digits --quick --out {out}")
    assert proc.returncode == 0, proc.stderr
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert set(runs) == {"structadmm", "structadmm filters+columns", "magnitude"}
    a, b, fc = runs["structadmm"], runs["magnitude"], runs["structadmm filters+columns"]
    assert a["mac_reduction"] == b["mac_reduction"] > 2  # the same smaller network
    assert fc["columns_kept"] < 1 and fc["channels_removed"] < a["channels_removed"]
    assert abs(fc["mac_reduction"] - a["mac_reduction"]) / a["mac_reduction"] < 0.1  # same MACs
    assert a["not_removable"] == b["not_removable"] == 0 and a["epochs"] == b["epochs"]


def test_cifar_dense_tiny_run_and_admmnns_resnet20_mode(tmp_path):
    dense = tmp_path / "dense"
    # 512 images and one quantizer keep it to seconds: the rows are what is checked
    proc = run_script(
        f"benchmarks/cifar_dense.py --dataset digits --quick --train-subset 512 --out {dense}"
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads((dense / "dense.json").read_text())
    assert 0 < res["accuracy_test"] <= 1 and res["settings"]["dense_epochs"] == 2
    out = tmp_path / "cmp"
    proc = run_script(
        f"benchmarks/admmnns_compare.py --model resnet20 --dataset digits --quick --rates 4 "
        f"--rounds 1 --train-subset 512 --quantizers mixed --dense {dense / 'dense.pt'} --out {out}"
    )
    assert proc.returncode == 0, proc.stderr
    rows = {r["config"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["non-structured 4x"]["mac_reduction"] > 2  # block convs at 1/4
    assert rows["structured"]["mac_reduction"] > 2  # half of every channel group removed
    assert "| structured + 4 bits (conv1, fc 8) |" in (out / "results.md").read_text()


def test_oneshot_cnn_benchmark_tiny_run(tmp_path):
    out = tmp_path / "oneshot"
    proc = run_script(
        "benchmarks/oneshot_cnn.py --dataset digits --dense-epochs 2 --rates 5 --samples 128 "
        f"--budget-rates 20 --budget-epochs 1 1 --out {out}"
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    got = {(r["setting"], r["solver"]) for r in results["rows"]}
    solvers = ("magnitude", "wanda", "sparsegpt", "admm")
    assert got == {(s, v) for s in ("5x", "2:4", "columns 2x") for v in solvers} - {
        ("columns 2x", "sparsegpt")
    }
    for r in results["rows"]:
        assert 0 <= r["accuracy"] <= 1 and r["error"] >= 0 and r["gram_bytes_peak"] > 0
        if r["setting"] == "5x":
            assert r["rate"] == pytest.approx(5, rel=0.01)
    by = {(r["setting"], r["solver"]): r["error"] for r in results["rows"]}
    assert by[("5x", "admm")] < by[("5x", "magnitude")]  # same inputs for every solver
    assert [b["path"] for b in results["budget"]] == [
        "gradual magnitude", "training-time ADMM", "ADMM from one-shot",
        "one-shot ADMM + fine-tuning",
    ]  # fmt: skip
    assert "| admm |" in (out / "results.md").read_text()
    assert (out / "accuracy_vs_rate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_zoo_tiny_run_reports_each_case(tmp_path):
    pytest.importorskip("transformers", reason="needs the [hf] extra")
    proc = run_script(f"benchmarks/model_zoo.py --hf Phi Bloom --out {tmp_path}")
    assert proc.returncode == 0, proc.stderr
    cases = {c["name"]: c for c in json.loads((tmp_path / "model_zoo.json").read_text())["cases"]}
    assert (
        cases["Phi"]["status"] == "exact"
        and cases["Phi"]["params_after"] < cases["Phi"]["params_before"]
    )
    assert cases["Phi"]["oneshot_coverage"] == 1.0
    # Bloom's heads are removed too (its ALiBi slopes follow them): nothing refused
    assert cases["Bloom"]["status"] == "exact" and "heads_refused" not in cases["Bloom"]
    assert "2 exact" in proc.stdout


def test_admm_state_benchmark_tiny_run(tmp_path):
    proc = run_script(f"benchmarks/admm_state.py --steps 40 --out {tmp_path / 's.json'}")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    per = {(r["problem"], r["state"]): r for r in rows}
    # planted: a 24x32 layer keeping 20 % and a 16x32 layer at 2:4. U is bf16 (2 bytes); Z is
    # a bitmask plus its kept values (2 bytes in bf16, 1 in float8), being smaller than dense
    n, kept = 24 * 32 + 16 * 32, round(0.2 * 24 * 32) + 16 * 32 // 2
    for state, value_bytes in (("bfloat16", 2), ("float8", 1)):
        expected = 2 + (n / 8 + value_bytes * kept) / n
        assert per[("planted", state)]["bytes_per_weight"] == pytest.approx(expected)
    assert per[("planted", "float32, weights ×(1 ± 0.4 %)")]["bytes_per_weight"] == 12.0  # Z, U, T
    assert all(0 <= v <= 1 for r in rows for v in r["kept_not_in_fp32_masks"].values())


def test_sparse_decode_tiny_run(tmp_path):
    pytest.importorskip("transformers", reason="needs the [hf] extra")
    out = tmp_path / "sd"
    proc = run_script(
        "benchmarks/sparse_decode.py --hidden 64 --layers 1 --vocab 128 --new-tokens 4 "
        f"--repeats 1 --rounds 2 --sparsities 90 --out {out}"
    )
    if "decode kernel is not available" in proc.stderr:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((out / "sparse_decode.json").read_text())["rows"]
    assert [r["setting"] for r in rows] == ["90%", "2:4"]
    for r in rows:
        assert r["greedy_tokens_equal"] and r["dense_tokens_per_s"] > 0
        assert {x["layer"] for x in r["layers"]} >= {"model.layers.0.mlp.down_proj"}
    assert rows[0]["checkpoint"]["blocks_ratio"] < 0.2 < rows[1]["checkpoint"]["blocks_ratio"]
    for r in rows:  # the blocks' bytes are read from the file: a part of it
        ck = r["checkpoint"]
        assert 0 < ck["blocks_sparse_bytes"] < ck["sparse_bytes"]
    # checkpoint bytes alone: the same files, no generate
    proc = run_script(
        "benchmarks/sparse_decode.py --hidden 64 --layers 1 --vocab 128 --sparsities 90 "
        f"--no-decode --out {out / 'ck'}"
    )
    assert proc.returncode == 0, proc.stderr
    alone = json.loads((out / "ck" / "sparse_decode.json").read_text())["rows"]
    assert [r["checkpoint"] for r in alone] == [r["checkpoint"] for r in rows]
    assert all("speedup" not in r for r in alone)
    proc = run_script(f"benchmarks/sparse_decode.py --no-decode --no-checkpoint --out {out}")
    assert proc.returncode == 2 and "checkpoint bytes only" in proc.stderr
