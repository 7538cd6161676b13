"""Tiny models for recipes in tests (``model: {name: "tiny_models:mlp"}``): small checkpoints;
``reinit`` for tiny transformers whose default init hides wrong results."""

import torch
from torch import nn


def reinit(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every weight matrix redrawn ``N(0, 0.2²)`` with ``seed`` (default inits such as BERT's
    0.02 std make outputs barely depend on the input); the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def mlp(num_classes: int = 10, in_channels: int = 1, input_size: int = 8, hidden: int = 12):
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * input_size * input_size, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def vit(num_classes: int = 10, in_channels: int = 1, input_size: int = 8):
    """A one-block torchvision ViT with 4 heads (attention-head recipes)."""
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        image_size=input_size, patch_size=4, num_layers=1, num_heads=4, hidden_dim=32,
        mlp_dim=48, num_classes=num_classes,
    )  # fmt: skip
    model.conv_proj = nn.Conv2d(in_channels, 32, 4, 4)
    return model
