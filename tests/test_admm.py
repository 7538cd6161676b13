import copy
import itertools

import pytest
import torch
from torch import nn

from admmprune import ADMM, Columns, Filters, Unstructured
from admmprune.sets.constraints import keep_count
from conftest import make_blobs


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    )


def accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def epochs(model, opt, x, y, n, admm=None, batch=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            if admm is not None and admm.mode == "penalty":
                loss = loss + admm.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()


SPEC = {
    "0": Unstructured(keep=0.2),
    "2": Filters(keep=0.25) & Columns(keep=0.5),
    "4": Unstructured(0.5),
}


def test_admm_converges_prunes_exactly_and_keeps_accuracy():
    x, y = make_blobs(n=1200, seed=1)
    xtr, ytr, xte, yte = x[:1000], y[:1000], x[1000:], y[1000:]
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    epochs(model, opt, xtr, ytr, 15)
    dense_acc = accuracy(model, xte, yte)
    assert dense_acc > 0.8  # the task is learnable

    admm = ADMM(model, SPEC, rho=1e-2, rho_growth=1.5, rho_max=1.0)
    primal = []
    for k in range(10):
        epochs(model, opt, xtr, ytr, 2, admm, seed=k)
        stats = admm.update()
        primal.append(sum(s["primal"] for s in stats.values()))
        assert set(stats) == {"0.weight", "2.weight", "4.weight"}
    # ADMM pulls W into S: the residual shrinks by an order of magnitude, mostly monotonically
    assert primal[-1] < 0.1 * primal[0]
    assert sum(b < a for a, b in itertools.pairwise(primal)) >= 7

    masks = admm.prune()
    masks.attach(opt)
    epochs(model, opt, xtr, ytr, 5, seed=99)
    assert accuracy(model, xte, yte) >= dense_acc - 0.03

    W0, W2, W4 = model[0].weight, model[2].weight, model[4].weight
    assert int((W0 != 0).sum()) <= keep_count(0.2, W0.numel())
    assert int((W4 != 0).sum()) <= keep_count(0.5, W4.numel())
    assert int((W2.abs().sum(1) > 0).sum()) <= keep_count(0.25, 64)
    assert int((W2.abs().sum(0) > 0).sum()) <= keep_count(0.5, 64)
    for name, m in masks.items():
        assert not dict(model.named_parameters())[name][~m].any()


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_penalty_and_grad_hook_modes_give_same_trajectory(opt_name):
    x, y = make_blobs(n=256)
    runs = []
    for mode in ("penalty", "grad"):
        model = mlp(seed=3)
        opt = (
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
            if opt_name == "sgd"
            else torch.optim.Adam(model.parameters(), lr=1e-3)
        )
        admm = ADMM(model, SPEC, rho=0.05, mode=mode)
        for k in range(3):
            epochs(model, opt, x, y, 1, admm, seed=k)
            admm.update()
        runs.append([p.detach().clone() for p in model.parameters()])
    # grad mode sums grad + rho·W − rho·T, penalty mode grad + rho·(W − T): the same up to
    # rounding, which Adam turns into steps of up to lr where a gradient entry is ~0
    tol = {"rtol": 1e-5, "atol": 1e-6} if opt_name == "sgd" else {"rtol": 0, "atol": 2e-3}
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, **tol)
    # and the penalty really acted: without it the weights differ
    model = mlp(seed=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    epochs(model, opt, x, y, 3)
    assert not torch.allclose(next(model.parameters()), runs[0][0], atol=1e-4)


def test_grad_mode_adds_the_penalty_gradient_once_per_backward():
    """One backward in each mode gives the same gradient; a second backward before zero_grad
    (gradient accumulation) adds the penalty's gradient again, as a second penalty() would."""
    x, y = make_blobs(n=64)
    grads = {}
    for mode in ("penalty", "grad"):
        model = mlp(seed=5)
        admm = ADMM(model, SPEC, rho=0.7, mode=mode)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.1)  # W − T ≠ 0 everywhere
        for _ in range(2):
            loss = nn.functional.cross_entropy(model(x), y)
            (loss + admm.penalty() if mode == "penalty" else loss).backward()
        grads[mode] = [p.grad.clone() for p in model.parameters()]
        admm.close()
    for a, b in zip(grads["penalty"], grads["grad"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    model.zero_grad()  # the same weights, hooks closed: the plain gradient is another
    for _ in range(2):
        nn.functional.cross_entropy(model(x), y).backward()
    assert not torch.allclose(model[0].weight.grad, grads["grad"][0], atol=1e-2)


def test_grad_mode_with_the_grad_scaler_leaves_the_unscaled_pull():
    """Under loss scaling the hooks add S·rho·(W − T), so after ``unscale_`` the gradient is
    the penalty mode's; without the scaler the pull would come out divided by S."""
    x, y = make_blobs(n=64)
    grads = {}
    for case in ("penalty", "grad+scaler", "grad alone"):
        model = mlp(seed=5)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        mode = "penalty" if case == "penalty" else "grad"
        admm = ADMM(model, SPEC, rho=0.7, mode=mode,
                    grad_scaler=scaler if case == "grad+scaler" else None)  # fmt: skip
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.1)  # W − T ≠ 0 everywhere
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss + admm.penalty() if mode == "penalty" else loss).backward()
        scaler.unscale_(opt)
        grads[case] = [p.grad.clone() for p in model.parameters()]
        admm.close()
    for a, b in zip(grads["penalty"], grads["grad+scaler"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(grads["grad alone"][0], grads["penalty"][0], atol=1e-3)
    with pytest.raises(ValueError, match="is for mode='grad'"):
        ADMM(mlp(), SPEC, grad_scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(TypeError, match=r"must be a torch\.amp\.GradScaler"):
        ADMM(mlp(), SPEC, mode="grad", grad_scaler=2.0**16)


def test_grad_mode_refuses_penalty_and_close_removes_hooks():
    model = mlp()
    admm = ADMM(model, SPEC, mode="grad", rho=1.0)
    with pytest.raises(RuntimeError, match="penalty_value"):
        admm.penalty()
    assert admm.penalty_value() > 0
    x, y = make_blobs(n=8)
    admm.close()
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    g_closed = model[0].weight.grad.clone()
    ref = copy.deepcopy(model)
    ref.zero_grad()
    nn.functional.cross_entropy(ref(x), y).backward()
    torch.testing.assert_close(g_closed, ref[0].weight.grad)


def test_penalty_gradient_is_rho_times_residual():
    model = mlp()
    admm = ADMM(model, {"2": Filters(0.5)}, rho=0.3)
    with torch.no_grad():
        model[2].weight.add_(torch.randn_like(model[2].weight))
    admm.penalty().backward()
    st = admm._state["2.weight"]
    expected = 0.3 * (model[2].weight.detach() - st.Z + st.U)
    torch.testing.assert_close(model[2].weight.grad, expected)


def test_update_follows_the_math():
    model = mlp()
    admm = ADMM(model, {"4": Unstructured(0.25)}, rho=0.1)
    W0 = model[4].weight.detach().clone()
    st = admm._state["4.weight"]
    torch.testing.assert_close(st.Z, Unstructured(0.25).project(W0).Z)  # Z⁰ = Π(W⁰)
    assert not st.U.any()  # U⁰ = 0
    with torch.no_grad():
        model[4].weight.mul_(1.1)
    W1 = model[4].weight.detach().clone()
    Z0 = st.Z.clone()
    stats = admm.update()["4.weight"]
    Z1 = Unstructured(0.25).project(W1 + 0).Z  # U⁰ = 0
    torch.testing.assert_close(admm._state["4.weight"].Z, Z1)
    torch.testing.assert_close(admm._state["4.weight"].U, W1 - Z1)
    assert stats["primal"] == pytest.approx(float((W1 - Z1).norm()), rel=1e-6)
    assert stats["dual"] == pytest.approx(0.1 * float((Z1 - Z0).norm()), rel=1e-6)
    assert stats["kept"] == pytest.approx(0.25)


def test_rho_schedules_and_dual_rescaling():
    model = mlp()
    a = ADMM(model, {"4": Unstructured(0.5)}, rho=1e-3, rho_growth=10, rho_max=0.5)
    seen = []
    for _ in range(5):
        seen.append(a.rho)
        a.update()
    assert seen == pytest.approx([1e-3, 1e-2, 1e-1, 0.5, 0.5])

    staged = ADMM(model, {"4": Unstructured(0.5)}, rho=[1e-3, 1e-3, 1e-2])
    assert [staged.rho, (staged.update(), staged.rho)[1], (staged.update(), staged.rho)[1]] == [
        1e-3,
        1e-3,
        1e-2,
    ]
    fn = ADMM(model, {"4": Unstructured(0.5)}, rho=lambda k: 2.0**k)
    fn.update()
    assert fn.rho == 2.0

    # scaled dual: rho·U is unchanged by a rho step (Boyd §3.4.1)
    b = ADMM(model, {"4": Unstructured(0.5)}, rho=0.1, rho_growth=2.0)
    with torch.no_grad():
        model[4].weight.add_(0.5)
    b.update()
    W = model[4].weight.detach()
    Z = b._state["4.weight"].Z
    torch.testing.assert_close(b._state["4.weight"].U * b.rho, (W - Z) * 0.1)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "big", [], lambda k: -1.0])
def test_bad_rho_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="rho"):
        ADMM(mlp(), SPEC, rho=bad).update()


def test_bad_mode():
    with pytest.raises(ValueError, match="'penalty'"):
        ADMM(mlp(), SPEC, mode="hook")


def test_nan_weights_are_a_clear_error_naming_the_layer():
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'2.weight'.*NaN.*lower the learning rate"):
        ADMM(model, SPEC)
    model = mlp()
    admm = ADMM(model, SPEC)
    with torch.no_grad():
        model[4].weight[1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"'4.weight'.*update 1"):
        admm.update()
    with pytest.raises(ValueError, match=r"'4.weight'.*hard pruning"):
        admm.prune()


def _train_state(model, opt, admm):
    return {
        "model": copy.deepcopy(model.state_dict()),
        "opt": copy.deepcopy(opt.state_dict()),
        "admm": copy.deepcopy(admm.state_dict()),
    }


def test_state_dict_round_trip_continues_bit_identically(tmp_path):
    x, y = make_blobs(n=256)

    def fresh():
        model = mlp(seed=5)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        admm = ADMM(model, SPEC, rho=1e-2, rho_growth=1.3)
        return model, opt, admm

    model, opt, admm = fresh()
    for k in range(2):
        epochs(model, opt, x, y, 1, admm, seed=k)
        admm.update()
    torch.save(_train_state(model, opt, admm), tmp_path / "ckpt.pt")
    for k in range(2, 4):  # the uninterrupted run
        epochs(model, opt, x, y, 1, admm, seed=k)
        admm.update()
    masks_a = admm.prune()

    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model2, opt2, admm2 = fresh()
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    admm2.load_state_dict(state["admm"])
    assert admm2.num_updates == 2 and admm2.rho == pytest.approx(1e-2 * 1.3**2)
    for k in range(2, 4):
        epochs(model2, opt2, x, y, 1, admm2, seed=k)
        admm2.update()
    masks_b = admm2.prune()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert all(torch.equal(masks_a[n], masks_b[n]) for n in masks_a)


def test_load_state_dict_rejects_mismatch():
    model = mlp()
    state = ADMM(model, SPEC).state_dict()
    with pytest.raises(ValueError, match="same constraint"):
        ADMM(model, {**SPEC, "0": Unstructured(0.3)}).load_state_dict(state)
    with pytest.raises(ValueError, match="constrains"):
        ADMM(model, {"0": Unstructured(0.2)}).load_state_dict(state)
    with pytest.raises(ValueError, match="format tag"):
        ADMM(model, SPEC).load_state_dict({"layers": {}})


def test_bf16_parameters_keep_fp32_state_and_penalty():
    model = mlp().to(torch.bfloat16)
    admm = ADMM(model, SPEC, rho=0.1)
    st = admm._state["0.weight"]
    assert st.Z.dtype == torch.float32 and st.U.dtype == torch.float32
    p = admm.penalty()
    assert p.dtype == torch.float32
    x, y = make_blobs(n=32)
    loss = nn.functional.cross_entropy(model(x.bfloat16()).float(), y) + p
    loss.backward()
    assert model[0].weight.grad.dtype == torch.bfloat16
    stats = admm.update()
    assert all(s["kept"] > 0 for s in stats.values())
    masks = admm.prune()
    assert int((model[0].weight != 0).sum()) <= keep_count(0.2, model[0].weight.numel())
    assert masks["0.weight"].dtype == torch.bool


def test_state_follows_model_to_another_device():
    # The code path of a CPU→CUDA move after ADMM was built: Z/U move lazily with W.
    model = mlp()
    admm = ADMM(model, SPEC)
    model.to("meta")
    assert admm.penalty().device.type == "meta"
    assert admm._state["0.weight"].Z.device.type == "meta"
    assert admm._state["0.weight"].U.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_masks():
    model = mlp()
    cpu = ADMM(copy.deepcopy(model), SPEC).prune()
    gpu = ADMM(copy.deepcopy(model).cuda(), SPEC).prune()
    for n in cpu:
        assert torch.equal(cpu[n], gpu[n].cpu())
