"""Datasets: the embedded default (scikit-learn's digits), MNIST, CIFAR-10/100, ``.npz`` arrays,
and any ImageFolder tree (the ImageNet layout).

Small datasets are held as tensors in memory with augmentation done in torch, which is far faster
on a CPU than per-image PIL transforms.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["DATASETS", "DataBundle", "load_data"]

DATASETS = ("digits", "mnist", "cifar10", "cifar100", "npz", "imagefolder")

_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)


class TensorImages(Dataset):
    """Images ``[N, C, H, W]`` (uint8 or float) and labels, normalised on the fly.

    ``augment`` = random crop with 4-pixel zero padding and horizontal flip (the CIFAR recipe).
    """

    def __init__(self, x, y, mean, std, augment: bool = False) -> None:
        self.x, self.y = x, y.long()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        x, y = self.batch(torch.tensor([i]))
        return x[0], y[0]

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``idx`` as one normalised (and, if asked, augmented) batch.

        The train loop calls this directly: whole-batch indexing avoids a Python call per image.
        """
        img = self.x[idx]
        img = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
        if self.augment:
            n, _, h, w = img.shape
            padded = torch.nn.functional.pad(img, (4, 4, 4, 4))
            dy, dx = torch.randint(0, 9, (2, n)).tolist()
            flip = (torch.rand(n) < 0.5).tolist()
            img = torch.stack(
                [
                    p[:, a : a + h, b : b + w].flip(-1) if f else p[:, a : a + h, b : b + w]
                    for p, a, b, f in zip(padded, dy, dx, flip)
                ]
            )
        return (img - self.mean) / self.std, self.y[idx]

    def subset(self, idx: torch.Tensor) -> TensorImages:
        """The images ``idx`` as a dataset of their own (same normalisation)."""
        out = TensorImages.__new__(TensorImages)
        out.__dict__.update(self.__dict__)
        out.x, out.y = self.x[idx], self.y[idx]
        return out


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset | None
    test: Dataset
    num_classes: int
    in_channels: int
    input_size: int
    #: the training loss (train.OBJECTIVES): class labels, or a causal LM's next tokens
    objective: str = "classify"

    def fingerprint(self) -> str:
        """SHA-256 of the images and labels (in-memory data) or of the file lists: the same
        data read from another folder has the same fingerprint."""
        h = hashlib.sha256(f"{self.num_classes},{self.in_channels},{self.input_size}".encode())
        for part in (self.train, self.val, self.test):
            if isinstance(part, (TensorImages, TokenWindows)):
                for t in (part.x, part.y):
                    h.update(str((t.dtype, tuple(t.shape))).encode())
                    h.update(t.contiguous().numpy().view(np.uint8).reshape(-1))
            elif part is None:
                h.update(b"none")
            else:  # e.g. an ImageFolder: file names relative to its root, and labels
                root, samples = str(getattr(part, "root", "")), getattr(part, "samples", None)
                if isinstance(samples, list):
                    listing = [(str(f).removeprefix(root), y) for f, y in samples]
                else:
                    listing = len(part)
                h.update(repr(listing).encode())
        return h.hexdigest()


class TokenWindows(Dataset):
    """Windows of ``seq_len`` token ids ``[N, seq_len]``; a batch is ``(ids, ids)``: a causal LM
    predicts each window's next tokens from its own (``objective="next_token"``)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.x = self.y = ids.long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[idx], self.y[idx]


def _need_dir(name: str, data_dir: str | None) -> Path:
    if not data_dir:
        raise ValueError(
            f"dataset {name!r} needs a data dir: set data.dir in the recipe or pass --data-dir."
        )
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise ValueError(f"data dir {str(path)!r} for dataset {name!r} does not exist.")
    return path


def _digits(seed: int) -> DataBundle:
    from sklearn.datasets import load_digits

    X, Y = load_digits(return_X_y=True)  # 1,797 images 8×8, values 0..16, shipped with sklearn
    x = torch.tensor(X, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(Y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # fixed split
    tr, te = perm[:1437], perm[1437:]
    mean, std = (float(x[tr].mean()),), (float(x[tr].std()),)
    return DataBundle(
        TensorImages(x[tr], y[tr], mean, std), None, TensorImages(x[te], y[te], mean, std), 10, 1, 8
    )


def _mnist(data_dir: str | None, download: bool) -> DataBundle:
    import torchvision

    root = _need_dir("mnist", data_dir) if not download else Path(data_dir or "data")
    try:
        tr = torchvision.datasets.MNIST(str(root), train=True, download=download)
        te = torchvision.datasets.MNIST(str(root), train=False, download=download)
    except RuntimeError as exc:
        raise ValueError(
            f"MNIST not found under {str(root)!r} (torchvision layout: MNIST/raw/*-ubyte): {exc}"
        ) from None
    m, s = (0.1307,), (0.3081,)
    x_tr, x_te = tr.data.unsqueeze(1), te.data.unsqueeze(1)
    return DataBundle(
        TensorImages(x_tr, tr.targets, m, s), None, TensorImages(x_te, te.targets, m, s), 10, 1, 28
    )


def _cifar(name: str, data_dir: str | None, download: bool, augment: bool) -> DataBundle:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    root = _need_dir(name, data_dir) if not download else Path(data_dir or "data")
    try:
        tr = cls(str(root), train=True, download=download)
        te = cls(str(root), train=False, download=download)
    except RuntimeError as exc:
        raise ValueError(
            f"{name} not found under {str(root)!r} (torchvision layout): {exc}"
        ) from None

    def nchw(a):
        return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous()

    classes = 10 if name == "cifar10" else 100
    return DataBundle(
        TensorImages(nchw(tr.data), torch.tensor(tr.targets), _CIFAR_MEAN, _CIFAR_STD, augment),
        None,
        TensorImages(nchw(te.data), torch.tensor(te.targets), _CIFAR_MEAN, _CIFAR_STD),
        classes,
        3,
        32,
    )


def _npz(path: str | None, val_size: int, augment: bool) -> DataBundle:
    """Arrays ``x_train, y_train, x_test, y_test`` (HWC or CHW, uint8 or float).

    The last ``val_size`` training images are held out for validation (never trained on).
    """
    if not path:
        raise ValueError("dataset 'npz' needs data.path (the .npz file) or data.dir holding one.")
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(p.glob("*.npz"))
        if len(files) != 1:
            raise ValueError(f"{str(p)!r} holds {len(files)} .npz files; set data.path to one.")
        p = files[0]
    if not p.is_file():
        raise ValueError(f"npz file {str(p)!r} does not exist.")
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(z.files)
            if missing:
                raise ValueError(f"{str(p)!r} lacks arrays {sorted(missing)} (has {z.files}).")
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(
            f"cannot read npz file {str(p)!r}: {type(exc).__name__}: {exc} (truncated or not an "
            "npz written by numpy.savez?)."
        ) from None

    def nchw(a):
        t = torch.from_numpy(np.ascontiguousarray(a))
        if t.ndim == 3:
            t = t.unsqueeze(1)
        return t.permute(0, 3, 1, 2).contiguous() if t.shape[-1] in (1, 3) else t

    x_tr, x_te = nchw(arrays["x_train"]), nchw(arrays["x_test"])
    y_tr, y_te = (
        torch.from_numpy(arrays["y_train"]).long(),
        torch.from_numpy(arrays["y_test"]).long(),
    )
    scale = 255.0 if x_tr.dtype == torch.uint8 else 1.0
    flat = x_tr[: len(x_tr) - val_size].float() / scale
    mean = tuple(flat.mean(dim=(0, 2, 3)).tolist())
    std = tuple(flat.std(dim=(0, 2, 3)).tolist())
    n_tr = len(x_tr) - val_size
    val = TensorImages(x_tr[n_tr:], y_tr[n_tr:], mean, std) if val_size else None
    classes = int(max(y_tr.max(), y_te.max())) + 1
    return DataBundle(
        TensorImages(x_tr[:n_tr], y_tr[:n_tr], mean, std, augment),
        val,
        TensorImages(x_te, y_te, mean, std),
        classes,
        x_tr.shape[1],
        x_tr.shape[-1],
    )


def _imagefolder(data_dir: str | None, image_size: int) -> DataBundle:
    import torchvision
    from torchvision import transforms as tf

    root = _need_dir("imagefolder", data_dir)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ValueError(f"imagefolder needs {str(root / split)!r} (ImageNet layout).")
    norm = tf.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_tf = tf.Compose(
        [tf.RandomResizedCrop(image_size), tf.RandomHorizontalFlip(), tf.ToTensor(), norm]
    )
    eval_tf = tf.Compose(
        [tf.Resize(int(image_size * 8 / 7)), tf.CenterCrop(image_size), tf.ToTensor(), norm]
    )
    tr = torchvision.datasets.ImageFolder(str(root / "train"), train_tf)
    te = torchvision.datasets.ImageFolder(str(root / "val"), eval_tf)
    return DataBundle(tr, None, te, len(tr.classes), 3, image_size)


def load_data(
    name: str,
    *,
    data_dir: str | None = None,
    path: str | None = None,
    download: bool = False,
    augment: bool = True,
    val_size: int = 0,
    image_size: int = 224,
    seed: int = 0,
) -> DataBundle:
    """Load dataset ``name`` (one of :data:`DATASETS`); errors say what is missing and where.

    ``val_size``: the last ``val_size`` training images are held out as ``val`` (never trained on).
    """
    if name == "npz":
        return _npz(path or data_dir, val_size, augment)
    if name == "digits":
        bundle = _digits(seed)
    elif name == "mnist":
        bundle = _mnist(data_dir, download)
    elif name in ("cifar10", "cifar100"):
        bundle = _cifar(name, data_dir, download, augment)
    elif name == "imagefolder":
        bundle = _imagefolder(data_dir, image_size)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    if val_size:
        n = len(bundle.train)
        if not 0 < val_size < n:
            raise ValueError(f"val_size {val_size}: hold out between 1 and {n - 1} of {n} images.")
        if bundle.val is not None:
            raise ValueError(f"dataset {name!r} has its own validation split; drop val_size.")
        bundle.val = bundle.train.subset(torch.arange(n - val_size, n))
        bundle.train = bundle.train.subset(torch.arange(n - val_size))
    return bundle
