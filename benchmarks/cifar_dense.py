"""The dense CIFAR-10 model the CIFAR benchmarks start from (pass it to them as ``--dense``).

Trained on the first 45,000 images of the shared .npz (SGD, ``--dense-lr``, cosine schedule,
``--dense-wd``); accuracy on the last 5,000 (held out) and on the 1,000 official test images.

    python benchmarks/cifar_dense.py --data-dir ../shared/data --dense-epochs 40 --device cuda

Writes ``dense.pt`` and ``dense.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cifar import add_common_args, dense_checkpoint, load
from admmprune.models import build_model
from admmprune.run.train import evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p, "benchmarks/results/cifar_dense")
    args = p.parse_args()
    if args.dense:
        p.error("--dense: this script trains the dense model; pass --dense to the others")
    if args.quick:
        args.dense_epochs, args.train_subset = 2, args.train_subset or 5000
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = load(args)
    path = dense_checkpoint(args, data, out)
    model = build_model(args.model, num_classes=data.num_classes, in_channels=data.in_channels,
                        input_size=data.input_size)  # fmt: skip
    model.load_state_dict(torch.load(path, weights_only=True))
    device = torch.device(args.device)
    res = {
        "settings": vars(args),
        "accuracy_test": evaluate(model.to(device), data.test, device)[0],
        "accuracy_val": evaluate(model, data.val, device)[0] if data.val is not None else None,
        "seconds": time.perf_counter() - t0,
    }
    (out / "dense.json").write_text(json.dumps(res, indent=2))
    val = "–" if res["accuracy_val"] is None else f"{100 * res['accuracy_val']:.2f} %"
    print(f"dense {args.model}, {args.dense_epochs} epochs: val {val}, test "
          f"{100 * res['accuracy_test']:.2f} %, {res['seconds']:.0f} s; wrote {path}")  # fmt: skip


if __name__ == "__main__":
    main()
