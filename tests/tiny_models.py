"""Tiny models for recipes in tests (``model: {name: "tiny_models:mlp"}``): small checkpoints."""

from torch import nn


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
