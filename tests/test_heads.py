"""Attention heads as coupled groups, and compaction of real transformer and CNN families.

Weights are re-initialised (std 0.2, norms around 1) so outputs depend on every head and
channel: default inits (BERT's 0.02, a zero ViT head) hide wrong compactions.
"""

import pickle

import pytest
import torch
from torch import nn

import admmprune as ap
from admmprune.sets.constraints import keep_count
from admmprune.structure.compact import CompactionError

heads_mod = __import__("importlib").import_module("admmprune.structure.heads")
attention_mod = __import__("importlib").import_module("admmprune.structure.attention")


def reinit(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if p.ndim == 1 and "norm" in name.lower() and name.endswith("weight") else 0
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim > 1 else 0.3) + base)
    return model.eval()


def _project(model: nn.Module, groups) -> None:
    P = dict(model.named_parameters())
    with torch.no_grad():
        for g in groups:
            Z, _ = g.project({p: P[p] for p, _ in g.members})
            for p, z in Z.items():
                P[p].copy_(z)


def _out(model, x):
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    if isinstance(out, tuple):
        out = out[0]
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def check_exact(model, x, x_other, keep=0.5, channels=True):
    """Prune half the heads (and MLP neurons), compact, compare on another input."""
    dense = _out(model, x_other)
    groups = ap.head_groups(model, keep)
    if channels:
        groups += ap.channel_groups(model, x, keep)
    _project(model, groups)
    masked = _out(model, x_other)
    assert _rel(masked, dense) > 1e-2  # the pruned heads mattered
    small, report = ap.compact(model, x)
    assert sum(report.heads_removed.values()) == sum(
        g.n - keep_count(keep, g.n) for g in groups if g.kind == "heads"
    )
    assert report.params_after < report.params_before
    assert _rel(_out(small, x_other), masked) <= 1e-5
    return small, report


# Hugging Face -----------------------------------------------------------------------------------
def _hf(name):
    transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")
    return transformers


def _llama(layers: int = 2, kv: int = 4):
    """A tiny LLaMA (4 query heads) with input-dependent weights."""
    tr = _hf("llama")
    cfg = tr.LlamaConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv, intermediate_size=48, max_position_embeddings=32,
    )  # fmt: skip
    assert cfg.use_cache  # the default: tracing must turn it off itself
    return reinit(tr.LlamaForCausalLM(cfg))


def test_bert_heads_and_neurons_compact_exactly():
    tr = _hf("bert")
    cfg = tr.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=32,
    )  # fmt: skip
    model = reinit(tr.BertModel(cfg))
    x = torch.randint(0, 50, (2, 7))
    small, _ = check_exact(model, x, torch.randint(0, 50, (3, 11)))
    att = small.encoder.layer[0].attention.self
    assert (att.num_attention_heads, att.query.out_features) == (2, 16)
    assert small.encoder.layer[0].attention.output.dense.in_features == 16


@pytest.mark.parametrize("kv", [4, 2])
def test_llama_mha_and_gqa_compact_exactly_with_the_default_cache(kv):
    model = _llama(kv=kv)
    x = torch.randint(0, 50, (2, 7))
    small, report = check_exact(model, x, torch.randint(0, 50, (1, 12)))
    att = small.model.layers[0].self_attn
    # GQA: the unit is a KV head with its 2 query heads; the ratio is kept
    assert att.q_proj.out_features == 2 * att.head_dim
    assert att.k_proj.out_features == (2 if kv == 4 else 1) * att.head_dim
    assert report.heads_removed["model.layers.0.self_attn"] == (2 if kv == 4 else 1)
    assert model.config.use_cache  # restored
    with torch.no_grad():  # generation with a cache still runs on the compact model
        small.generate(x[:1], max_new_tokens=3, do_sample=False)


def test_gpt2_fused_conv1d_heads_and_neurons_compact_exactly():
    tr = _hf("gpt2")
    cfg = tr.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    model = reinit(tr.GPT2LMHeadModel(cfg))
    x = torch.randint(0, 50, (2, 7))
    small, _ = check_exact(model, x, torch.randint(0, 50, (2, 9)))
    attn, mlp = small.transformer.h[0].attn, small.transformer.h[0].mlp
    assert (attn.num_heads, attn.split_size, attn.c_attn.nf) == (2, 16, 48)
    assert mlp.c_fc.nf == 64  # 128 neurons, half removed ([in, out] storage handled)


def test_hidden_size_groups_are_refused_with_the_norm_named():
    model = _llama(layers=1)
    x = torch.randint(0, 50, (2, 7))
    with pytest.raises(ValueError, match=r"normalised together by .*RMSNorm"):
        ap.channel_groups(model, x, 0.5, layers="*mlp.down_proj")
    with pytest.raises(ValueError, match=r"attention projection: prune it by heads"):
        ap.channel_groups(model, x, 0.5, layers="*v_proj")
    # zero a hidden-size channel everywhere it is produced: compact keeps it and says why
    with torch.no_grad():
        for m in (model.model.layers[0].self_attn.o_proj, model.model.layers[0].mlp.down_proj):
            m.weight[3] = 0
    small, report = ap.compact(model, x)
    assert small.model.layers[0].mlp.down_proj.out_features == 32
    assert any("RMSNorm" in why for why in report.skipped.values())


# torchvision / timm / torch.nn -----------------------------------------------------------------
def test_torchvision_vit_heads_compact_into_pruned_mha():
    from torchvision.models.vision_transformer import VisionTransformer

    model = reinit(
        VisionTransformer(
            image_size=16, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=48,
            num_classes=5,
        )
    )  # fmt: skip
    small, _ = check_exact(model, torch.randn(2, 3, 16, 16), torch.randn(3, 3, 16, 16))
    att = small.encoder.layers[0].self_attention
    assert isinstance(att, ap.PrunedMultiheadAttention) and att.num_heads == 2


def test_transformer_encoder_heads_compact_exactly():
    layer = nn.TransformerEncoderLayer(32, 4, 48, dropout=0.0, batch_first=True)
    model = reinit(nn.Sequential(nn.TransformerEncoder(layer, 2), nn.Linear(32, 5)))
    check_exact(model, torch.randn(2, 6, 32), torch.randn(3, 9, 32))


@pytest.mark.parametrize("batch_first", [True, False])
def test_pruned_mha_matches_the_masked_module_with_masks_and_weights(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
    (group,) = ap.head_groups(mha, 0.5)
    _project(mha, [group])
    kept = [h for h in range(4) if mha.in_proj_weight[2 * 16 + 4 * h].any()]
    small = ap.PrunedMultiheadAttention(mha, kept)
    L, S, N = 5, 6, 2
    shape = (N, L, 16) if batch_first else (L, N, 16)
    q = torch.randn(shape)
    kv = torch.randn((N, S, 16) if batch_first else (S, N, 16))
    pad = torch.zeros(N, S)
    pad[1, -2:] = float("-inf")
    mask = torch.randn(L, S)
    for kwargs in (
        {"need_weights": False},
        {"attn_mask": mask, "key_padding_mask": pad, "need_weights": True},
        {"attn_mask": mask > 1.0, "key_padding_mask": pad.isinf(), "average_attn_weights": False},
    ):
        with torch.no_grad():
            a, wa = mha(q, kv, kv, **kwargs)
            b, wb = small(q, kv, kv, **kwargs)
        assert _rel(b, a) <= 1e-5
        if kwargs.get("need_weights") and kwargs.get("average_attn_weights", True) is False:
            assert torch.allclose(wb, wa[:, kept], atol=1e-6)


def test_timm_vit_heads_compact_exactly():
    timm = pytest.importorskip("timm", reason="needs timm (the [vision] extra)")
    model = reinit(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5))
    small, _ = check_exact(model, torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32))
    assert small.blocks[0].attn.num_heads == 2 and small.blocks[0].attn.qkv.out_features == 384


def test_swin_heads_and_neurons_compact_exactly_with_shifted_windows():
    from torchvision.models.swin_transformer import SwinTransformer

    swin = SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
        num_classes=5,
    )  # fmt: skip
    model = reinit(swin)
    x = torch.randn(2, 3, 32, 32)  # 8×8 then 4×4 tokens: shifted windows in stage 1
    groups = ap.channel_groups(model, x, 0.5)
    assert {g.name for g in groups} == {f"features.{s}.{b}.mlp.0" for s in (1, 3) for b in (0, 1)}
    small, report = check_exact(model, x, torch.randn(3, 3, 40, 40))  # padded windows too
    assert sum(report.removed.values()) == sum(g.n // 2 for g in groups)
    attn = small.features[1][1].attn
    assert type(attn).__name__ == "PrunedShiftedWindowAttention" and attn.num_heads == 1
    assert attn.relative_position_bias_table.shape[1] == 1
    assert small.features[1][0].mlp[0].out_features == 32
    # the pruned class is made on first use; one class under its public name, so a whole
    # pickled model comes back as it was
    assert type(attn) is ap.PrunedShiftedWindowAttention
    again = pickle.loads(pickle.dumps(small))
    assert type(again.features[1][1].attn) is ap.PrunedShiftedWindowAttention
    y = torch.randn(1, 3, 32, 32)
    assert torch.equal(again(y), small(y))


def test_pruned_swin_window_attention_equals_torchvision_on_full_heads():
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    torch.manual_seed(0)
    for shift in ([0, 0], [2, 2]):
        m = ShiftedWindowAttention(16, [4, 4], shift, num_heads=4).eval()
        with torch.no_grad():
            m.relative_position_bias_table.normal_()
        x = torch.randn(2, 10, 7, 16)  # not whole windows: padding
        with torch.no_grad():
            assert _rel(attention_mod._window_attention(m, x), m(x)) <= 1e-5


@pytest.mark.parametrize("name", ["regnet_x_400mf", "resnext50_32x4d", "convnext_tiny"])
def test_grouped_and_layernorm_cnns_compact_exactly(name):
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=5).eval()
    x = torch.randn(1, 3, 32, 32)
    groups = ap.channel_groups(model, x, 0.5)
    _project(model, groups)
    small, report = ap.compact(model, x)
    assert sum(report.removed.values()) > 0 and report.params_after < report.params_before
    other = torch.randn(2, 3, 32, 32)
    assert _rel(_out(small, other), _out(model, other)) <= 1e-5
    if name == "convnext_tiny":  # stage widths are LayerNorm'd: never offered as groups
        assert all("block.3" in g.name for g in groups)


def test_shufflenet_is_refused_clearly_and_still_compacts_unchanged():
    import torchvision

    model = torchvision.models.shufflenet_v2_x0_5(num_classes=5).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"Torch-Pruning could not .*ShuffleNetV2"):
        ap.channel_groups(model, x, 0.5)
    _, report = ap.compact(model, x)  # e.g. after unstructured pruning: nothing removed
    assert "<model>" in report.skipped and report.params_after == report.params_before


# the safety net, training-time ADMM --------------------------------------------------------------
def test_a_wrong_head_removal_is_caught_by_the_safety_net(monkeypatch):
    layer = nn.TransformerEncoderLayer(32, 4, 48, dropout=0.0, batch_first=True)
    model = reinit(nn.Sequential(nn.TransformerEncoder(layer, 1), nn.Linear(32, 5)))
    monkeypatch.setattr(heads_mod, "_zero_units", lambda a: [0])  # head 0 is not zero
    with pytest.raises(CompactionError, match=r"self_attn \(heads\)"):
        ap.compact(model, torch.randn(2, 6, 32))


def test_admm_with_head_groups_reaches_the_head_count_through_retraining():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=48,
        num_classes=5,
    )  # fmt: skip
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 5, (16,))
    groups = ap.head_groups(model, 0.5)
    admm = ap.ADMM(model, {}, groups=groups, rho=0.05, mode="grad")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def step():
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(4):
        step()
        admm.update()
    masks = admm.prune()
    masks.attach(opt)
    for _ in range(3):  # masked retraining never regrows a head
        step()
    small, report = ap.compact(model.eval(), x[:2])
    assert report.heads_removed == {
        "encoder.layers.encoder_layer_0.self_attention": 2,
        "encoder.layers.encoder_layer_1.self_attention": 2,
    }
    assert all(blk.self_attention.num_heads == 2 for blk in small.encoder.layers)


def test_conv1d_is_selectable_by_type_and_filters_prune_its_outputs(tmp_path):
    tr = _hf("gpt2")
    model = tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    targets = ap.select(model, {"type:Conv1D": ap.Filters(0.5)})
    assert {t.name for t in targets} == {
        f"transformer.h.0.{m}.weight"
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    ap.prune(model, {"*mlp.c_fc": ap.Filters(0.5)})
    W = model.transformer.h[0].mlp.c_fc.weight  # [in=16, out=64]
    assert int(W.abs().sum(0).ne(0).sum()) == 32  # half the outputs (columns) are zero
    assert int(W.abs().sum(1).ne(0).sum()) == 16  # every input is still read
    # stored sparse in the packed file, and read back exactly
    ap.prune(model, {"type:Conv1D": ap.Unstructured(0.1)})
    conv1d = sum(m.weight.numel() * 4 for m in model.modules() if type(m).__name__ == "Conv1D")
    embeddings = sum(p.numel() * 4 for p in model.state_dict().values()) - conv1d
    size = ap.export_compressed(model, tmp_path / "m.admmprune")
    assert size - embeddings < conv1d / 3
    back = ap.load_compressed(tmp_path / "m.admmprune", type(model)(model.config))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 back.state_dict().values()))  # fmt: skip
