"""ADMM state in low precision (state_dtype): its size, the masks it reaches compared with fp32
state, exact resume, and what it refuses."""

import importlib.util
import io
from pathlib import Path

import pytest
import torch
from torch import nn

import admmprune as ap
from admmprune.sets.constraints import keep_count

SPEC = {"0": ap.Unstructured(0.2), "2": ap.NM(2, 4)}


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    x = torch.randn(256, 32)
    y = (x @ torch.randn(32, 16)).argmax(1)
    return model, x, y


def train(model, admm, x, y, steps, start=0):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for s in range(start, steps):
        i = torch.arange(s * 32, s * 32 + 32) % len(x)
        loss = nn.functional.cross_entropy(model(x[i]), y[i]) + admm.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (s + 1) % 10 == 0:
            admm.update()
    return opt


@pytest.mark.parametrize("dtype,per_weight", [("float32", 12), ("bfloat16", 4), ("float8", 3)])
def test_state_bytes_per_constrained_weight(dtype, per_weight):
    model, _, _ = model_and_data()
    spec = {"0": ap.Unstructured(0.97), "2": ap.NM(2, 4)}  # one Z too dense to pack, one not
    admm = ap.ADMM(model, spec, state_dtype=dtype)
    n = sum(t.param.numel() for t in admm.targets)
    if dtype == "float32":
        assert admm.state_bytes() == per_weight * n
        return
    value = per_weight - 2  # bytes of one stored Z value (U is bf16: 2)
    expect = 0
    for t in admm.targets:
        size, nnz = t.param.numel(), int((admm._state[t.name].Z != 0).sum())
        dense, packed = size * value, size // 8 + nnz * value
        expect += 2 * size + min(dense, packed)
    assert admm.state_bytes() == expect
    # 2:4 packs in both (n/8 + n/2·b < n·b); 97 % kept packs in neither
    assert admm._state["2.weight"]._mask is not None
    assert admm._state["0.weight"]._mask is None
    assert admm.state_bytes() <= 4 * n  # never above the fp32 weights


@pytest.mark.parametrize("dtype", ["bfloat16", "float8"])
def test_sparse_Z_is_stored_as_mask_and_values_without_changing_a_value(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 70))  # 21,000 weights: not a multiple of 8 rows
    admm = ap.ADMM(model, {"0": ap.Unstructured(0.1)}, state_dtype=dtype)
    st = admm._state["0.weight"]
    assert st._mask is not None and st._Z.dim() == 1
    W = model[0].weight.detach()
    keep = W.abs().flatten().topk(keep_count(0.1, W.numel())).indices
    Z = torch.zeros(W.numel())
    Z[keep] = W.flatten()[keep]
    Z = Z.view_as(W)
    if dtype == "float8":
        scale = float(Z.abs().max()) / 448
        ref = (Z / scale).to(torch.float8_e4m3fn).float() * scale
    else:
        ref = Z.to(torch.bfloat16).float()
    assert torch.equal(st.Z, ref)
    value = 2 if dtype == "bfloat16" else 1
    nnz = int((ref != 0).sum())
    assert st.nbytes() == 2 * W.numel() + -(-W.numel() // 8) + nnz * value
    # at 90 % sparsity: under 0.35 bytes per weight for Z instead of `value`
    assert (st.nbytes() - 2 * W.numel()) / W.numel() < 0.35


def _benchmark():
    """benchmarks/admm_state.py, whose toy problems these tests share."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "admm_state.py"
    spec = importlib.util.spec_from_file_location("admm_state_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype", ["bfloat16", "float8"])
def test_low_precision_state_reaches_the_fp32_masks(dtype):
    # two layers fitted to sparse teachers (20 % unstructured, 2:4): an answer that does not
    # hang on rounding (benchmarks/admm_state.py shows the near-tie case next to it)
    bench = _benchmark()
    ref, _, _ = bench.run(bench.planted_problem, "float32")
    masks, _, _ = bench.run(bench.planted_problem, dtype)
    for name in ("a.weight", "b.weight"):
        a, b = ref[name], masks[name]
        assert int(b.sum()) == int(a.sum())  # the same exact sparsity
        assert float((a & ~b).sum()) <= 0.01 * float(a.sum()), name  # within 1 % of fp32's


def test_low_precision_penalty_is_the_fp32_formula_on_the_stored_state():
    model, x, y = model_and_data()
    admm = ap.ADMM(model, SPEC, rho=0.1, state_dtype="float8")
    train(model, admm, x, y, 20)
    st = admm._state["0.weight"]
    assert st._Z.dtype == torch.float8_e4m3fn and st._U.dtype == torch.bfloat16
    assert torch.equal(st.Z != 0, st._dense_Z().float() != 0)  # zeros stay exactly zero
    expect = sum(
        0.5 * 0.1 * float((t.param.detach() - (admm._state[t.name].Z - admm._state[t.name].U))
                          .square().sum())
        for t in admm.targets
    )  # fmt: skip
    pen = admm.penalty()
    assert float(pen.detach()) == pytest.approx(expect, rel=1e-5)
    model.zero_grad(set_to_none=True)
    pen.backward()
    W = model[0].weight
    ref = 0.1 * (W.detach() - (st.Z - st.U))
    torch.testing.assert_close(W.grad, ref)


@pytest.mark.parametrize("dtype", ["bfloat16", "float8"])
def test_low_precision_state_resumes_bit_exactly(dtype):
    model, x, y = model_and_data()
    admm = ap.ADMM(model, SPEC, rho=0.05, state_dtype=dtype)
    opt = train(model, admm, x, y, 30)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "admm": admm.state_dict(),
                "opt": opt.state_dict()}, buf)  # fmt: skip
    train(model, admm, x, y, 50, start=30)  # the uninterrupted run (a fresh optimizer each call)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    again, _, _ = model_and_data()
    again.load_state_dict(saved["model"])
    resumed = ap.ADMM(again, SPEC, rho=0.05, state_dtype=dtype)
    resumed.load_state_dict(saved["admm"])
    train(again, resumed, x, y, 50, start=30)
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(admm._state["2.weight"].Z, resumed._state["2.weight"].Z)
    assert resumed._state["2.weight"]._mask is not None  # restored packed, as it was saved


def test_low_precision_state_refusals():
    model, _, _ = model_and_data()
    with pytest.raises(ValueError, match=r"state_dtype='fp16'"):
        ap.ADMM(model, SPEC, state_dtype="fp16")
    with pytest.raises(ValueError, match=r"'0\.weight'.*sparsity set"):
        ap.ADMM(model, {"0": ap.Quantized(4)}, state_dtype="bfloat16")
    saved = ap.ADMM(model, SPEC, state_dtype="bfloat16").state_dict()
    with pytest.raises(ValueError, match="saved with state_dtype='bfloat16'"):
        ap.ADMM(model, SPEC).load_state_dict(saved)


def test_recipe_state_dtype_reports_its_bytes(tmp_path):
    from admmprune.run.parse import parse_recipe
    from admmprune.run.pipeline import prepare, run
    from test_pipeline import tiny_recipe

    recipe = tiny_recipe(tmp_path / "r", pretrain={"epochs": 1}, retrain={"epochs": 1})
    recipe["admm"] |= {"epochs": 2, "update_every": 1, "state_dtype": "bfloat16"}
    recipe["constraints"] = {"fc1": {"unstructured": 0.05}}
    summary = run(prepare(parse_recipe(recipe)), log=lambda *a: None)
    assert summary["admm_state"]["dtype"] == "bfloat16"
    fc1 = next(row for row in summary["layers"] if row["name"] == "fc1.weight")
    n, kept = fc1["total"], keep_count(0.05, fc1["total"])
    assert fc1["kept"] == kept
    # U in bf16, Z (5 % kept) as a bitmask + bf16 values: 2.225 bytes instead of 4
    expect = (2 * n + -(-n // 8) + 2 * kept) / n
    assert summary["admm_state"]["bytes_per_constrained_weight"] == pytest.approx(expect)


@pytest.mark.parametrize("dtype", ["bfloat16", "float8"])
def test_low_precision_state_tensors_are_its_stored_bits(dtype):
    # what a distributed run broadcasts in place from rank 0 (stages.sync_solver)
    model, x, y = model_and_data()
    a = ap.ADMM(model, SPEC, rho=0.05, state_dtype=dtype)
    train(model, a, x, y, 20)
    other, _, _ = model_and_data()
    b = ap.ADMM(other, SPEC, rho=0.05, state_dtype=dtype)
    for name in a._state:
        for mine, rank0 in zip(b._state[name].tensors(), a._state[name].tensors(), strict=True):
            mine.copy_(rank0)
        assert torch.equal(b._state[name].Z, a._state[name].Z)
        assert torch.equal(b._state[name].U, a._state[name].U)
        assert b._state[name].Z.abs().sum() > 0
