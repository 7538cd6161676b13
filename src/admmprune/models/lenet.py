"""LeNet-5 (the Caffe variant of the pruning papers) and LeNet-300-100."""

from __future__ import annotations

from torch import nn


class LeNet5(nn.Module):
    """conv 20@5×5 → pool → conv 50@5×5 → pool → fc 500 → fc 10 (430.5 K weights on MNIST).

    The Caffe LeNet-5 used by ADMM-NN, Han et al. and Dynamic Network Surgery. Inputs smaller
    than 16×16 get ``padding=2`` convolutions so the network still fits.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> None:
        super().__init__()
        pad = 2 if input_size < 16 else 0
        self.conv1 = nn.Conv2d(in_channels, 20, 5, padding=pad)
        self.conv2 = nn.Conv2d(20, 50, 5, padding=pad)
        self.pool = nn.MaxPool2d(2)
        side = ((input_size + 2 * pad - 4) // 2 + 2 * pad - 4) // 2
        self.fc1 = nn.Linear(50 * side * side, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x):
        x = self.pool(self.conv1(x))
        x = self.pool(self.conv2(x))
        return self.fc2(nn.functional.relu(self.fc1(x.flatten(1))))


class LeNet300(nn.Module):
    """LeNet-300-100: fully connected 300 → 100 → classes (266 K weights on MNIST)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels * input_size * input_size, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x):
        x = nn.functional.relu(self.fc1(x.flatten(1)))
        return self.fc3(nn.functional.relu(self.fc2(x)))
