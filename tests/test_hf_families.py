"""Heads and channels on transformers' attention families: exact removal where the layout is
known (fused QKV included), a refusal naming the reason where it is not, never channels inside
attention no adapter understands. Tiny configs, weights re-initialised so outputs depend on the
input; a family the installed transformers lacks is skipped with its reason."""

import copy

import pytest
import torch
from torch import nn

import admmprune as ap
from admmprune.structure.compact import compact
from tiny_models import reinit

tf = pytest.importorskip("transformers", reason="needs the [hf] extra")

_C = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
          num_attention_heads=4)  # fmt: skip
_ENC_DEC = dict(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                decoder_ffn_dim=48, max_position_embeddings=64,
                decoder_start_token_id=2)  # fmt: skip
_FALCON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
FAMILIES = {  # name: (config class, model class, config kwargs)
    "GPTNeoX": ("GPTNeoXConfig", "GPTNeoXForCausalLM", _C),  # query_key_value, per head
    "Phi": ("PhiConfig", "PhiForCausalLM", _C),  # dense output, partial rotary
    "Phi3": ("Phi3Config", "Phi3ForCausalLM", {**_C, "num_key_value_heads": 2,
                                               "pad_token_id": 0}),  # qkv_proj, GQA
    "DistilBert": ("DistilBertConfig", "DistilBertForMaskedLM",
                   dict(vocab_size=64, dim=32, hidden_dim=48, n_layers=2, n_heads=4)),
    "Bart": ("BartConfig", "BartForConditionalGeneration", _ENC_DEC),  # self + cross
    # ALiBi slopes made outside the layer, per head
    "Bloom": ("BloomConfig", "BloomForCausalLM", dict(vocab_size=64, hidden_size=32, n_layer=2,
              n_head=4)),
    # Falcon: multi-query (the default), grouped (new_decoder_architecture), per head + ALiBi
    "Falcon": ("FalconConfig", "FalconForCausalLM", _FALCON),
    "FalconGrouped": ("FalconConfig", "FalconForCausalLM", {**_FALCON, "num_kv_heads": 2,
                      "new_decoder_architecture": True}),
    "FalconAlibi": ("FalconConfig", "FalconForCausalLM", {**_FALCON, "multi_query": False,
                    "alibi": True}),
    # attention sinks: one learned logit per head, removed with its head
    "GptOss": ("GptOssConfig", "GptOssForCausalLM", {**_C, "num_key_value_heads": 2,
               "num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 8}),
    # relative position bias made by each stack's first layer, shared by all; self + cross
    "T5": ("T5Config", "T5ForConditionalGeneration", dict(vocab_size=64, d_model=32, d_kv=8,
           d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4, decoder_start_token_id=0)),
}  # fmt: skip
REFUSED = {  # name: (config class, model class, kwargs, the reason head_groups names)
    "Olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {**_C, "num_key_value_heads": 2,
              "pad_token_id": 0}, "normalise the whole projection"),
    "DeepseekV3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", {**_C, "n_routed_experts": 4,
                   "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                   "first_k_dense_replace": 2, "kv_lora_rank": 8, "q_lora_rank": 8,
                   "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8,
                   "n_group": 1, "topk_group": 1}, "latent attention"),
}  # fmt: skip


def _build(cfg_name: str, model_name: str, kwargs: dict) -> nn.Module:
    cfg_cls, model_cls = getattr(tf, cfg_name, None), getattr(tf, model_name, None)
    if cfg_cls is None or model_cls is None:
        pytest.skip(f"the installed transformers {tf.__version__} has no {model_name}")
    return reinit(model_cls(cfg_cls(**kwargs)))


def _inputs(model: nn.Module, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = {"input_ids": torch.randint(3, 64, (batch, 8), generator=g)}
    if model.config.is_encoder_decoder:
        x["decoder_input_ids"] = torch.randint(3, 64, (batch, 5), generator=g)
    return x


@pytest.mark.parametrize("family", list(FAMILIES))
def test_heads_and_channels_removed_exactly(family):
    model = _build(*FAMILIES[family])
    x = _inputs(model, 1, 0)
    heads = ap.head_groups(model, keep=0.5)
    channels = ap.channel_groups(model, x, keep=0.5)
    qkv = ("query_key_value", "qkv_proj", "q_proj", "k_proj", "v_proj", "q_lin", "k_lin", "v_lin")
    members = [p for g in channels for p, _ in g.members]
    assert members and not any(f".{n}." in p for p in members for n in qkv)
    ap.ADMM(model, {}, groups=heads + channels, rho=1e-2).prune()
    small, report = compact(model, x)
    removed = report.params_before - report.params_after
    head_params = sum(len(idx) for g in heads for _, units in g.members for idx in units)
    assert removed >= head_params // 2  # the zeroed heads are gone, not just masked
    y = _inputs(model, 2, 1)
    with torch.no_grad():
        assert torch.allclose(model(**y).logits, small(**y).logits, atol=1e-4)
    if hasattr(model, "generate") and model.config.model_type != "distilbert":
        a = model.generate(**_inputs(model, 1, 2), max_new_tokens=4, do_sample=False)
        b = small.generate(**_inputs(model, 1, 2), max_new_tokens=4, do_sample=False)
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", list(REFUSED))
def test_heads_refused_by_name_and_channels_kept_out_of_attention(family):
    *spec, reason = REFUSED[family]
    model = _build(*spec)
    with pytest.raises(ValueError, match=reason):
        ap.head_groups(model, keep=0.5)
    x = _inputs(model, 1, 0)
    try:
        channels = ap.channel_groups(model, x, keep=0.5)
    except ValueError as e:  # nothing to offer, or no trace (DeepSeek-V3): clear refusals too
        assert "no channel group" in str(e) or "could not trace" in str(e)
        return
    attention = [n for n, m in model.named_modules() if "Attention" in type(m).__name__]
    members = [p for g in channels for p, _ in g.members]
    assert not any(p.startswith(f"{a}.") for p in members for a in attention)
    ap.ADMM(model, {}, groups=channels, rho=1e-2).prune()
    small, _ = compact(model, x)
    y = _inputs(model, 2, 1)
    with torch.no_grad():
        assert torch.allclose(model(**y).logits, small(**y).logits, atol=1e-4)


def test_qwen2_moe_compacts_with_its_shared_expert_gate():
    """Its 1-output shared-expert gate, broadcast over the hidden width, was traced as a
    coupling of 32 channels: compact raised IndexError even with nothing pruned."""
    kwargs = {**_C, "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
              "moe_intermediate_size": 16, "shared_expert_intermediate_size": 24}  # fmt: skip
    model = _build("Qwen2MoeConfig", "Qwen2MoeForCausalLM", kwargs)
    x = _inputs(model, 1, 0)
    small, report = compact(model, x)
    assert report.params_after == report.params_before
    groups = ap.channel_groups(model, x, keep=0.5, layers="*shared_expert.*")
    ap.ADMM(model, {}, groups=groups, rho=1e-2).prune()
    small, report = compact(model, x)
    assert small.model.layers[0].mlp.shared_expert.up_proj.out_features == 12
    y = _inputs(model, 2, 1)
    with torch.no_grad():
        assert torch.allclose(model(**y).logits, small(**y).logits, atol=1e-4)


@pytest.mark.parametrize("family", ["Bloom", "FalconAlibi", "T5"])
def test_bias_made_outside_follows_heads_removed_twice_and_copies(family):
    """ALiBi / T5's position bias is made for all heads outside the layer: a layer compacted
    twice reads its kept heads' slices (original indices), in a deep copy too."""
    model = _build(*FAMILIES[family])
    x = _inputs(model, 1, 0)
    ap.ADMM(model, {}, groups=ap.head_groups(model, keep=0.75), rho=1e-2).prune()
    once, report = compact(model, x)
    assert set(report.heads_removed.values()) == {1}
    ap.ADMM(once, {}, groups=ap.head_groups(once, keep=0.67), rho=1e-2).prune()
    twice, report = compact(once, x)  # raises unless its outputs equal the masked model's
    assert set(report.heads_removed.values()) == {1}
    kept = [getattr(m, "_admmprune_kept_heads", None) for m in twice.modules()]
    assert any(k is not None and len(k) == 2 and k != [0, 1] for k in kept)
    y = _inputs(model, 2, 1)
    with torch.no_grad():
        expected = once(**y).logits
        assert torch.allclose(twice(**y).logits, expected, atol=1e-4)
        assert torch.allclose(copy.deepcopy(twice)(**y).logits, expected, atol=1e-4)
