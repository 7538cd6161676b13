"""Mixture-of-experts models and encoder–decoders: every block's GEMM weights are pruned.

Tiny configs of transformers' families, weights re-initialised so that outputs depend on the
input; each family is skipped, with its reason, where the installed transformers lacks it."""

import copy

import pytest
import torch
from torch import nn

import admmprune as ap
from admmprune.deployment.storage import storage
from tiny_models import reinit

tf = pytest.importorskip("transformers", reason="needs the [hf] extra")

_COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
FAMILIES = {
    "Mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "Qwen2Moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
    ),
    "Qwen3Moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    "Olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "DeepseekV3": dict(
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        kv_lora_rank=8,
        q_lora_rank=8,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        n_group=1,
        topk_group=1,
    ),
    # experts stored [E, in, out] and run as x @ W[e] (transposed), with biases
    "GptOss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8),
}


def _lm(family: str, **extra) -> nn.Module:
    cfg_cls = getattr(tf, f"{family}Config", None)
    model_cls = getattr(tf, f"{family}ForCausalLM", None)
    if cfg_cls is None or model_cls is None:
        pytest.skip(f"the installed transformers {tf.__version__} has no {family}")
    return reinit(model_cls(cfg_cls(**{**_COMMON, **FAMILIES[family], **extra})))


def _calibration(n: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (2, 16), generator=g)} for _ in range(n)]


def _routers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights that score experts (router rows and shared-expert gates) by name."""
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if n.endswith(("gate.weight", "router.weight", "shared_expert_gate.weight"))
    }


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("solver", ["admm", "sparsegpt", "wanda"])
def test_oneshot_prunes_every_expert_of_every_block(family, solver):
    model = _lm(family)
    untouched = {
        "embed": model.get_input_embeddings().weight.detach().clone(),
        "head": model.get_output_embeddings().weight.detach().clone(),
        **_routers(model),
    }
    assert len(untouched) > 2  # the family has routers to check
    masks = ap.oneshot(model, ap.Unstructured(0.5), _calibration(), solver=solver)
    report = masks.report
    assert report.block_lists == ["model.layers"]
    params = dict(model.named_parameters())
    fused = [n for n, p in params.items() if p.ndim == 3]
    assert fused and all(n in masks for n in fused)
    for n in fused:  # each expert is its own layer: exactly half of each expert's weights
        W = params[n]
        for e in range(W.shape[0]):
            assert int((W[e] != 0).sum()) == W[e].numel() // 2, (n, e)
            assert int(masks[n][e].sum()) == W[e].numel() // 2
            assert f"{n}[{e}]" in report.layers
    # ≥ 99 % of the blocks' GEMM weights constrained: all but the routers, which score experts
    gemm = {n: p for n, p in params.items() if n.startswith("model.layers.") and p.ndim >= 2
            and n not in untouched and "bias" not in n}  # fmt: skip
    constrained = sum(p.numel() for n, p in gemm.items() if n in masks)
    assert constrained / sum(p.numel() for p in gemm.values()) >= 0.99
    now = dict(model.named_parameters())
    for n, before in untouched.items():
        key = {"embed": None, "head": None}.get(n, n)
        after = (
            model.get_input_embeddings().weight
            if n == "embed"
            else model.get_output_embeddings().weight
            if n == "head"
            else now[key]
        )
        assert torch.equal(after, before), n
    out = model.generate(torch.randint(0, 64, (1, 4)), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("family", ["Mixtral", "GptOss"])
def test_oneshot_nm_per_expert_row(family):
    model = _lm(family)
    masks = ap.oneshot(model, ap.NM(2, 4), _calibration(), solver="sparsegpt")
    for n, p in model.named_parameters():
        if p.ndim == 3:
            gemm = p.transpose(1, 2) if family == "GptOss" else p  # rows = outputs
            groups = (gemm != 0).reshape(p.shape[0], gemm.shape[1], -1, 4).sum(-1)
            assert bool((groups == 2).all()), n
            assert n in masks


def _forced_routing(model, schedule):
    """Route every token of calibration batch ``k`` (its first token id is ``k``, see
    :func:`_routed_calibration`) to the experts ``schedule[k]`` (a pair), by replacing each
    router's output; returns the hook handles."""
    current = [None]

    def pre(_m, _args, kwargs):
        current[0] = schedule[int(kwargs["input_ids"][0, 0])]

    def route(_m, _a, out):
        logits, weights, index = out
        index = torch.tensor(current[0]).expand(index.shape[0], 2).clone()
        return logits, torch.full(index.shape, 0.5, dtype=weights.dtype), index

    handles = [model.register_forward_pre_hook(pre, with_kwargs=True)]
    handles += [layer.mlp.gate.register_forward_hook(route) for layer in model.model.layers]
    return handles


def _routed_calibration(n: int):
    cal = _calibration(n)
    for k, b in enumerate(cal):
        b["input_ids"][0, 0] = k
    return cal


def test_expert_statistics_come_from_its_routed_tokens_across_batches():
    """Expert 2 is first routed in batch 2, expert 3 never: 2 is solved from exactly its own
    tokens, 3 is pruned by magnitude; both are reported, neither is left dense."""
    model = _lm("Mixtral", num_hidden_layers=1)
    dense = copy.deepcopy(model)
    handles = _forced_routing(model, [(0, 1), (1, 2), (0, 2)])
    handles_d = _forced_routing(dense, [(0, 1), (1, 2), (0, 2)])
    # the reference: each expert's inputs straight from the dense model's experts call
    inputs: dict[int, list[torch.Tensor]] = {}

    def grab(_m, args):
        hidden, index = args[0], args[1]
        for e in range(4):
            inputs.setdefault(e, []).append(hidden[(index == e).any(-1)])

    experts_d = dense.model.layers[0].mlp.experts
    handles_d.append(experts_d.register_forward_pre_hook(grab))
    cal = _routed_calibration(3)
    with torch.no_grad():
        for b in cal:
            dense(**b)
    for h in handles_d:
        h.remove()
    masks = ap.oneshot(model, {"model.layers.0.mlp.experts.gate_up_proj": ap.Unstructured(0.5)},
                       cal, solver="sparsegpt", sequential=False)  # fmt: skip
    for h in handles:
        h.remove()
    report = masks.report
    name = "model.layers.0.mlp.experts.gate_up_proj"
    W0, W = experts_d.gate_up_proj, model.model.layers[0].mlp.experts.gate_up_proj
    for e in range(3):
        X = torch.cat(inputs[e])
        r = report.layers[f"{name}[{e}]"]
        assert r.rows == X.shape[0] > 0 and r.solver == "sparsegpt"
        err = float(((X @ (W[e] - W0[e]).T) ** 2).sum())
        assert r.error == pytest.approx(err, rel=1e-3)
    r3 = report.layers[f"{name}[3]"]
    assert r3.rows == 0 and r3.solver == "magnitude"
    assert report.fallbacks == {f"{name}[3]": 0}
    assert "magnitude" in report.summary() and f"{name}[3]" in report.summary()
    expected = ap.Unstructured(0.5).project(W0[3].detach()).Z
    assert torch.equal(W[3], expected)
    assert int((W[3] != 0).sum()) == W[3].numel() // 2


def test_min_expert_tokens_policy():
    model = _lm("Mixtral", num_hidden_layers=1)
    handles = _forced_routing(model, [(0, 1), (0, 1), (0, 2)])  # expert 2: one batch
    # by_layer=False: the routing hook reads the model's input (by_layer runs blocks alone)
    masks = ap.oneshot(model, ap.Unstructured(0.5), _routed_calibration(3), by_layer=False,
                       min_expert_tokens=33)  # fmt: skip
    for h in handles:
        h.remove()
    layers = masks.report.layers
    base = "model.layers.0.mlp.experts.down_proj"
    assert layers[f"{base}[0]"].rows == 96 and layers[f"{base}[0]"].solver == "admm"
    assert layers[f"{base}[2]"].rows == 32 and layers[f"{base}[2]"].solver == "magnitude"
    with pytest.raises(ValueError, match="min_expert_tokens"):
        ap.oneshot(model, ap.Unstructured(0.5), _calibration(1), min_expert_tokens=1.5)
    with pytest.raises(ValueError, match="min_expert_tokens"):
        ap.oneshot(model, ap.Unstructured(0.5), _calibration(1), min_expert_tokens=-1)


def test_experts_refused_where_unseen_or_with_dense_target():
    model = _lm("Mixtral", num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"routes|router"):
        ap.oneshot(model, ap.Unstructured(0.5), _calibration(1), dense_target=True)

    class Batched(nn.Module):  # computes every expert at once: no per-expert GEMM to see
        def __init__(self):
            super().__init__()
            self.num_experts = 2
            self.w = nn.Parameter(torch.randn(2, 8, 8))

        def forward(self, x):
            return torch.einsum("nd,eod->no", x, self.w)

    net = nn.Sequential(nn.Linear(8, 8), Batched())
    with pytest.raises(ValueError, match="no expert's GEMM was seen"):
        ap.oneshot(net, {"1.w": ap.Unstructured(0.5)}, [torch.randn(4, 8)])
    W = net[1].w.detach().clone()
    assert torch.equal(net[1].w, W)  # refused before anything changed


def test_encoder_decoder_prunes_both_stacks():
    if not hasattr(tf, "T5Config"):
        pytest.skip(f"the installed transformers {tf.__version__} has no T5")
    cfg = tf.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                      num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                      pad_token_id=0)  # fmt: skip
    model = reinit(tf.T5ForConditionalGeneration(cfg))
    head = model.lm_head.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    cal = [
        {"input_ids": torch.randint(1, 64, (2, 12), generator=g),
         "decoder_input_ids": torch.randint(1, 64, (2, 6), generator=g)}
        for _ in range(2)
    ]  # fmt: skip
    masks = ap.oneshot(model, ap.Unstructured(0.5), cal)
    assert masks.report.block_lists == ["encoder.block", "decoder.block"]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert len(linears) == 32 and all(f"{n}.weight" in masks for n in linears)
    assert any("EncDecAttention" in n for n in linears)  # cross-attention too
    assert torch.equal(model.lm_head.weight, head)
    assert model.generate(cal[0]["input_ids"][:1], max_new_tokens=3).shape[1] >= 2


def test_training_time_admm_accounting_and_packed_file_take_fused_experts(tmp_path):
    model = _lm("GptOss", num_hidden_layers=1)
    name = "model.layers.0.mlp.experts"
    spec = {f"{name}.gate_up_proj": ap.NM(2, 4), f"{name}.down_proj": ap.Unstructured(0.25)}
    admm = ap.ADMM(model, spec, rho=1e-2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randint(0, 64, (2, 8))
    for _ in range(2):
        loss = model(x, labels=x).loss + admm.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        admm.update()
    masks = admm.prune()
    params = dict(model.named_parameters())
    up, down = params[f"{name}.gate_up_proj"], params[f"{name}.down_proj"]
    for e in range(4):  # per expert: 2 of every 4 inputs of each output; a quarter kept
        assert bool(((up[e] != 0).reshape(-1, 4, up.shape[2]).sum(1) == 2).all())
        assert int((down[e] != 0).sum()) == down[e].numel() // 4
    assert set(masks) == set(spec)
    layers = storage(model)["layers"]
    assert layers[f"{name}.gate_up_proj"]["format"] == "nm"
    assert layers[f"{name}.down_proj"]["nnz"] == down.numel() // 4
    path = tmp_path / "m.admmprune"
    ap.export_compressed(model, path)
    back = ap.load_compressed(path, _lm("GptOss", num_hidden_layers=1))
    for (n, a), b in zip(model.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
