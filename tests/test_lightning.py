"""The Lightning callback: requested sparsity reached, kept through retraining, resumable."""

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import admmprune as ap
from admmprune.integrations.lightning import ADMMCallback
from conftest import make_blobs


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)


def loader():
    x, y = make_blobs(n=256, d=20, classes=4, seed=0)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)


def trainer(epochs, cb, **kw):
    return pl.Trainer(
        max_epochs=epochs, callbacks=[cb], accelerator="cpu", logger=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True, **kw,
    )  # fmt: skip


def spec():
    return {"net.0": ap.Unstructured(0.1), "net.2": ap.Filters(0.5)}


def test_callback_prunes_to_the_spec_and_keeps_zeros_in_retraining(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    cb = ADMMCallback(spec(), start_epoch=1, admm_epochs=3, rho=1e-2, rho_growth=2.0)
    trainer(7, cb, default_root_dir=tmp_path, enable_checkpointing=False).fit(model, loader())
    W0, W2 = model.net[0].weight.detach(), model.net[2].weight.detach()
    assert int((W0 != 0).sum()) == round(0.1 * W0.numel())  # exact, after 3 retraining epochs
    assert int(W2.abs().sum(dim=1).ne(0).sum()) == 2  # 2 of 4 rows
    x, y = make_blobs(n=256, d=20, classes=4, seed=0)
    assert (model(x).argmax(1) == y).float().mean() > 0.6


def test_callback_state_survives_a_lightning_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    cb = ADMMCallback(spec(), start_epoch=0, admm_epochs=2, rho=1e-2)
    t = trainer(4, cb, default_root_dir=tmp_path, enable_checkpointing=False)
    t.fit(model, loader())
    path = tmp_path / "m.ckpt"
    t.save_checkpoint(path)
    torch.manual_seed(0)
    model2 = Tiny()
    cb2 = ADMMCallback(spec(), start_epoch=0, admm_epochs=2, rho=1e-2)
    trainer(6, cb2, default_root_dir=tmp_path, enable_checkpointing=False).fit(
        model2, loader(), ckpt_path=path
    )
    assert cb2.masks is not None and torch.equal(
        cb2.masks["net.0.weight"], cb.masks["net.0.weight"]
    )
    assert torch.all(model2.net[0].weight[~cb.masks["net.0.weight"]] == 0)


def _penalty_after_admm(tmp_path, **kw) -> tuple[float, ADMMCallback]:
    torch.manual_seed(0)
    model = Tiny()
    cb = ADMMCallback(spec(), start_epoch=0, admm_epochs=5, rho=0.5)  # still in ADMM at the end
    trainer(3, cb, default_root_dir=tmp_path, enable_checkpointing=False, **kw).fit(model, loader())
    return cb.admm.penalty_value(), cb


def test_callback_scales_its_pull_with_16_mixed_loss_scaling(tmp_path):
    from lightning.pytorch.plugins import MixedPrecision

    fp32, _ = _penalty_after_admm(tmp_path)
    plugin = MixedPrecision("16-mixed", "cpu")  # loss scaled by 65536 before backward
    mixed, cb = _penalty_after_admm(tmp_path, plugins=[plugin])
    assert cb.admm.grad_scaler is plugin.scaler
    # the same pull towards Z: W ends about as close to it (measured 1.3x fp32's penalty; an
    # unscaled term, divided by 65536 on unscaling, left 11x)
    assert mixed < 3 * fp32
