"""How long finding and removing structure takes on real architectures (issue: channel_groups
on Swin-T and a grouped-query LLaMA under 10 s on 2 cores), and that compaction stays exact.

For each model (random weights re-initialised so every head and channel matters): the time of
``channel_groups`` + ``head_groups``, then half of every group is zeroed (their projections)
and ``compact`` runs (its safety net compares the compact and the masked model on two inputs);
the table gives both times, the groups found, heads and channels removed, parameters and
every-op MACs (``accounting.count``'s ``all_macs``) before/after, and the largest relative
output difference on a third input.

    python benchmarks/structure_graph.py [--out benchmarks/results/structure_graph]

Needs the ``[hf]`` and ``[vision]`` extras for the transformers and timm rows (skipped, and
said, without them). Writes ``results.md`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

import admmprune as ap
from admmprune.weights.forward import floats


def reinit(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if p.ndim == 1 and "norm" in name.lower() and name.endswith("weight") else 0
            p.copy_(torch.randn(p.shape, generator=g) * (0.05 if p.ndim > 1 else 0.1) + base)
    return model.eval()


def llama_gqa():
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=8000,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=1024,
    )
    return transformers.LlamaForCausalLM(cfg), torch.randint(0, 8000, (1, 64))


def gpt2():
    import transformers

    cfg = transformers.GPT2Config(vocab_size=8000, n_embd=384, n_layer=6, n_head=6)
    return transformers.GPT2LMHeadModel(cfg), torch.randint(0, 8000, (1, 64))


def bert():
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=8000,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=6,
        intermediate_size=1536,
    )
    return transformers.BertModel(cfg), torch.randint(0, 8000, (1, 64))


def timm_vit():
    import timm

    return timm.create_model("vit_small_patch16_224", num_classes=10), torch.randn(1, 3, 224, 224)


MODELS = {
    "swin_t (64x64)": lambda: (
        torchvision.models.swin_t(num_classes=10),
        torch.randn(1, 3, 64, 64),
    ),
    "vit_b_16": lambda: (torchvision.models.vit_b_16(num_classes=10), torch.randn(1, 3, 224, 224)),
    "convnext_tiny": lambda: (
        torchvision.models.convnext_tiny(num_classes=10),
        torch.randn(1, 3, 64, 64),
    ),
    "regnet_x_400mf": lambda: (
        torchvision.models.regnet_x_400mf(num_classes=10),
        torch.randn(1, 3, 64, 64),
    ),
    "resnext50_32x4d": lambda: (
        torchvision.models.resnext50_32x4d(num_classes=10),
        torch.randn(1, 3, 64, 64),
    ),
    "llama gqa (6x384, 6q/2kv heads)": llama_gqa,
    "gpt2 (6x384)": gpt2,
    "bert (6x384)": bert,
    "timm vit_small_patch16_224": timm_vit,
}


def out(model, x):
    with torch.no_grad():
        return floats(model(x))[0]


def run(name, make) -> dict:
    try:
        model, x = make()
    except ImportError as e:
        return {"model": name, "skipped": f"{e}"}
    model = reinit(model)
    t = time.perf_counter()
    groups = ap.channel_groups(model, x, 0.5)
    try:
        heads = ap.head_groups(model, 0.5)
    except ValueError:
        heads = []
    t_groups = time.perf_counter() - t
    params = dict(model.named_parameters())
    with torch.no_grad():
        for g in groups + heads:
            Z, _ = g.project({p: params[p] for p, _ in g.members})
            for p, z in Z.items():
                params[p].copy_(z)
    t = time.perf_counter()
    small, report = ap.compact(model, x)
    t_compact = time.perf_counter() - t
    g = torch.Generator().manual_seed(7)
    other = (
        torch.randint(0, int(x.max()) + 1, x.shape, generator=g)
        if not x.is_floating_point()
        else torch.randn(x.shape, generator=g)
    )
    a, b = out(small, other), out(model, other)
    return {
        "model": name,
        "groups_s": t_groups,
        "compact_s": t_compact,
        "channel_groups": len(groups),
        "head_groups": len(heads),
        "channels_removed": sum(report.removed.values()),
        "heads_removed": sum(report.heads_removed.values()),
        "params": [report.params_before, report.params_after],
        "all_macs": [report.all_macs_before, report.all_macs_after],
        "max_rel_diff": float((a - b).abs().max() / b.abs().max()),
    }


def main() -> None:
    ap_ = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap_.add_argument("--out", type=Path, default=Path("benchmarks/results/structure_graph"))
    args = ap_.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, make in MODELS.items():
        rows.append(run(name, make))
        print(rows[-1], flush=True)
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "",
        "| model | groups (s) | compact (s) | channel / head groups | channels / heads removed "
        "| params | all MACs | max rel. diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['model']} | skipped: {r['skipped']} |||||||")
            continue
        lines.append(
            f"| {r['model']} | {r['groups_s']:.2f} | {r['compact_s']:.2f} | "
            f"{r['channel_groups']} / {r['head_groups']} | {r['channels_removed']} / "
            f"{r['heads_removed']} | {r['params'][0] / 1e6:.2f}M → {r['params'][1] / 1e6:.2f}M | "
            f"{r['all_macs'][0] / 1e6:.0f}M → {r['all_macs'][1] / 1e6:.0f}M | "
            f"{r['max_rel_diff']:.1e} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
