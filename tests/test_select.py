import pytest
import torch
from torch import nn

from admmprune import ADMM, Channels, Columns, Filters, Unstructured, select


def names(targets):
    return [t.name for t in targets]


def test_globs_match_prunable_modules_only(tiny_cnn):
    t = select(tiny_cnn, {"*": Unstructured(0.5)})
    assert names(t) == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]  # no BN
    assert [x.groups for x in t] == [1, 2, 1, 1]


def test_types_exact_names_defaults_and_none(tiny_cnn):
    t = select(
        tiny_cnn,
        {nn.Conv2d: Filters(0.5), "fc2": None, "fc1.bias": Unstructured(0.5)},
        default=Columns(0.5),
    )
    by = {x.name: x.constraint for x in t}
    assert by == {
        "conv1.weight": Filters(0.5),
        "conv2.weight": Filters(0.5),
        "fc1.weight": Columns(0.5),
        "fc1.bias": Unstructured(0.5),
    }


def test_unmatched_pattern_lists_available_layers(tiny_cnn):
    with pytest.raises(ValueError, match=r"'conv3'.*matches no prunable layer.*conv1 \(Conv2d\)"):
        select(tiny_cnn, {"conv3": Filters(0.5)})
    with pytest.raises(ValueError, match=r"'layer\*'.*Available: conv1"):
        ADMM(tiny_cnn, {"layer*": Filters(0.5)})
    with pytest.raises(ValueError, match="Linear"):
        select(nn.Sequential(nn.ReLU()), {nn.Linear: Filters(0.5)})


def test_two_keys_claiming_one_parameter(tiny_cnn):
    with pytest.raises(ValueError, match=r"'conv1.weight' is claimed by two spec keys, 'conv\*'"):
        select(tiny_cnn, {"conv*": Filters(0.5), "conv1": Unstructured(0.1)})


def test_wrong_rank_names_the_layer_and_the_fix(tiny_cnn):
    with pytest.raises(ValueError, match=r"'bn1.weight'.*at least 2 dimensions.*Unstructured"):
        select(tiny_cnn, {"bn1": Filters(0.5)})
    with pytest.raises(ValueError, match=r"'fc1.bias'.*leave 'fc1.bias' out"):
        ADMM(tiny_cnn, {"fc1.bias": Channels(0.5)})


def test_bad_spec_values(tiny_cnn):
    with pytest.raises(ValueError, match="not a constraint"):
        select(tiny_cnn, {"conv1": 0.5})
    with pytest.raises(ValueError, match="mapping"):
        select(tiny_cnn, [("conv1", Filters(0.5))])
    with pytest.raises(ValueError, match="constrains no parameter"):
        select(tiny_cnn, {"conv1": None})
    with pytest.raises(ValueError, match="module type"):
        select(tiny_cnn, {3: Filters(0.5)})


def test_grouped_conv_channels_end_to_end(tiny_cnn):
    masks = ADMM(tiny_cnn, {"conv2": Channels(0.5)}).prune()
    W = tiny_cnn.conv2.weight.detach()  # [8, 4, 3, 3], groups=2: 8 input channels
    per_channel = W.reshape(2, 4, 4, 9).abs().sum(dim=(1, 3)).flatten()
    assert int((per_channel > 0).sum()) == 4
    assert masks["conv2.weight"].shape == W.shape
    x = torch.randn(2, 3, 8, 8)
    assert tiny_cnn(x).shape == (2, 4)


def test_type_name_keys_work_in_python_as_in_recipes():
    from torch import nn

    import admmprune as ap

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    targets = ap.select(model, {"type:Linear": ap.Unstructured(0.5)})
    assert [t.name for t in targets] == ["2.weight"]
    with pytest.raises(ValueError, match="no module type 'Lineer'"):
        ap.select(model, {"type:Lineer": ap.Unstructured(0.5)})


def test_raw_gemm_weights_of_attention_and_recurrent_layers_are_prunable(tmp_path):
    from torch import nn

    import admmprune as ap

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.lstm = nn.LSTM(16, 8, num_layers=2)
            self.head = nn.Linear(8, 4)

    model = Net()
    by_type = {t.name for t in ap.select(model, {nn.LSTM: ap.Unstructured(0.2)})}
    assert by_type == {"lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l1",
                       "lstm.weight_hh_l1"}  # fmt: skip
    assert {t.name for t in ap.select(model, {"type:LSTM": ap.Unstructured(0.2)})} == by_type
    by_glob = {t.name for t in ap.select(model, {"att*": ap.Unstructured(0.2)})}
    assert by_glob == {"attn.in_proj_weight", "attn.out_proj.weight"}
    with pytest.raises(ValueError, match=r"attn\.in_proj_weight \(MultiheadAttention\)"):
        ap.select(model, {"nothing*": ap.Unstructured(0.2)})  # listed among the available
    ap.prune(model, {"att*": ap.Unstructured(0.1), nn.LSTM: ap.Unstructured(0.1)})
    raw = sum(p.numel() * 4 for p in model.state_dict().values())
    size = ap.export_compressed(model, tmp_path / "m.admmprune")
    assert size < raw / 3  # the raw GEMM weights are stored sparse, not raw
    back = ap.load_compressed(tmp_path / "m.admmprune", Net())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 back.state_dict().values()))  # fmt: skip
