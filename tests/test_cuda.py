"""The projections on a GPU give what they give on the CPU (runs where CUDA is available)."""

import pytest
import torch

from admmprune import (
    ADMM,
    Binary,
    Channels,
    Columns,
    Filters,
    Quantized,
    SSAuto,
    Ternary,
    Unstructured,
)
from admmprune.sets.rows_columns import prox_rows_columns

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize(
    "constraint",
    [
        Unstructured(0.3),
        Filters(0.5),
        Channels(0.5),
        Columns(0.4),
        Quantized(4),
        Quantized(3, levels="pow2"),
        Ternary(),
        Binary(),
    ],
    ids=repr,
)
def test_projection_same_on_cuda(constraint):
    W = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    cpu = constraint.project(W)
    gpu = constraint.project(W.cuda())
    assert gpu.Z.is_cuda
    torch.testing.assert_close(gpu.Z.cpu(), cpu.Z, rtol=1e-5, atol=1e-6)
    assert torch.equal(gpu.support.cpu(), cpu.support)


@cuda
def test_prox_rows_columns_same_on_cuda():
    W = torch.randn(12, 20, generator=torch.Generator().manual_seed(1))
    for gpu, cpu in zip(prox_rows_columns(W.cuda(), 0.3, 0.3), prox_rows_columns(W, 0.3, 0.3)):
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-5)


@cuda
def test_admm_and_ssauto_update_on_cuda():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4)
    ).cuda()
    x = torch.randn(2, 3, 8, 8, device="cuda")
    admm = ADMM(model, {"0": Ternary(), "3": Quantized(4)}, rho=0.1)
    model(x).sum().backward()
    admm.update()
    Z = admm.state_dict()["layers"]["0.weight"]["Z"]
    assert Z.unique().numel() <= 3  # ternary levels
    ss = SSAuto(model, ["0", "3"], target=0.5)
    stats = ss.update()
    assert 0.4 <= stats["kept"] <= 0.55


@cuda
@pytest.mark.parametrize("solver", ["magnitude", "wanda", "sparsegpt", "admm"])
def test_oneshot_on_cuda_matches_cpu(solver):
    import copy

    from torch import nn

    import admmprune as ap

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 16))
    x = torch.randn(64, 3, 8, 8)
    spec = {"0": ap.Unstructured(0.5, per_row=True), "3": ap.NM(2, 4)}
    cpu, gpu = copy.deepcopy(model), copy.deepcopy(model).cuda()
    m_cpu = ap.oneshot(cpu, spec, [x], solver=solver)
    m_gpu = ap.oneshot(gpu, spec, [x.cuda()], solver=solver)
    for name in m_cpu:  # the same supports; weights to float rounding
        agree = (m_cpu[name] == m_gpu[name].cpu()).float().mean()
        assert agree >= 0.99, name
    e_cpu, e_gpu = m_cpu.report.error, m_gpu.report.error
    assert abs(e_cpu - e_gpu) <= 0.05 * max(e_cpu, 1e-9)


@cuda
def test_two_four_linear_runs_on_the_sparse_kernels_and_matches_dense():
    from torch import nn

    import admmprune as ap
    from admmprune.deployment.sparse import to_semi_structured

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 40)).cuda().half()
    ap.prune(model, {"0": ap.NM(2, 4), "2": ap.NM(2, 4)})
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    with torch.no_grad():
        want = model(x)
    dense = to_semi_structured(model)
    assert set(dense) == {"2"} and "shape 40x256" in dense["2"]  # 40 rows: not a multiple of 32
    assert type(model[0].weight).__name__.startswith("SparseSemiStructuredTensor")
    with torch.no_grad():
        got = model(x)
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()


@cuda
def test_deploy_on_cuda_times_cuda_graphs_and_keeps_the_outputs():
    from torch import nn

    import admmprune as ap

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).cuda().eval()  # fmt: skip
    x = torch.randn(16, 3, 16, 16, device="cuda")
    d = ap.deploy(model, x, rounds=5)
    assert {"compile:default", "compile:reduce-overhead"} <= set(d.report.timings_ms) | set(
        d.report.skipped
    )
    with torch.no_grad():
        torch.testing.assert_close(d(x), model(x), rtol=1e-3, atol=1e-4)


@cuda
@pytest.mark.parametrize("form", ["dense", "channels", "offsets"])
def test_column_forms_on_cuda_equal_the_masked_conv(form):
    from torch import nn

    from admmprune.deployment.sparse import ColumnConv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(torch.rand(conv.weight.shape[1:]) < 0.4)
        conv.weight[:, 3] = 0  # a dead input channel, for the "channels" form
    conv = conv.cuda()
    fast = ColumnConv2d(conv, form).cuda()
    x = torch.randn(5, 16, 12, 12, device="cuda")
    with torch.no_grad():
        for layout in (torch.contiguous_format, torch.channels_last) * 2:  # 2nd: cached index
            xl = x.contiguous(memory_format=layout)
            torch.testing.assert_close(fast(xl), conv(xl), rtol=1e-4, atol=1e-4)
