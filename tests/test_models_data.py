"""The model zoo and the data loaders (synthetic files; the real data is opt-in, --data-dir)."""

import numpy as np
import pytest
import torch

from admmprune.models import build_model
from admmprune.run.data import load_data
from admmprune.run.parse import parse_recipe
from admmprune.run.pipeline import prepare, run


@pytest.mark.parametrize(
    "name,channels,size,weights",
    [
        ("lenet5", 1, 28, 430_500),  # the papers' count: conv1..fc2 weights
        ("lenet300", 1, 28, 266_200),
        ("resnet20", 3, 32, None),
        ("resnet56", 3, 32, None),
        ("vgg16", 3, 32, None),
        ("resnet18", 3, 32, None),  # torchvision by name
    ],
)
def test_models_build_and_run(name, channels, size, weights):
    model = build_model(name, num_classes=10, in_channels=channels, input_size=size)
    assert model(torch.randn(2, channels, size, size)).shape == (2, 10)
    if weights is not None:
        n = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
        assert n == weights


def test_resnet_depths_have_the_right_layer_count():
    model = build_model("resnet56", num_classes=10, in_channels=3, input_size=32)
    convs = [
        m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
    ]
    assert len(convs) == 55  # 6n + 1 with n = 9, plus the fc: 56 weighted layers


def test_import_path_model_and_errors():
    model = build_model("torch.nn:Identity", num_classes=10, in_channels=1, input_size=8)
    assert isinstance(model, torch.nn.Identity)
    with pytest.raises(ValueError, match=r"not an nn\.Module"):
        build_model("builtins:dict", num_classes=10, in_channels=1, input_size=8)
    with pytest.raises(ValueError, match="kwargs"):
        build_model("torch.nn:Linear", num_classes=10, in_channels=1, input_size=8, kwargs={"x": 1})
    with pytest.raises(ValueError, match="3-channel"):
        build_model("resnet18", num_classes=10, in_channels=1, input_size=28)


def fake_npz(path, n_train=120, n_test=30, hw=8):
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (n_train, hw, hw, 3), dtype=np.uint8),
        y_train=rng.integers(0, 10, n_train).astype(np.uint8),
        x_test=rng.integers(0, 256, (n_test, hw, hw, 3), dtype=np.uint8),
        y_test=rng.integers(0, 10, n_test).astype(np.uint8),
    )
    return path


def test_npz_split_layout_and_augmentation(tmp_path):
    path = fake_npz(tmp_path / "d.npz")
    b = load_data("npz", path=str(path), val_size=20)
    assert (len(b.train), len(b.val), len(b.test)) == (100, 20, 30)  # last 20 held out
    assert (b.in_channels, b.input_size, b.num_classes) == (3, 8, 10)
    x, y = b.test.batch(torch.arange(4))
    assert x.shape == (4, 3, 8, 8) and y.dtype == torch.long
    torch.manual_seed(0)
    xa, _ = b.train.batch(torch.arange(50))
    xb, _ = b.train.subset(torch.arange(50)).batch(torch.arange(50))
    assert not torch.equal(xa, xb)  # augmentation draws differ
    with pytest.raises(ValueError, match="lacks arrays"):
        np.savez(tmp_path / "bad.npz", x_train=np.zeros((2, 4, 4, 3)))
        load_data("npz", path=str(tmp_path / "bad.npz"))


def test_digits_split_is_fixed():
    a, b = load_data("digits"), load_data("digits")
    assert torch.equal(a.test.x, b.test.x) and len(a.train) == 1437


def test_amp_bf16_run_on_cpu(tmp_path):
    recipe = {
        "output_dir": str(tmp_path / "amp"),
        "device": "cpu",
        "amp": True,
        "progress": False,
        "model": {"name": "lenet5"},
        "data": {"name": "npz", "path": str(fake_npz(tmp_path / "d.npz", hw=28))},
        "pretrain": {"epochs": 1},
        "admm": {"epochs": 1},
        "retrain": {"epochs": 1},
        "constraints": {"conv2": {"filters": 0.5}, "fc1": {"unstructured": 0.1}},
    }
    summary = run(prepare(parse_recipe(recipe)), log=lambda *_: None)
    assert summary["constrained_layers"]["rate"] > 5


@pytest.mark.slow
def test_real_mnist_and_cifar_load(data_dir):
    m = load_data("mnist", data_dir=data_dir)
    assert (len(m.train), len(m.test)) == (60000, 10000)
    c = load_data("npz", path=f"{data_dir}/cifar10-train50k-test1k.npz", val_size=5000)
    assert (len(c.train), len(c.val), len(c.test)) == (45000, 5000, 1000)
