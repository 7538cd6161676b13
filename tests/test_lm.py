"""Language models: one-shot pruning of Hugging Face causal LMs block by block, perplexity, and
the 2:4 sparse-kernel conversion (refused without CUDA)."""

import math

import pytest
import torch
from torch import nn

import admmprune as ap
from admmprune.deployment.sparse import semi_structured_reason, to_semi_structured
from admmprune.run.evaluate import perplexity
from admmprune.sets.constraints import keep_count
from tiny_models import reinit


def _transformers():
    return pytest.importorskip("transformers", reason="needs the [hf] extra")


def tiny(kind: str):
    tr = _transformers()
    if kind == "llama":
        cfg = tr.LlamaConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64,
        )  # fmt: skip
        return tr.LlamaForCausalLM(cfg)
    if kind == "opt":
        cfg = tr.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32)  # fmt: skip
        return tr.OPTForCausalLM(cfg)
    cfg = tr.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return tr.GPT2LMHeadModel(cfg)


def calibration(n=4, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 64, (2, seq), generator=g) for _ in range(n)]
    return [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids]


def _reinit(model):
    return reinit(model, seed=1)


@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2"])
def test_oneshot_prunes_the_blocks_only_and_survives_save_pretrained(kind, tmp_path):
    tr = _transformers()
    model = _reinit(tiny(kind))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = ap.oneshot(model, ap.Unstructured(0.5, per_row=True), calibration(), solver="admm")
    assert masks.report.by_layer in ("model.layers", "model.decoder.layers", "transformer.h")
    assert masks.report.activation_bytes_peak > 0
    params = dict(model.named_parameters())
    for name, M in masks.items():
        W = params[name]
        assert torch.equal(W.ne(0), M)
        rows = W.T if kind == "gpt2" else W  # Conv1D: [in, out]; per_row = per output
        assert rows.ne(0).sum(1).eq(rows.shape[1] // 2).all()
    for name, p in params.items():  # embeddings, norms, lm_head: untouched
        if name not in masks:
            assert torch.equal(p, before[name]), name
    assert not any("emb" in n or "wte" in n or "wpe" in n or "lm_head" in n for n in masks)
    x = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        logits = model(x).logits
    model.save_pretrained(tmp_path / "pruned")
    back = type(model).from_pretrained(tmp_path / "pruned").eval()
    back_params = dict(back.named_parameters())
    for name, M in masks.items():
        assert torch.equal(back_params[name].ne(0), M)
    with torch.no_grad():
        assert torch.allclose(back(x).logits, logits, atol=1e-5)
    assert isinstance(back, tr.PreTrainedModel)


def test_block_by_block_equals_the_whole_model_sequential_pass():
    a = _reinit(tiny("llama"))
    b = _reinit(tiny("llama"))
    spec = ap.Unstructured(0.5, per_row=True)
    ma = ap.oneshot(a, spec, calibration(), solver="sparsegpt")
    mb = ap.oneshot(b, spec, calibration(), solver="sparsegpt", by_layer=False)
    assert ma.report.by_layer == "model.layers" and mb.report.by_layer is None
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for name in ma:
        assert torch.equal(ma[name], mb[name]), name
        assert torch.allclose(pa[name], pb[name], rtol=1e-4, atol=1e-6), name


def test_sequential_by_layer_calibrates_a_layer_from_one_dense_pass():
    """llm-compressor's protocol: layer 0 as in the parallel mode (nothing before it is pruned),
    layer 1 as the parallel mode on the model whose layer 0 is already pruned."""
    spec = ap.Unstructured(0.5, per_row=True)
    models = {mode: _reinit(tiny("llama")) for mode in (True, "layers", False)}
    masks = {mode: ap.oneshot(m, spec, calibration(), solver="wanda", sequential=mode)
             for mode, m in models.items()}  # fmt: skip
    layer0 = [n for n in masks["layers"] if ".layers.0." in n]
    layer1 = [n for n in masks["layers"] if ".layers.1." in n]
    assert all(torch.equal(masks["layers"][n], masks[False][n]) for n in layer0)
    # o_proj reads the pruned attention in the fully sequential mode: its mask differs there
    o_proj = "model.layers.0.self_attn.o_proj.weight"
    assert not torch.equal(masks[True][o_proj], masks["layers"][o_proj])
    assert not all(torch.equal(masks["layers"][n], masks[False][n]) for n in layer1)
    ref = _reinit(tiny("llama"))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n in layer0:
                p.copy_(dict(models["layers"].named_parameters())[n])
    again = ap.oneshot(ref, {n.removesuffix(".weight"): spec for n in layer1}, calibration(),
                       solver="wanda", sequential=False)  # fmt: skip
    assert all(torch.equal(again[n], masks["layers"][n]) for n in layer1)
    assert "sequential by layer" in masks["layers"].report.summary()
    with pytest.raises(ValueError, match="sequential='layers' needs every constrained layer"):
        ap.oneshot(nn.Sequential(nn.Linear(4, 4)), {"0": spec}, torch.randn(8, 4),
                   sequential="layers")  # fmt: skip
    with pytest.raises(ValueError, match="use True, 'layers' or False"):
        ap.oneshot(_reinit(tiny("llama")), spec, calibration(), sequential="blocks")


@pytest.mark.parametrize("by_layer", [None, False])
def test_dense_target_on_a_causal_lm_keeps_its_output_closer_to_the_dense_one(by_layer):
    dense = _reinit(tiny("llama")).eval()
    spec = ap.Unstructured(0.3, per_row=True)
    x = calibration(n=1, seed=5)[0]
    with torch.no_grad():
        ref = dense(**x).logits
    errors = {}
    for target in (False, True):
        model = _reinit(tiny("llama"))
        masks = ap.oneshot(model, spec, calibration(), dense_target=target, by_layer=by_layer)
        assert (masks.report.by_layer is None) == (by_layer is False)
        assert all(float(m.float().mean()) == pytest.approx(0.3, abs=0.02) for m in masks.values())
        with torch.no_grad():
            errors[target] = float((model.eval()(**x).logits - ref).pow(2).mean())
    assert errors[True] < errors[False]


def test_two_four_on_a_causal_lm_and_the_kernel_rules():
    model = _reinit(tiny("llama"))
    ap.oneshot(model, ap.NM(2, 4), calibration(), solver="sparsegpt")
    W = model.model.layers[0].mlp.up_proj.weight  # [64, 32]
    assert int(W.reshape(64, -1, 4).ne(0).sum(-1).max()) == 2
    assert "dtype" in semi_structured_reason(W)
    assert "shape 64x32" in semi_structured_reason(W.half())  # inputs must be a multiple of 64
    big = torch.randn(64, 128).half()
    assert semi_structured_reason(big) == "not 2:4 sparse (prune it with NM(2, 4) first)"
    big.view(64, 32, 4)[..., 2:] = 0
    assert semi_structured_reason(big) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_to_semi_structured_refuses_clearly_without_cuda():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        to_semi_structured(nn.Linear(64, 32))


def test_a_one_layer_model_is_a_list_of_one_block():
    tr = _transformers()
    cfg = tr.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=4, intermediate_size=64)  # fmt: skip
    model = _reinit(tr.LlamaForCausalLM(cfg))
    masks = ap.oneshot(model, ap.Unstructured(0.5), calibration(n=2), solver="magnitude")
    assert masks.report.by_layer == "model.layers"
    assert len(masks) == 7 and all(n.startswith("model.layers.0.") for n in masks)


def test_a_single_constraint_needs_a_list_of_blocks():
    with pytest.raises(ValueError, match="no list of identical blocks"):
        ap.oneshot(nn.Sequential(nn.Linear(4, 4)), ap.Unstructured(0.5), torch.randn(8, 4))


# perplexity ----------------------------------------------------------------------------------
class Uniform(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.p = vocab, nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.vocab) + self.p


class Bigram(nn.Module):
    """logits[t] depends only on ids[t]: every scored token's probability is hand-computable."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, ids):
        return self.table[ids]


def test_perplexity_of_uniform_logits_is_the_vocabulary_size():
    tokens = torch.randint(0, 37, (1000,))
    assert perplexity(Uniform(37), tokens, seq_len=64) == pytest.approx(37, rel=1e-6)
    assert perplexity(Uniform(37), tokens, seq_len=64, stride=16) == pytest.approx(37, rel=1e-6)


def test_perplexity_scores_each_token_once_by_the_stated_protocol():
    torch.manual_seed(0)
    table = torch.randn(11, 11)
    tokens = torch.randint(0, 11, (103,))
    logp = table.log_softmax(-1)

    def nll(i):  # token i predicted from token i-1
        return -float(logp[tokens[i - 1], tokens[i]])

    L = 10  # non-overlapping: windows [0,10), [10,20), …; the tail of 3 dropped
    expect = [nll(i) for s in range(0, 100, L) for i in range(s + 1, s + L)]
    assert perplexity(Bigram(table), tokens, L) == pytest.approx(
        math.exp(sum(expect) / len(expect)), rel=1e-6
    )
    # stride 4: the first window scores 9 tokens, every later window its last 4
    starts = list(range(0, 103 - L + 1, 4))
    expect = [nll(i) for i in range(1, L)]
    expect += [nll(i) for s in starts[1:] for i in range(s + L - 4, s + L)]
    assert perplexity(Bigram(table), tokens, L, stride=4, batch_size=3) == pytest.approx(
        math.exp(sum(expect) / len(expect)), rel=1e-6
    )


def test_perplexity_bad_input_is_named():
    with pytest.raises(ValueError, match="fewer than seq_len=64"):
        perplexity(Uniform(5), torch.randint(0, 5, (10,)), 64)
    with pytest.raises(ValueError, match="1-D tensor of token ids"):
        perplexity(Uniform(5), torch.randn(100), 8)
    with pytest.raises(ValueError, match="stride <= seq_len"):
        perplexity(Uniform(5), torch.randint(0, 5, (100,)), 8, stride=9)


# a text recipe end to end ------------------------------------------------------------------------
WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "ran",
    "far",
    "and",
    "then",
    "slept",
    "by",
    "tree",
    "under",
    "sun",
    "moon",
]


def corpus(path, sentences=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(sentences):
        idx = torch.randint(0, len(WORDS), (int(torch.randint(4, 10, (1,), generator=g)),),
                            generator=g)  # fmt: skip
        lines.append(" ".join(WORDS[i] for i in idx) + ".")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def tokenizer_file(path, text_file):
    pytest.importorskip("tokenizers", reason="needs the [hf] extra")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train([str(text_file)], trainers.BpeTrainer(vocab_size=80, special_tokens=["[UNK]"]))
    tok.save(str(path))
    return path, tok.get_vocab_size()


def lm_dir(path, vocab, kind: str = "Llama", **extra):
    tr = _transformers()
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    cfg = getattr(tr, f"{kind}Config")(vocab_size=vocab, **sizes, **extra)
    torch.manual_seed(0)
    getattr(tr, f"{kind}ForCausalLM")(cfg).save_pretrained(path)
    return path


def lm_recipe(tmp_path, **data):
    text = corpus(tmp_path / "corpus.txt")
    tok, vocab = tokenizer_file(tmp_path / "tokenizer.json", text)
    model = lm_dir(tmp_path / "llama", vocab)
    return {
        "seed": 0,
        "output_dir": str(tmp_path / "run"),
        "device": "cpu",
        "progress": False,
        "model": {"hf": str(model)},
        "data": {"name": "text", "path": str(text), "tokenizer": str(tok), "seq_len": 32} | data,
        "method": "oneshot",
        "oneshot": {"solver": "admm", "samples": 16, "batch_size": 8},
        "default_constraint": {"unstructured": 0.5, "per_row": True},
    }


def _write(path, recipe):
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_text_recipe_prunes_measures_perplexity_and_saves_pretrained(tmp_path):
    import json

    from admmprune.run.cli import main

    tr = _transformers()
    recipe = lm_recipe(tmp_path)
    assert main(["run", _write(tmp_path / "r.yaml", recipe)]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["layers"] == 14  # 7 Linear per decoder layer, embeddings / lm_head untouched
    assert summary["kept_fraction"] == pytest.approx(0.5)
    assert summary["perplexity_dense"] > 1 and summary["perplexity_pruned"] > 1
    assert summary["oneshot"]["by_layer"] == "model.layers"
    back = tr.AutoModelForCausalLM.from_pretrained(run / "model")
    W = back.model.layers[1].mlp.down_proj.weight
    assert W.ne(0).sum(1).eq(W.shape[1] // 2).all()  # the zeros survive save_pretrained
    assert (run / "model" / "model.safetensors").is_file() and (run / "model.admmprune").is_file()
    # the tokenizer travels with the model; the perplexity is reproducible from the files
    tokenizer = tr.AutoTokenizer.from_pretrained(run / "model")
    ids = torch.tensor(tokenizer((tmp_path / "corpus.txt").read_text())["input_ids"])
    test = ids[ids.numel() - int(ids.numel() * 0.1) :]
    assert perplexity(back, test, 32) == pytest.approx(summary["perplexity_pruned"], rel=1e-5)
    # the sparse checkpoint beside it: smaller, the same model; `export --sparse` writes one too
    sparse = ap.load_sparse(run / "model-sparse")
    assert all(torch.equal(t, back.state_dict()[n]) for n, t in sparse.state_dict().items())
    assert summary["sparse_checkpoint_bytes"] < (run / "model" / "model.safetensors").stat().st_size
    assert main(["export", str(run), "--out", str(tmp_path / "p.bin"), "--sparse",
                 str(tmp_path / "again")]) == 0  # fmt: skip
    again = tmp_path / "again" / "model-sparse.safetensors"
    assert again.read_bytes() == (run / "model-sparse" / "model-sparse.safetensors").read_bytes()
    assert main(["export", str(run), "--out", str(tmp_path / "p.bin"), "--sparse",
                 str(tmp_path / "again")]) == 2  # fmt: skip


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": {"hf": "nowhere"}}, "not a save_pretrained directory"),
        ({"data": {"seq_len": 2000}}, "needs at least data.seq_len=2000"),
        ({"vocab": 10}, "do not belong together"),
        ({"method": "ssauto"}, "method: ssauto are for image models"),
        ({"drop_hf": True}, "needs both model.hf"),
        ({"constraints": {"model.embed_tokens": {"unstructured": 0.5}}}, "is a Embedding"),
        (
            {"constraints": {"model.layers.*.mlp.up_proj": {"filters": 0.5}}},
            "Filters removes output rows",
        ),
    ],
)
def test_text_recipe_bad_input_is_named_and_writes_nothing(tmp_path, capsys, change, message):
    from admmprune.run.cli import main

    recipe = lm_recipe(tmp_path)
    if "vocab" in change:
        lm_dir(tmp_path / "small", change["vocab"])
        recipe["model"] = {"hf": str(tmp_path / "small")}
    elif "drop_hf" in change:
        recipe["model"] = {"name": "lenet5"}
    elif "data" in change:
        recipe["data"] |= change["data"]
    else:
        recipe |= change
    assert main(["run", _write(tmp_path / "r.yaml", recipe)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_text_recipe_constraints_and_default_share_the_blocks(tmp_path):
    import json

    from admmprune.run.cli import main

    recipe = lm_recipe(tmp_path, seq_len=16)
    recipe["constraints"] = {"model.layers.0.mlp.*": {"nm": "2:4"}}
    recipe["oneshot"] = {"solver": "sparsegpt", "samples": 8, "batch_size": 8}
    assert main(["run", _write(tmp_path / "r.yaml", recipe)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["layers"] == 14  # 3 by the 2:4 key, 11 by the default; no embedding
    tr = _transformers()
    back = tr.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    W = back.model.layers[0].mlp.up_proj.weight
    assert int(W.reshape(W.shape[0], -1, 4).ne(0).sum(-1).max()) == 2
    W = back.model.layers[1].mlp.up_proj.weight
    assert W.ne(0).sum(1).eq(W.shape[1] // 2).all()  # the default, per row


def test_text_recipe_prunes_every_expert_and_reports_each(tmp_path):
    import json

    from admmprune.run.cli import main

    tr = _transformers()
    recipe = lm_recipe(tmp_path)
    text = tmp_path / "corpus.txt"
    _, vocab = tokenizer_file(tmp_path / "tokenizer.json", text)
    moe = lm_dir(tmp_path / "mixtral", vocab, "Mixtral", num_local_experts=4,
                 num_experts_per_tok=2, num_key_value_heads=2)  # fmt: skip
    recipe["model"] = {"hf": str(moe)}
    recipe["oneshot"] = {"solver": "sparsegpt", "samples": 16, "batch_size": 8,
                         "min_expert_tokens": 100}  # fmt: skip
    assert main(["run", _write(tmp_path / "r.yaml", recipe)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["layers"] == 12  # q, k, v, o and the two fused expert weights, per layer
    assert summary["kept_fraction"] == pytest.approx(0.5)
    layers = summary["oneshot"]["layers"]
    experts = {n: r for n, r in layers.items() if ".experts." in n}
    assert len(experts) == 2 * 2 * 4  # two weights, two layers, four experts: each reported
    for name, r in experts.items():
        assert r["solver"] == ("magnitude" if r["rows"] < 100 else "sparsegpt"), name
    assert summary["oneshot"]["fallbacks"] == {
        n: r["rows"] for n, r in experts.items() if r["rows"] < 100
    }
    back = tr.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    W = back.model.layers[1].mlp.experts.down_proj
    for e in range(4):
        assert W[e].ne(0).sum(1).eq(W.shape[2] // 2).all()  # per row of every expert


def test_admm_in_a_plain_hf_training_loop_from_the_one_shot_solution():
    # the README's own-loop example: one-shot start, objective-aware ADMM with bf16 state
    torch.manual_seed(0)
    llm = _reinit(tiny("llama"))
    batches = calibration(n=6, seq=16)
    spec = {"model.layers.*": ap.Unstructured(0.25, per_row=True)}
    start = ap.oneshot(llm, spec, batches[:2])
    opt = torch.optim.AdamW(llm.parameters(), lr=1e-3, betas=(0.9, 0.95))
    admm = ap.ADMM(llm, spec, init=start, rho=0.01, rho_growth=1.5, metric=opt,
                   state_dtype="bfloat16", mode="grad")  # fmt: skip
    n = sum(t.param.numel() for t in admm.targets)
    assert admm.state_bytes() < 2.7 * n  # bf16 U + Z as bitmask and 25 % bf16 values: 2.625
    for step in range(12):
        batch = batches[step % len(batches)]
        loss = llm(**batch, labels=batch["input_ids"]).loss  # the model's own loss, unchanged
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if (step + 1) % 4 == 0:
            admm.update()
    masks = admm.prune()
    masks.attach(opt)  # masked fine-tuning keeps every zero
    batch = batches[0]
    llm(**batch, labels=batch["input_ids"]).loss.backward()
    opt.step()
    for name, m in masks.items():
        W = llm.get_parameter(name)
        assert int((W != 0).sum(dim=1).max()) <= keep_count(0.25, W.shape[1]), name  # per row
        assert not bool(W[~m].any()), name
    assert math.isfinite(perplexity(llm, torch.randint(0, 64, (64,)), seq_len=16))
