"""Sparse checkpoints of Hugging Face models (save_sparse / load_sparse): bit-identical round
trips in every format, the accounting's size on disk, refusals of damaged files and of models
they do not fit."""

import pytest
import torch

import admmprune as ap
from admmprune.deployment.sparse_checkpoint import SPARSE_FILE
from admmprune.deployment.storage import storage
from test_lm import _reinit, _transformers, calibration, tiny

SETS = {
    "unstructured": lambda: ap.Unstructured(0.3, per_row=True),
    "2:4": lambda: ap.NM(2, 4),
    "joint 4-bit": lambda: ap.Unstructured(0.5, per_row=True) & ap.Quantized(4),
}


def pruned(kind: str, which: str):
    torch.manual_seed(0)
    model = _reinit(tiny(kind)).eval()
    ap.oneshot(model, SETS[which](), calibration(n=2), solver="sparsegpt")
    return model


@pytest.mark.parametrize("which", list(SETS))
@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt"])
def test_round_trip_is_bit_identical(kind, which, tmp_path):
    model = pruned(kind, which)
    nbytes = ap.save_sparse(model, tmp_path / "m")
    back = ap.load_sparse(tmp_path / "m")
    assert type(back) is type(model) and not back.training
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for name, t in ours.items():
        assert theirs[name].dtype == t.dtype and torch.equal(theirs[name], t), name
    ids = calibration(n=1)[0]["input_ids"][:1, :6]
    a = model.generate(ids, max_new_tokens=5, do_sample=False)
    b = back.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)
    # on disk: the accounting's bits for the pruned weights, the rest raw (tied once)
    acc = storage(model)
    ptrs, tied = set(), 0
    for t in ours.values():  # tied weights share storage
        tied += t.numel() * t.element_size() if t.data_ptr() in ptrs else 0
        ptrs.add(t.data_ptr())
    expect = acc["total_bits"] / 8 - tied
    assert nbytes == (tmp_path / "m" / SPARSE_FILE).stat().st_size
    # the payload (what grows with the model) within 5 % of it; the header is names and sizes
    header = int.from_bytes((tmp_path / "m" / SPARSE_FILE).read_bytes()[:8], "little")
    assert abs(nbytes - 8 - header - expect) <= 0.05 * expect, (nbytes, header, expect)


def test_fp16_values_and_the_size_against_dense_fp16(tmp_path):
    tr = _transformers()
    cfg = tr.LlamaConfig(vocab_size=64, hidden_size=128, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=256)  # fmt: skip
    torch.manual_seed(0)
    model = _reinit(tr.LlamaForCausalLM(cfg)).eval()
    ap.prune(model, {"model.layers.*": ap.Unstructured(0.1, per_row=True)})
    half = ap.save_sparse(model, tmp_path / "s", dtype=torch.float16)
    model.half().save_pretrained(tmp_path / "dense", safe_serialization=True)
    dense = (tmp_path / "dense" / "model.safetensors").stat().st_size
    back = ap.load_sparse(tmp_path / "s")
    for name, t in model.state_dict().items():
        assert back.state_dict()[name].dtype == torch.float16
        assert torch.equal(back.state_dict()[name], t), name
    layers = sum(t.numel() for n, t in model.state_dict().items() if n.startswith("model.layers"))
    # the decoder blocks at 90 %: about 2.6 bits per weight instead of 16
    rest = dense - 2 * layers
    assert (half - rest) / (2 * layers) < 0.2, (half, dense)


def _saved(tmp_path):
    model = pruned("llama", "unstructured")
    ap.save_sparse(model, tmp_path / "m")
    return model, tmp_path / "m" / SPARSE_FILE


def test_the_same_model_gives_the_same_file_byte_for_byte(tmp_path):
    # safetensors writes its metadata map in no fixed order: with more than one entry, saves of
    # one model differed in about half of the pairs (seen as a flaky `export --sparse` test)
    model, path = _saved(tmp_path)
    for i in range(4):
        ap.save_sparse(model, tmp_path / f"again{i}")
        assert (tmp_path / f"again{i}" / SPARSE_FILE).read_bytes() == path.read_bytes()


def test_truncated_or_flipped_file_is_refused_naming_it(tmp_path):
    _, path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"model-sparse\.safetensors.*safetensors"):
        ap.load_sparse(tmp_path / "m")
    flipped = bytearray(data)
    flipped[-50] ^= 0x10  # inside the last tensor's bytes
    path.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"model-sparse\.safetensors: tensor '.*' fails its chec"):
        ap.load_sparse(tmp_path / "m")


def test_single_byte_corruptions_are_refused(tmp_path):
    # every byte of the headers (safetensors' and ours), and payload bytes across the file
    from admmprune.deployment.sparse_checkpoint import _MalformedError, _read_sparse

    _, path = _saved(tmp_path)
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    positions = [*range(0, header, 3), *range(header, len(data), 97)]
    for i in positions:
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x04]) + data[i + 1 :])
        with pytest.raises(_MalformedError):
            _read_sparse(path)


def test_other_shape_and_foreign_inputs_are_refused(tmp_path):
    tr = _transformers()
    model, _ = _saved(tmp_path)
    cfg = tr.LlamaConfig(vocab_size=64, hidden_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64)  # fmt: skip
    other = tr.LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match="does not fit this model"):
        ap.load_sparse(tmp_path / "m", model=other)
    with pytest.raises(ValueError, match="overwrite=True"):
        ap.save_sparse(model, tmp_path / "m")
    assert ap.load_sparse(tmp_path / "m") is not None  # the existing one is untouched
    with pytest.raises(ValueError, match="transformers model"):
        ap.save_sparse(torch.nn.Linear(4, 4), tmp_path / "lin")
    assert not (tmp_path / "lin").exists()
    with pytest.raises(ValueError, match="not found"):
        ap.load_sparse(tmp_path / "nothing")
