"""ADMM on a model sharded by FSDP2 (``fully_shard``): 2 gloo processes on CPU give the masks
and weights of one process; the per-tensor top-k agrees across shards, ties included."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import admmprune as ap
from admmprune.sets import constraints, sharded
from admmprune.weights.shards import local

fsdp = pytest.importorskip("torch.distributed.fsdp", reason="this torch has no FSDP2")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no fully_shard (FSDP2)", allow_module_level=True)

SPEC = {  # odd row counts: the shards are uneven (4 + 3 rows, 2 + 1 rows)
    "0": ap.Unstructured(0.3),
    "2": ap.Filters(0.5),
    "4": ap.NM(2, 4),
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 12), nn.ReLU(), nn.Linear(12, 3)
    )  # fmt: skip


def _train(rank: int, world: int, port: int, out: str, mode: str, metric: bool) -> None:
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    model = _model()
    if world > 1:
        for m in model:
            if isinstance(m, nn.Linear):
                fsdp.fully_shard(m)
        fsdp.fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    admm = ap.ADMM(model, SPEC, rho=0.05, mode=mode, metric=opt if metric else None)
    torch.manual_seed(1)  # the same data on every rank: the same trajectory as one process
    x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
    stats = []
    for step in range(6):
        loss = nn.functional.cross_entropy(model(x), y)
        if mode == "penalty":
            loss = loss + admm.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 2 == 1:
            stats.append(admm.update())
    penalty = admm.penalty_value()
    masks = admm.prune()
    weights = {n: local(p).detach().clone() for n, p in model.named_parameters()}
    torch.save(
        {"masks": dict(masks), "weights": weights, "stats": stats, "penalty": penalty},
        f"{out}/rank{rank}.pt",
    )
    if world > 1:
        dist.destroy_process_group()


def _whole(out, world: int) -> dict:
    parts = [torch.load(f"{out}/rank{r}.pt", weights_only=True) for r in range(world)]
    cat = lambda key: {n: torch.cat([p[key][n] for p in parts]) for n in parts[0][key]}  # noqa: E731
    return {"masks": cat("masks"), "weights": cat("weights"), "stats": parts[0]["stats"],
            "penalty": parts[0]["penalty"], "parts": parts}  # fmt: skip


@pytest.mark.parametrize(("mode", "metric"), [("penalty", False), ("grad", True)])
def test_two_fsdp2_processes_give_the_masks_of_one(tmp_path, mode, metric):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    _train(0, 1, 0, str(one), mode, metric)
    mp.spawn(_train, args=(2, _port(), str(two), mode, metric), nprocs=2, join=True)
    a, b = _whole(one, 1), _whole(two, 2)
    assert [tuple(p["masks"]["0.weight"].shape) for p in b["parts"]] == [(4, 10), (3, 10)]
    for name, mask in a["masks"].items():
        assert torch.equal(b["masks"][name], mask), name
    for name, w in a["weights"].items():
        torch.testing.assert_close(b["weights"][name], w, rtol=1e-5, atol=1e-6)
    assert int(a["masks"]["0.weight"].sum()) == constraints.keep_count(0.3, 70)
    assert int(a["masks"]["2.weight"].all(1).sum()) == 6  # whole rows: Filters
    for sa, sb in zip(a["stats"], b["stats"], strict=True):  # whole-tensor numbers on each rank
        for name in sa:
            for key in ("primal", "dual", "kept"):
                assert sb[name][key] == pytest.approx(sa[name][key], rel=1e-4, abs=1e-7)
    assert b["penalty"] == pytest.approx(a["penalty"], rel=1e-4)


def _ties(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    scores = _tied_scores()
    block = scores.tensor_split(world)[rank]
    group = dist.group.WORLD
    masks = {k: sharded.topk_mask(block.clone(), k, group, rank) for k in (1, 5, 9, 13, 20, 40)}
    torch.save(masks, f"{out}/ties{rank}.pt")
    dist.destroy_process_group()


def _tied_scores() -> torch.Tensor:
    # many exact ties, some spanning the shard boundary, and zeros (pruned weights)
    return torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0, 2.0, 5.0, 2.0, 1.0, 0.0, 2.0, 3.0, 2.0, 0.0,
                         1.0, 2.0, 0.5, 2.0, 0.0, 4.0, 2.0, 1.0, 2.0, 3.0, 0.0, 2.0,
                         1.0])  # fmt: skip


def test_sharded_topk_equals_one_process_with_ties(tmp_path):
    mp.spawn(_ties, args=(2, _port(), str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"ties{r}.pt", weights_only=True) for r in range(2)]
    scores = _tied_scores()
    for k in parts[0]:
        whole = torch.cat([parts[0][k], parts[1][k]])
        assert torch.equal(whole, constraints.topk_mask(scores, k)), k
        assert int(whole.sum()) == min(k, scores.numel())


def test_unsupported_sets_and_options_are_refused_on_sharded_parameters(tmp_path):
    mp.spawn(_refusals, args=(2, _port(), str(tmp_path)), nprocs=2, join=True)
    messages = torch.load(tmp_path / "refusals0.pt", weights_only=True)
    assert "Columns" in messages["columns"] and "not supported" in messages["columns"]
    assert "Fisher" in messages["fisher"] and "exp_avg_sq" in messages["fisher"]
    assert "groups" in messages["groups"]


def _refusals(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = _model()
    groups = ap.channel_groups(model, torch.randn(2, 10), keep=0.5)
    for m in model:
        if isinstance(m, nn.Linear):
            fsdp.fully_shard(m)
    fsdp.fully_shard(model)
    messages = {}
    for key, make in {
        "columns": lambda: ap.ADMM(model, {"2": ap.Columns(0.5)}).update(),
        "fisher": lambda: ap.ADMM(model, {"2": ap.Unstructured(0.5)}, metric="fisher"),
        "groups": lambda: ap.ADMM(model, {"0": ap.Unstructured(0.5)}, groups=groups),
    }.items():
        try:
            make()
        except ValueError as e:
            messages[key] = str(e)
    torch.save(messages, f"{out}/refusals{rank}.pt")
    dist.destroy_process_group()
