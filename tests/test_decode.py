"""The CPU decode kernel for unstructured sparse Linears (SparseDecodeLinear, to_sparse_decode):
exact against the masked dense layer, greedy generation unchanged, a clear fallback when no
compiler is there. Speed is benchmarks/sparse_decode.py's job."""

import pytest
import torch
from torch import nn
from torch.nn import functional

import admmprune as ap
from admmprune.deployment import decode
from admmprune.deployment.decode import SparseDecodeLinear, kernel_available, to_sparse_decode
from test_lm import _reinit, calibration, tiny

needs_kernel = pytest.mark.skipif(not kernel_available()[0], reason=kernel_available()[1])


def _masked_linear(n_in, n_out, kept, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) < kept)
        lin.weight[0] = 0  # an empty row
        lin.weight[-1] = torch.randn(n_in)  # a fully dense row
    return lin


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 8, 11])
@pytest.mark.parametrize("n_in,n_out,bias", [(37, 13, True), (256, 129, False), (70_001, 3, True)])
def test_kernel_equals_the_masked_dense_layer(rows, n_in, n_out, bias):
    lin = _masked_linear(n_in, n_out, kept=0.1, bias=bias)
    sparse = SparseDecodeLinear(lin)
    assert sparse.wide == (n_in > 65_536)  # int32 columns past uint16's range
    assert sparse.val.numel() == int((lin.weight != 0).sum())
    x = torch.randn(rows, n_in)
    ref = functional.linear(x, lin.weight, lin.bias).detach()
    torch.testing.assert_close(sparse(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # leading dimensions, and a long prompt (the GEMM on the rebuilt weight)
    x3 = torch.randn(2, 20, n_in)
    ref3 = functional.linear(x3, lin.weight, lin.bias).detach()
    torch.testing.assert_close(sparse(x3), ref3, rtol=1e-5, atol=1e-5 * float(ref3.abs().max()))
    assert torch.equal(sparse.dense_weight(), lin.weight.detach())


@needs_kernel
def test_sparse_decode_keeps_greedy_tokens_and_reports_each_layer():
    torch.manual_seed(0)
    model = _reinit(tiny("llama")).eval()
    ap.prune(model, {"model.layers.*": ap.Unstructured(0.1, per_row=True)})
    ids = calibration(n=1)[0]["input_ids"][:1, :5]
    ref = model.generate(ids, max_new_tokens=8, do_sample=False)
    report = to_sparse_decode(model, measure=False)
    swapped = [n for n, m in model.named_modules() if isinstance(m, SparseDecodeLinear)]
    assert sorted(swapped) == sorted(report.sparse) and len(swapped) == 14  # 7 per block
    assert "lm_head" in report.skipped  # dense layers stay dense
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), ref)
    timed = to_sparse_decode(_reinit(tiny("llama")), rounds=3, max_kept=1.0)
    assert timed.timings_ms and all(d > 0 and s > 0 for d, s in timed.timings_ms.values())


@needs_kernel
def test_load_sparse_with_kernels_and_deploy_on_an_lm(tmp_path):
    torch.manual_seed(0)
    model = _reinit(tiny("llama")).eval()
    ap.prune(model, {"model.layers.*": ap.Unstructured(0.1, per_row=True)})
    ids = calibration(n=1)[0]["input_ids"][:1, :5]
    ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    ap.save_sparse(model, tmp_path / "m")
    fast = ap.load_sparse(tmp_path / "m", sparse_kernels=True)
    assert fast.decode_report.timings_ms  # measured, layer by layer
    assert torch.equal(fast.generate(ids, max_new_tokens=6, do_sample=False), ref)
    deployed = ap.deploy(model, ids[:, :1])
    assert "sparse_decode" in deployed.report.steps
    assert "model.layers.0.mlp.up_proj:sparse" in deployed.report.timings_ms
    assert torch.equal(deployed.generate(ids, max_new_tokens=6, do_sample=False), ref)
    assert not any(isinstance(m, SparseDecodeLinear) for m in model.modules())  # untouched


def test_no_compiler_leaves_the_layers_dense_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(decode, "_LIB", None)
    monkeypatch.setattr(decode, "_WHY_NOT", None)
    monkeypatch.setenv("ADMMPRUNE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    model = nn.Sequential(_masked_linear(64, 64, kept=0.1))
    report = to_sparse_decode(model, measure=False)
    assert isinstance(model[0], nn.Linear) and report.sparse == []
    assert (
        "no C compiler" in report.skipped["<kernel>"] and "no-such-cc" in report.skipped["<kernel>"]
    )


def test_only_fp32_cpu_weights_are_taken():
    with pytest.raises(ValueError, match="fp32 CPU"):
        SparseDecodeLinear(nn.Linear(8, 8).half())
