"""Sparse-kernel layers compute what the masked dense layers compute."""

import torch
from torch import nn

import admmprune as ap
from admmprune.models import build_model
from admmprune.sparse import SparseConv2d, SparseLinear, to_sparse


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


def test_column_convs_match_the_masked_conv():
    from admmprune.sparse import ColumnConv2d, to_columns

    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2, padding=1)
    )
    ap.prune(model, {"0": ap.Columns(0.3)})  # scattered columns: im2col + gather
    with torch.no_grad():
        model[2].weight[:, [1, 5]] = 0  # whole input channels dead: a smaller dense conv
    fast = to_columns(model)
    assert isinstance(fast[0], ColumnConv2d) and not fast[0].by_channel
    assert isinstance(fast[2], ColumnConv2d) and fast[2].by_channel
    assert fast[2].W.shape[1] == 6
    x = torch.randn(3, 4, 9, 9)
    with torch.no_grad():
        assert (fast(x) - model.eval()(x)).abs().max() <= 1e-5
