"""The packed file: identical model back, size within 5 % of the accounting, bad files refused."""

import json
import struct
import zlib

import pytest
import torch
from torch import nn

import admmprune as ap
from admmprune.deployment.storage import storage
from admmprune.models import build_model

SPEC = {"name": "lenet5", "num_classes": 10, "in_channels": 1, "input_size": 28}


def pruned_quantized_lenet5():
    torch.manual_seed(0)
    model = build_model(**SPEC)
    masks = ap.prune(
        model,
        {
            "conv1": ap.Filters(0.5),  # structured: a smaller dense block
            "conv2": ap.Unstructured(0.08),
            "fc1": ap.Unstructured(0.01),
            "fc2": ap.Unstructured(0.1),
        },
    )
    admm = ap.ADMM(
        model,
        {"conv2": ap.Quantized(4), "fc1": ap.Ternary(), "fc2": ap.Binary()},
        support={k: masks[k] for k in ("conv2.weight", "fc1.weight", "fc2.weight")},
    )
    admm.prune()  # hard-quantize the kept weights
    return model.eval()


def test_round_trip_is_identical_and_sized_like_the_accounting(tmp_path):
    model = pruned_quantized_lenet5()
    path = tmp_path / "m.admmprune"
    written = ap.export_compressed(model, path, SPEC)
    assert path.stat().st_size == written
    back = ap.load_compressed(path)  # builds LeNet-5 from the stored spec
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), back.eval()(x))
    s = storage(model)
    formats = {k: v["format"] for k, v in s["layers"].items()}
    assert formats["conv1.weight"] == "structured" and formats["fc1.weight"] == "relative"
    assert abs(written * 8 - s["total_bits"]) <= 0.05 * s["total_bits"]
    assert s["total_raw"] / s["total_bits"] > 20


def test_dense_float_model_round_trips_into_a_given_instance(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, groups=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2)
    )
    model[1].running_mean.uniform_()
    path = tmp_path / "dense.bin"
    ap.export_compressed(model, path)
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    back = ap.load_compressed(path, other)
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    with pytest.raises(ValueError, match="pass model="):
        ap.load_compressed(path)  # no spec stored, no model given
    with pytest.raises(ValueError, match="does not fit"):
        ap.load_compressed(path, nn.Sequential(nn.Linear(4, 2)))


def reseal(data: bytes) -> bytes:
    """``data`` (a file whose body was edited) with its trailing CRC-32 made to match again, so
    the parser's own checks are what is tested."""
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


def edit_header(data: bytes, edit) -> bytes:
    """The file with ``edit(entries)`` applied to its header's tensor entries, each
    ``[name, dtype, shape, format, *numbers]``; the payload untouched, the CRC resealed."""
    hlen = struct.unpack("<I", data[8:12])[0]
    header = json.loads(zlib.decompress(data[12 : 12 + hlen]))
    edit(header["tensors"])
    h = zlib.compress(json.dumps(header).encode())
    return reseal(data[:8] + struct.pack("<I", len(h)) + h + data[12 + hlen :])


def corrupt(data: bytes, how: str) -> bytes:
    hlen = struct.unpack("<I", data[8:12])[0]
    if how == "magic":
        return b"PK\x03\x04" + data[4:]
    if how == "version":
        return data[:7] + b"\x09" + data[8:]
    if how == "truncated":
        return data[:-3]
    if how == "appended":
        return data + b"\x00"
    if how == "truncated, resealed":
        return reseal(data[:-7] + data[-4:])
    if how == "appended, resealed":
        return reseal(data[:-4] + b"\x00" + data[-4:])
    if how == "header":
        return reseal(data[:12] + b"\xff" * hlen + data[12 + hlen :])
    if how == "format":
        return edit_header(data, lambda t: t[0].__setitem__(3, "zip"))
    if how == "sizes":  # a header that lies about one tensor's sections
        return edit_header(data, lambda t: t[0].__setitem__(2, [1, 1]))
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how,match",
    [
        ("magic", "bad magic"),
        ("version", "version 9"),
        ("truncated", "checksum mismatch"),
        ("appended", "checksum mismatch"),
        ("truncated, resealed", "truncated"),
        ("appended, resealed", "truncated or appended"),
        ("header", "unreadable header"),
        ("sizes", "truncated or appended"),
        ("format", "bad tensor entry"),
    ],
)
def test_malformed_files_are_refused(tmp_path, how, match):
    path = tmp_path / "m.bin"
    ap.export_compressed(pruned_quantized_lenet5(), path, SPEC)
    path.write_bytes(corrupt(path.read_bytes(), how))
    with pytest.raises(ValueError, match=match):
        ap.load_compressed(path)


def hybrid_layer(quantized: bool) -> nn.Module:
    """A Linear whose weight has empty rows and columns around a 30 %-dense block."""
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(512, 128)
    block = torch.randn(32, 128, generator=g) * (torch.rand(32, 128, generator=g) < 0.3)
    if quantized:
        block = block.sign() * 0.25
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[::4, ::4] = block
    return nn.Sequential(layer)


@pytest.mark.parametrize("quantized", [False, True])
def test_hybrid_weights_round_trip_and_a_lying_header_is_refused(tmp_path, quantized):
    model = hybrid_layer(quantized)
    s = storage(model)
    assert s["layers"]["0.weight"]["format"] == "hybrid"
    path = tmp_path / "h.bin"
    written = ap.export_compressed(model, path)
    back = ap.load_compressed(path, nn.Sequential(nn.Linear(512, 128)))
    assert torch.equal(back[0].weight, model[0].weight)

    data = path.read_bytes()
    hlen = struct.unpack("<I", data[8:12])[0]
    # the payload is the accounting's bits, each of its <= 6 sections padded to a whole byte
    padding = (written - 12 - hlen - 4) * 8 - s["total_bits"]  # 4: the CRC-32
    assert 0 <= padding < 6 * 8

    def one_row_fewer(tensors):  # [name, dtype, shape, "hybrid", book, rows, cols, b, entries]
        assert tensors[0][3] == "hybrid"
        tensors[0][5] -= 1  # fewer kept rows than the bitmap holds; the sizes do not change

    path.write_bytes(edit_header(data, one_row_fewer))
    with pytest.raises(ValueError, match="bitmaps disagree"):
        ap.load_compressed(path, nn.Sequential(nn.Linear(512, 128)))


@pytest.mark.parametrize("version", [1, 2])
def test_older_versions_still_load(tmp_path, version):
    """Version 2 only added the hybrid format, 3 the trailing CRC-32; a file without either
    reads the same under 1 and 2."""
    model = pruned_quantized_lenet5()
    assert "hybrid" not in {v["format"] for v in storage(model)["layers"].values()}
    path = tmp_path / "v1.bin"
    ap.export_compressed(model, path, SPEC)
    data = bytearray(path.read_bytes()[:-4])
    data[7] = version
    path.write_bytes(bytes(data))
    back = ap.load_compressed(path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def every_byte_flipped(data: bytes):
    """Each single-byte corruption of ``data``: every position, with two different values."""
    for i in range(len(data)):
        for delta in (1, 0x80):
            yield data[:i] + bytes([data[i] ^ delta]) + data[i + 1 :]


def test_every_single_byte_corruption_of_a_packed_file_is_refused(tmp_path):
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[:, ::2] = 0  # sparse and dense layers both
    path = tmp_path / "small.admmprune"
    ap.export_compressed(model, path)
    data = path.read_bytes()
    assert len(data) > 100
    for bad in every_byte_flipped(data):
        path.write_bytes(bad)
        with pytest.raises(ValueError):
            ap.load_compressed(path, nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)))


def test_conv1d_weights_are_stored_in_their_gemm_orientation(tmp_path):
    """GPT-2's Conv1D stores W as [in, out]; pruned 2:4 along its inputs (its GEMM columns) it
    is N:M in the accounting and in the packed file, and reads back in its own layout."""
    tr = pytest.importorskip("transformers", reason="needs the [hf] extra")
    torch.manual_seed(0)
    model = tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4))
    names = ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"]
    ap.prune(model, dict.fromkeys(names, ap.NM(2, 4)))
    W = model.get_parameter(f"{names[1]}.weight")  # [in 32, out 128]
    assert W.shape == (32, 128) and int(W.T.reshape(-1, 4).ne(0).sum(1).max()) == 2
    layers = storage(model)["layers"]
    for n in names:
        s = layers[f"{n}.weight"]
        assert s["format"] == "nm" and (s["nm"]["n"], s["nm"]["m"]) == (2, 4)
    path = tmp_path / "gpt2.admmprune"
    ap.export_compressed(model, path)
    fresh = tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4))
    back = ap.load_compressed(path, fresh)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    header = json.loads(
        zlib.decompress(
            path.read_bytes()[12 : 12 + struct.unpack("<I", path.read_bytes()[8:12])[0]]
        )
    )
    assert set(header["transposed"]) >= {f"{n}.weight" for n in names}
