import contextlib
import io
import os

import pytest
import torch
from torch import nn

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one thread each keeps them from oversubscribing
    torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption(
        "--data-dir",
        default=None,
        help="folder with real benchmark data (MNIST in torchvision layout, CIFAR-10 .npz); "
        "enables the tests marked slow",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--data-dir"):
        return
    skip = pytest.mark.skip(reason="real-data test: pass --data-dir to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """``admmprune demo`` run once per worker (two test files read it; their tests share an
    xdist group, so one worker runs both): its exit code, run dir and standard output."""
    from admmprune.run.cli import main

    out = tmp_path_factory.mktemp("demo") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["demo", "--output-dir", str(out), "--no-progress"])
    return code, out, printed.getvalue()


@pytest.fixture
def data_dir(request):
    return request.config.getoption("--data-dir")


class TinyCNN(nn.Module):
    """Conv, grouped conv, BN, Linear: every kind of layer the projections handle."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.adaptive_avg_pool2d(torch.relu(self.conv2(x)), 4)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.fixture
def tiny_cnn():
    torch.manual_seed(0)
    return TinyCNN()


def make_blobs(n=512, d=20, classes=4, seed=0):
    """Synthetic classification data: Gaussian blobs, separable but not trivially."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g) * 2.0
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, d, generator=g) * 1.5
    return x, y
