"""The README's own-loop example runs as written and does what it claims."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_starts_with_two_setup_commands():
    text = README.read_text()
    first = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1).strip().splitlines()
    assert len(first) == 2
    assert first[1].startswith("make test")


def test_own_loop_example_runs_and_prunes(capsys):
    code = readme_python_blocks()[0]
    ns: dict = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), ns)
    model, masks = ns["model"], ns["masks"]
    assert (model[0].weight != 0).float().mean() <= 0.05 + 1e-9
    assert (model[2].weight != 0).float().mean() <= 0.2 + 1e-9
    rows = (model[0].weight.abs().sum(1) > 0).sum().item()
    assert rows <= 64  # Filters(keep=0.25) of 256
    assert ns["accuracy"]() >= ns["dense"] - 0.02
    assert "fewer weights" in capsys.readouterr().out
    assert set(masks) == {"0.weight", "2.weight"}


def test_structured_example_runs_and_compacts_exactly(capsys):
    code = readme_python_blocks()[1]
    ns: dict = {"__name__": "readme_structured"}
    exec(compile(code, str(README), "exec"), ns)
    import torch

    assert ns["report"].total_not_removable == 0
    assert ns["report"].params_after < 0.35 * ns["report"].params_before
    x = ns["torch"].randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ns["model"](x) - ns["small"](x)).abs().max() <= 1e-5
    out = capsys.readouterr().out
    assert "channels removed" in out
    r = ns["report"]
    assert f"{r.macs_before:,} → {r.macs_after:,} MACs" in out and r.mac_reduction > 2


def test_oneshot_example_runs_and_prunes_two_of_four(capsys):
    code = next(b for b in readme_python_blocks() if "ap.oneshot(" in b)
    ns: dict = {"__name__": "readme_oneshot"}
    exec(compile(code, str(README), "exec"), ns)
    model = ns["model"]
    for layer in (model[0], model[2]):
        assert int(layer.weight.detach().reshape(-1, 4).ne(0).sum(1).max()) == 2
    assert "one-shot admm: 2 layers from 512 calibration samples" in capsys.readouterr().out


def test_transformer_heads_example_runs_and_removes_kv_heads(capsys):
    import pytest

    pytest.importorskip("transformers", reason="needs the [hf] extra")
    code = next(b for b in readme_python_blocks() if "ap.head_groups(" in b)
    ns: dict = {"__name__": "readme_heads"}
    exec(compile(code, str(README), "exec"), ns)
    import torch

    r = ns["report"]
    assert r.heads_removed == {f"model.layers.{i}.self_attn": 1 for i in range(2)}
    assert sum(r.removed.values()) == 2 * 64  # half of each layer's 128 MLP neurons
    x = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        a, b = ns["model"](x).logits, ns["small"](x).logits
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert "MLP neurons removed" in capsys.readouterr().out


def test_every_whole_recipe_in_the_readme_validates():
    import yaml

    from admmprune.run.parse import parse_recipe

    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)
    recipes = [b for b in blocks if re.search(r"^model:", b, flags=re.M)]
    assert recipes  # the LM training recipe at least
    for block in recipes:
        parse_recipe(yaml.safe_load(block))
