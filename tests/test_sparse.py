"""Sparse-kernel layers compute what the masked dense layers compute."""

import pytest
import torch
from torch import nn

import admmprune as ap
from admmprune.deployment.sparse import (
    ColumnConv2d,
    SparseConv2d,
    SparseLinear,
    to_columns,
    to_sparse,
)
from admmprune.models import build_model


def test_sparse_lenet5_matches_the_masked_dense_model():
    torch.manual_seed(0)
    model = build_model("lenet5", num_classes=10, in_channels=1, input_size=28).eval()
    ap.prune(model, {"conv*": ap.Unstructured(0.2), "fc*": ap.Unstructured(0.05)})
    sparse = to_sparse(model)
    kinds = {type(m) for m in sparse.modules()}
    assert SparseConv2d in kinds and SparseLinear in kinds
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert (sparse(x) - model(x)).abs().max() <= 1e-5


def test_strided_padded_conv_and_dense_layers_left_alone():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=2),  # grouped: stays dense
        nn.Flatten(),
        nn.LazyLinear(4),
    )
    x = torch.randn(2, 3, 9, 9)
    model(x)
    ap.prune(model, {"0": ap.Unstructured(0.3), "2": ap.Unstructured(0.3)})
    sparse = to_sparse(model)
    assert isinstance(sparse[0], SparseConv2d) and isinstance(sparse[2], nn.Conv2d)
    assert isinstance(sparse[4], nn.Linear)  # dense: below min_sparsity
    with torch.no_grad():
        assert (sparse(x) - model.eval()(x)).abs().max() <= 1e-5


GEOMETRIES = [  # cin, cout, kernel, stride, padding, dilation, groups
    (4, 8, 3, 1, 1, 1, 1),
    (6, 9, (3, 5), 2, (1, 2), 1, 3),  # grouped, odd rectangular kernel, strided
    (8, 8, 3, 1, 2, 2, 8),  # depthwise, dilated
    (6, 4, (5, 3), (2, 1), 0, (1, 2), 2),
    (3, 5, 3, 3, 4, 1, 1),  # padding wider than the kernel reach
    (4, 6, 1, 1, 0, 1, 1),
    (5, 7, (3, 2), 2, (2, 1), 2, 1),  # groups=1 (tiled on CPU): dilated, strided, uneven pad
]


def _column_pruned(cin, cout, k, s, p, d, g, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, s, p, d, g)
    with torch.no_grad():  # GEMM columns: (channel, offset) pairs zero for every filter
        conv.weight.mul_(torch.rand(conv.weight.shape[1:]) < 0.5)
    return conv


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("form", ["dense", "channels", "offsets"])
def test_every_column_form_equals_the_masked_conv(geometry, form):
    conv = _column_pruned(*geometry)
    fast = ColumnConv2d(conv, form)
    x = torch.randn(3, geometry[0], 11, 10)
    with torch.no_grad():
        ref = conv(x)
        y = fast(x)
        assert y.shape == ref.shape
        assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
        if form == "offsets":  # exactly the kept MACs: one weight per kept (column, filter)
            assert fast.W.numel() == int(conv.weight.ne(0).any(0).sum()) * conv.out_channels
            assert fast.W.numel() < conv.weight.numel()
        again = ColumnConv2d(conv, form)  # state_dict round trip into a fresh layer
        again.W.zero_()
        again.load_state_dict(fast.state_dict())
        assert torch.equal(again(x), y)
        y_cl = fast(x.contiguous(memory_format=torch.channels_last))
        assert (y_cl - ref).abs().max() <= 1e-5 * ref.abs().max()
        if form == "offsets":  # the input's layout is kept; groups=1 runs tile by tile
            assert y_cl.is_contiguous(memory_format=torch.channels_last) and y.is_contiguous()
            per_sample = ref.shape[2] * ref.shape[3] * fast.W.shape[1] * 4
            for tile_bytes in (1, 2 * per_sample):  # 1 + 1 + 1 and 2 + 1 samples
                fast.tile_bytes = tile_bytes
                # the same sums; a GEMM of fewer rows may block them otherwise (BLAS kernels
                # differ by shape and CPU), so equal to rounding, not bit for bit
                assert (fast(x) - y).abs().max() <= 1e-6 * ref.abs().max()


def test_a_conv_with_every_column_pruned_gives_its_bias():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.zero_()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert torch.allclose(ColumnConv2d(conv, "offsets")(x), conv(x))


def test_to_columns_measures_each_layer_and_keeps_the_fastest_exact_form():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2, padding=1),
        nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, groups=2),
    )  # fmt: skip
    ap.prune(model, {"0": ap.Columns(0.3), "4": ap.Columns(0.5)})  # scattered columns
    with torch.no_grad():
        model[0].weight[:, 3] = 0  # a dead channel among scattered columns: all 3 forms
        model[2].weight[:, [1, 5]] = 0  # whole input channels dead: a smaller dense conv
    x = torch.randn(3, 4, 9, 9)
    fixed = to_columns(model)  # no example: by the pattern
    assert [fixed[i].form for i in (0, 2, 4)] == ["offsets", "channels", "offsets"]
    timed = to_columns(model, x, rounds=3)
    assert set(timed[0].timings) == {"dense", "channels", "offsets"}
    assert set(timed[2].timings) == {"dense", "channels"}  # offsets cannot beat an exact slice
    if bool(model[4].weight.ne(0).any(0).flatten(1).any(1).all()):  # no channel to slice off
        assert set(timed[4].timings) == {"dense", "offsets"}
    for i in (0, 2, 4):
        ms = timed[i].timings
        best = min(ms, key=ms.get)
        assert timed[i].form == (best if ms[best] <= 0.95 * ms["dense"] else "dense")
    assert to_columns(model, x)[0].timings == timed[0].timings  # cached: measured once
    with pytest.raises(TypeError, match="pass min_pruned= by name"):
        to_columns(model, 0.5)
    with torch.no_grad():
        ref = model.eval()(x)
        for fast in (fixed, timed):
            assert (fast(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_column_compact_convs_export_to_onnx_and_run(tmp_path):
    pytest.importorskip("onnxruntime", reason="needs the [onnx] extra")
    import onnxruntime

    from admmprune.run.export import export_onnx

    model = nn.Sequential(
        _column_pruned(*GEOMETRIES[1]), nn.ReLU(), _column_pruned(9, 4, 3, 1, 1, 1, 1, 1)
    )
    x = torch.randn(2, 6, 11, 10)
    for form in ("channels", "offsets"):
        fast = nn.Sequential(ColumnConv2d(model[0], form), nn.ReLU(), ColumnConv2d(model[2], form))
        path = tmp_path / f"{form}.onnx"
        export_onnx(fast, x, path)
        session = onnxruntime.InferenceSession(str(path))
        for batch in (2, 5):  # the batch dimension stays dynamic
            xb = torch.randn(batch, 6, 11, 10)
            (y,) = session.run(None, {session.get_inputs()[0].name: xb.numpy()})
            with torch.no_grad():
                assert abs(torch.from_numpy(y) - model(xb)).max() <= 1e-4
