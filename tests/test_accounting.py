import math

import pytest
import torch
from torch import nn

from admmprune import Unstructured, prune
from admmprune.deployment.latency import inference_form, measure, measure_paired
from admmprune.deployment.storage import fillers, storage, weight_storage
from admmprune.models import build_model
from admmprune.weights.count import count


def test_lenet5_counts_match_hand_count():
    # seeded: float32 uniform init draws an exact 0.0 among LeNet-5's 430k weights in a few
    # per cent of unseeded runs, and a zero weight is rightly skipped by sparse_macs
    torch.manual_seed(0)
    model = build_model("lenet5", num_classes=10, in_channels=1, input_size=28)
    c = count(model, torch.randn(3, 1, 28, 28))
    by = {layer.name: layer for layer in c["layers"]}
    # conv1: 20×1×5×5 weights at 24×24 positions; conv2: 50×20×5×5 at 8×8; fc: one position
    assert by["conv1"].macs == 24 * 24 * 500
    assert by["conv2"].macs == 8 * 8 * 25_000
    assert by["fc1"].macs == 400_000 and by["fc2"].macs == 5_000
    assert c["macs"] == 288_000 + 1_600_000 + 405_000
    assert c["params"] == 430_500 + 20 + 50 + 500 + 10
    assert c["sparse_macs"] == c["macs"]  # dense: nothing to skip


def test_sparse_macs_follow_non_zeros():
    model = build_model("lenet5", num_classes=10, in_channels=1, input_size=28)
    prune(model, {"conv2": Unstructured(0.1), "fc1": Unstructured(0.01)})
    c = count(model, torch.randn(1, 1, 28, 28))
    by = {layer.name: layer for layer in c["layers"]}
    assert by["conv2"].sparse_macs == 64 * 2_500
    assert by["fc1"].sparse_macs == 4_000
    assert c["nonzero"] == 500 + 2_500 + 4_000 + 5_000 + 20 + 50 + 500 + 10


def test_linear_on_sequences_counts_positions():
    model = nn.Sequential(nn.Linear(8, 4, bias=False))
    c = count(model, torch.randn(2, 5, 8))
    assert c["layers"][0].positions == 5 and c["macs"] == 5 * 32


def test_latency_measure_reports_what_it_measured_and_restores_modes():
    model = nn.Linear(16, 16)
    r = measure(model, torch.randn(4, 16), warmup=1, repeats=5)
    assert r["batch"] == 4 and r["repeats"] == 5 and r["threads"] >= 1
    assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
    assert model.training  # mode restored
    other = nn.Linear(16, 16).eval()
    t = measure_paired({"a": model, "b": other}, torch.randn(4, 16), 3)
    assert set(t) == {"a", "b"} and all(v > 0 for v in t.values())
    assert model.training and not other.training  # each model's mode restored


def test_inference_form_folds_bn_goes_nhwc_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with torch.no_grad():  # BN statistics that are not the identity
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.train()
    x = torch.randn(2, 3, 8, 8)
    form, xf = inference_form(model, x, fold_bn=True, channels_last=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in form.modules())  # folded away
    assert xf.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(form(xf), model.eval()(x), atol=1e-5, rtol=1e-5)
    assert isinstance(model[1], nn.BatchNorm2d) and x.is_contiguous()  # originals untouched
    assert not model[0].weight.is_contiguous(memory_format=torch.channels_last)
    r = measure(model, x, warmup=1, repeats=3, fold_bn=True, channels_last=True)
    assert r["fold_bn"] and r["channels_last"] and r["median_ms"] > 0
    t = measure_paired({"a": model, "b": nn.Conv2d(3, 8, 1)}, x, 2, channels_last=True)
    assert set(t) == {"a", "b"} and all(v > 0 for v in t.values())
    with pytest.raises(ValueError, match="4-D"):
        measure(nn.Linear(4, 4), torch.randn(2, 4), channels_last=True)


def test_inference_form_names_a_model_fx_cannot_trace():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x  # control flow on values: fx cannot trace it

    with pytest.raises(ValueError, match="fold_bn=False"):
        inference_form(DataDependent(), torch.randn(1, 3, 4, 4), fold_bn=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_latency_on_cuda():
    r = measure(nn.Linear(16, 16).cuda(), torch.randn(4, 16, device="cuda"), repeats=3)
    assert r["device"].startswith("cuda")


def hand_example():
    W = torch.zeros(2, 8)
    W.view(-1)[torch.tensor([1, 7, 15])] = torch.tensor([1.5, -1.5, 1.5])
    return W


def test_storage_formulas_match_a_hand_count():
    """16 fp32 weights, non-zeros at flat 1, 7, 15 (gaps 2, 6, 8), values ±1.5."""
    s = weight_storage(hand_example())
    assert s["dense_raw"] == 16 * 32
    # codebook {-1.5, 0, 1.5}: 2-bit codes, 3 fp32 entries
    assert s["dense"]["bits"] == 16 * 2 + 3 * 32
    # b = 3 holds every gap (<= 8), no fillers: 3 entries of 1-bit code + 3-bit gap, book {±1.5}
    assert s["relative"] == {
        "bits": 3 * (1 + 3) + 2 * 32,
        "value_bits": 3,
        "index_bits": 9,
        "codebook_bits": 64,
        "b": 3,
        "fillers": 0,
    }
    # csr: 3 · (1-bit code + 3-bit column) + 3 row pointers of 2 bits + book
    assert s["csr"]["bits"] == 3 * (1 + 3) + 3 * 2 + 64
    # structured: rows {0, 1}, columns {1, 7}: a 2x2 block with a zero, 2-bit codes, bitmaps 2 + 8
    assert s["structured"]["bits"] == 4 * 2 + 2 + 8 + 3 * 32
    # hybrid: the same bitmaps, then the block's non-zeros (flat 0, 1, 3: gaps 1, 1, 2) relative
    # with b = 1 (gap 2 fits), 1-bit codes into {±1.5}
    assert s["hybrid"] == {
        "bits": 3 * (1 + 1) + 2 * 32 + 2 + 8,
        "value_bits": 3,
        "index_bits": 3 + 2 + 8,
        "codebook_bits": 64,
        "b": 1,
        "fillers": 0,
        "rows": 2,
        "cols": 2,
    }
    assert (s["format"], s["bits"]) == ("relative", 76)
    # which 3 of 16 positions: log2 C(16, 3) = log2 560 bits, below the 9 relative spends
    assert s["index_bound_bits"] == pytest.approx(math.log2(560))


def test_hybrid_wins_where_pruning_left_whole_rows_and_columns_empty():
    """A pruned filter empties a row, a pruned input channel a column: indexing only the kept
    block shortens the gaps; that pays once the non-zeros outnumber the bitmap bits."""
    g = torch.Generator().manual_seed(0)
    W = torch.zeros(64, 256)
    rows, cols = torch.arange(0, 64, 4), torch.arange(0, 256, 4)
    block = torch.randn(16, 64, generator=g) * (torch.rand(16, 64, generator=g) < 0.3)
    W[rows.reshape(-1, 1), cols.reshape(1, -1)] = block
    s = weight_storage(W)
    assert s["format"] == "hybrid" and (s["hybrid"]["rows"], s["hybrid"]["cols"]) == (16, 64)
    assert s["hybrid"]["b"] < s["relative"]["b"]
    inner = weight_storage(block)["relative"]
    assert s["hybrid"]["bits"] == inner["bits"] + 64 + 256


def test_relative_indices_need_fillers_for_long_gaps():
    gaps = torch.tensor([2, 6, 8])
    assert [fillers(gaps, b) for b in (1, 2, 3)] == [0 + 2 + 3, 0 + 1 + 1, 0]


def test_storage_totals_cover_every_tensor():
    model = nn.Sequential(nn.Linear(8, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        model[0].weight.copy_(hand_example())
    s = storage(model)
    assert set(s["layers"]) == {"0.weight"}
    other = 2 * 32 + 4 * 2 * 32 + 64  # bias; BN weight, bias, running mean, var; batch count
    assert s["other_bits"] == other
    assert s["total_bits"] == 76 + other and s["total_raw"] == 16 * 32 + other
    assert s["weights_value_bits"] == 3 and s["weights_index_bits"] == 9
    assert s["index_bound_bits"] == pytest.approx(math.log2(560))


def test_all_macs_count_attention_products_by_the_formula():
    from torch import nn

    from admmprune.weights.count import count

    E, L = 16, 5
    attn = nn.MultiheadAttention(E, 2, batch_first=True)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.fc = attn, nn.Linear(E, 8)

        def forward(self, x):
            return self.fc(self.attn(x, x, x, need_weights=False)[0])

    c = count(Block(), torch.randn(3, L, E))
    # q, k, v projections 3·L·E², scores L·L·E, weighted values L·L·E, out projection L·E²,
    # then the Linear L·E·8
    assert c["all_macs"] == 4 * L * E * E + 2 * L * L * E + L * E * 8
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    c = count(conv, torch.randn(2, 3, 8, 8))
    assert c["all_macs"] == c["macs"]  # a CNN computes exactly its Conv/Linear MACs
