import pytest
import torch
from torch import nn

import admmprune as ap
from admmprune import ADMM, Channels, Filters, Masks, Unstructured, prune
from conftest import make_blobs

OPTIMIZERS = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    "sgd_nesterov": lambda p: torch.optim.SGD(
        p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2
    ),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_masked_retraining_keeps_pruned_weights_exactly_zero(name):
    x, y = make_blobs(n=256)
    model = mlp()
    opt = OPTIMIZERS[name](model.parameters())
    for _ in range(5):  # dense steps first: momentum / Adam moments are non-zero everywhere
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    masks = prune(model, {"0": Unstructured(0.1), "2": Filters(0.5)})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks.attach(opt)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    params = dict(model.named_parameters())
    for n, m in masks.items():
        W = params[n]
        assert torch.equal(W[~m], torch.zeros_like(W[~m]))  # exactly zero, not just small
        assert not torch.equal(W[m], before[n][m])  # the kept weights did train
    assert masks.kept()["0.weight"] == pytest.approx(0.1, abs=1 / 640)


def test_detach_lets_weights_regrow():
    x, y = make_blobs(n=64)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    masks = prune(model, {"0": Unstructured(0.1)}).attach(opt)
    masks.detach()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert (model[0].weight != 0).float().mean() > 0.5


def test_masks_save_load_round_trip(tmp_path):
    model = mlp()
    masks = prune(model, {"0": Channels(0.25), "2": Unstructured(0.3)})
    path = tmp_path / "masks.pt"
    masks.save(path)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temporary behind
    loaded = Masks.load(path, mlp())
    assert set(loaded) == set(masks)
    for n in masks:
        assert torch.equal(loaded[n], masks[n])
    assert loaded.total_kept() == masks.total_kept()


def test_masks_load_rejects_bad_files(tmp_path):
    model = mlp()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read masks"):
        Masks.load(bad, model)
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="format tag"):
        Masks.load(tmp_path / "other.pt", model)
    other = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    prune(other, {"0": Unstructured(0.5)}).save(tmp_path / "m.pt")
    with pytest.raises(ValueError, match="another architecture"):
        Masks.load(tmp_path / "m.pt", model)
    with pytest.raises(ValueError, match="no such parameter"):
        Masks(model, {"fc9.weight": torch.ones(2, 2, dtype=torch.bool)})


def test_masks_load_does_not_execute_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": "admmprune.masks", "masks": {}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="cannot read masks"):
        Masks.load(tmp_path / "evil.pt", mlp())


def test_admm_prune_uses_projection_of_w():
    model = mlp()
    admm = ADMM(model, {"0": Unstructured(0.25)})
    W = model[0].weight.detach().clone()
    masks = admm.prune()
    Z, support = Unstructured(0.25).project(W)
    assert torch.equal(masks["0.weight"], support)
    assert torch.equal(model[0].weight.detach(), Z)


def test_torch_prune_round_trip_is_identity():
    from torch.nn.utils import prune as torch_prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    masks = ap.prune(model, {"0": ap.Filters(0.5), "3": ap.Unstructured(0.1)})
    x = torch.randn(2, 3, 6, 6)
    before = model(x).detach()
    ours = {k: v.clone() for k, v in masks.items()}
    masks.to_torch_prune()
    assert torch_prune.is_pruned(model)
    assert torch.equal(model[0].weight_mask.bool(), ours["0.weight"])
    assert torch.equal(model(x), before)
    back = ap.Masks.from_torch_prune(model)
    assert not torch_prune.is_pruned(model)
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    assert torch.equal(model(x), before)


def test_masks_made_by_torch_prune_are_imported_and_kept_in_retraining():
    from torch.nn.utils import prune as torch_prune

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 2))
    torch_prune.l1_unstructured(model[0], "weight", amount=0.7)
    torch_prune.random_structured(model[2], "weight", amount=0.5, dim=1)  # a second method
    torch_prune.l1_unstructured(model[2], "weight", amount=0.2)  # stacked on the same tensor
    expected = {"0.weight": model[0].weight_mask.bool(), "2.weight": model[2].weight_mask.bool()}
    masks = ap.Masks.from_torch_prune(model)
    assert all(torch.equal(masks[k], expected[k]) for k in expected)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    masks.attach(opt)
    for _ in range(5):
        loss = model(torch.randn(8, 10)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.all(model[0].weight[~expected["0.weight"]] == 0)
    with pytest.raises(ValueError, match=r"no torch\.nn\.utils\.prune"):
        ap.Masks.from_torch_prune(nn.Linear(2, 2))
