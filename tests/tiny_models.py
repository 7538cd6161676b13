"""Tiny models for recipes in tests (``model: {name: "tiny_models:mlp"}``): small checkpoints."""

from torch import nn


def mlp(num_classes: int = 10, in_channels: int = 1, input_size: int = 8, hidden: int = 12):
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * input_size * input_size, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
