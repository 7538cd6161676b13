"""What the CIFAR-10 benchmarks share: their common arguments, the data split, the dense model."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from admmprune.run.data import DataBundle, load_data
from mnist_admmnn import train_dense


def add_common_args(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--data-dir", default=None, help="folder with the CIFAR-10 .npz")
    p.add_argument("--dataset", default="npz", choices=("npz", "digits"))
    p.add_argument("--model", default="resnet20")
    p.add_argument("--dense", default=None, help="dense state_dict to start from")
    p.add_argument("--dense-epochs", type=int, default=10)
    p.add_argument("--dense-lr", type=float, default=0.1, help="SGD lr of the dense model")
    p.add_argument("--dense-wd", type=float, default=5e-4, help="its weight decay")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-subset", type=int, default=0, help="train on the first N images")
    p.add_argument("--quick", action="store_true", help="1-epoch stages on 5k images")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=out)


def load(args) -> DataBundle:
    """Train on the first 45,000 images, hold out the last 5,000 (``val``); the shared .npz's
    1,000 official test images are ``test``."""
    val = 5000 if args.dataset == "npz" else 0
    data = load_data(args.dataset, data_dir=args.data_dir, val_size=val, seed=args.seed)
    if args.train_subset:
        data.train = data.train.subset(torch.arange(min(args.train_subset, len(data.train))))
    return data


def dense_checkpoint(args, data: DataBundle, out: Path) -> Path:
    """``--dense`` if given, else a dense model trained for ``--dense-epochs`` and saved."""
    if args.dense:
        return Path(args.dense)
    device = torch.device(args.device)
    dense = train_dense(args, data, device, args.dense_epochs, lr=args.dense_lr,
                        weight_decay=args.dense_wd)  # fmt: skip
    torch.save(dense.state_dict(), out / "dense.pt")
    return out / "dense.pt"
