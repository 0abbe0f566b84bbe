"""Tests for the per-class, per-weight learning-rate optimizer (fyc_convert/train/class_lr.py)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fyc_convert.errors import ClassLRError, TrainingError
from fyc_convert.train import class_lr as class_lr_module
from fyc_convert.train.class_lr import ClassLR, build_class_lr, default_class_lr_layers, mu_nbytes


def _mlp(sizes: list[int], *, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if k < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(dtype)


def _batch(n: int, d: int, c: int, *, seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.arange(n) % c  # every class present
    return x, y[torch.randperm(n, generator=g)]


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y, reduction="none")  # (B,)


def _opt(model: nn.Module, **kw) -> ClassLR:
    args = dict(num_classes=3, lr=0.1, eta_mu=1e3, cutoff_epoch=10, layers=None, steps_per_epoch=4)
    args.update(kw)
    return build_class_lr(model, **args)


def test_cutoff_zero_is_exactly_plain_sgd():
    model = _mlp([5, 8, 8, 3])
    ref = copy.deepcopy(model)
    opt = _opt(model, cutoff_epoch=0)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(3):
        x, y = _batch(12, 5, 3, seed=step)
        opt.backward_and_step(_loss(model, x, y), y)
        sgd.zero_grad()
        _loss(ref, x, y).mean().backward()
        sgd.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert len(opt.state) == 0  # μ never allocated


def test_mu_fixed_at_one_gives_sgd_update():
    model = _mlp([5, 8, 8, 3], dtype=torch.float64)
    ref = copy.deepcopy(model)
    opt = _opt(model, eta_mu=0.0)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(3):
        x, y = _batch(12, 5, 3, seed=step, dtype=torch.float64)
        opt.backward_and_step(_loss(model, x, y), y)
        sgd.zero_grad()
        _loss(ref, x, y).mean().backward()
        sgd.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert all(torch.equal(s["mu"], torch.ones_like(s["mu"])) for s in opt.state.values())


def _per_class_reference(model, x, y, params, *, num_classes):
    """g_j = ∂/∂w (1/B) Σ_{i: y_i=j} ℓ_i by one explicit autograd call per class, and per-sample gradients."""
    losses = _loss(model, x, y)
    b = len(y)
    class_grads = [torch.autograd.grad(losses[y == j].sum() / b, params, retain_graph=True) for j in range(num_classes)]
    sample_grads = [torch.autograd.grad(losses[i] / b, params, retain_graph=True) for i in range(b)]
    full = torch.autograd.grad(losses.mean(), list(model.parameters()))
    return class_grads, sample_grads, full


@pytest.mark.parametrize("mu_increment", ["class_grad_sq", "sample_grad_sq"])
def test_two_class_update_matches_explicit_per_class_autograd(mu_increment):
    model = _mlp([3, 4, 2], dtype=torch.float64)  # default layers: "0" (the top Linear "2" has 2 = C outputs)
    opt = _opt(model, num_classes=2, lr=0.5, eta_mu=100.0, mu_increment=mu_increment)
    assert opt.layer_names == ["0"]
    first = model[0]
    params = [first.weight, first.bias]
    g = torch.Generator().manual_seed(1)
    for p in params:  # non-trivial μ, so the per-class scaling shows
        opt.state[p]["mu"] = 1 + torch.rand(opt.state[p]["mu"].shape, generator=g, dtype=torch.float64)
    mu0 = [opt.state[p]["mu"].clone() for p in params]
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1])
    class_grads, sample_grads, full = _per_class_reference(model, x, y, params, num_classes=2)
    before = [p.detach().clone() for p in model.parameters()]

    opt.backward_and_step(_loss(model, x, y), y)

    lr, eta = 0.5, 100.0
    for k, p in enumerate(params):
        expected_w = before[k] - lr * (mu0[k][0] * class_grads[0][k] + mu0[k][1] * class_grads[1][k])
        torch.testing.assert_close(p.detach(), expected_w, rtol=0, atol=1e-12)
        for j in range(2):
            if mu_increment == "class_grad_sq":
                inc = class_grads[j][k] ** 2
            else:
                inc = sum(sample_grads[i][k] ** 2 for i in range(len(y)) if y[i] == j)
            torch.testing.assert_close(opt.state[p]["mu"][j], mu0[k][j] + eta * lr * inc, rtol=0, atol=1e-12)
    top = list(model.parameters())[2:]  # plain SGD on the top layer
    for p, b0, gr in zip(top, before[2:], full[2:]):
        torch.testing.assert_close(p.detach(), b0 - lr * gr, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mu_increment", ["class_grad_sq", "sample_grad_sq"])
def test_sequence_inputs_match_explicit_autograd(mu_increment):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(8, 2)).double()  # input (B, 2, 3)
    opt = _opt(model, num_classes=2, lr=0.5, eta_mu=100.0, layers=["0"], mu_increment=mu_increment)
    params = [model[0].weight, model[0].bias]
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    y = torch.tensor([1, 0, 0, 1])
    class_grads, sample_grads, _ = _per_class_reference(model, x, y, params, num_classes=2)
    before = [p.detach().clone() for p in params]
    opt.backward_and_step(_loss(model, x, y), y)
    for k, p in enumerate(params):
        torch.testing.assert_close(p.detach(), before[k] - 0.5 * (class_grads[0][k] + class_grads[1][k]), rtol=0,
                                   atol=1e-12)
        for j in range(2):
            if mu_increment == "class_grad_sq":
                inc = class_grads[j][k] ** 2
            else:
                inc = sum(sample_grads[i][k] ** 2 for i in range(len(y)) if y[i] == j)
            torch.testing.assert_close(opt.state[p]["mu"][j], 1 + 50.0 * inc, rtol=0, atol=1e-12)


def test_mu_only_grows_between_resets_and_resets_at_half_epochs():
    model = _mlp([5, 8, 8, 3])
    opt = _opt(model, steps_per_epoch=6, eta_mu=1e4)  # half epochs start at steps 3, 6, 9, …
    w = model[0].weight
    prev = opt.state[w]["mu"].clone()
    for step in range(3):
        x, y = _batch(12, 5, 3, seed=step)
        opt.backward_and_step(_loss(model, x, y), y)
        mu = opt.state[w]["mu"]
        assert bool((mu >= prev).all())
        prev = mu.clone()
    assert float(prev.max()) > 1.0
    # step 3 opens the second half epoch: μ is reset to 1 before the update; a zero loss adds nothing
    x, y = _batch(12, 5, 3, seed=3)
    opt.backward_and_step(_loss(model, x, y) * 0.0, y)
    assert torch.equal(opt.state[w]["mu"], torch.ones_like(prev))
    opt.backward_and_step(_loss(model, x, y), y)  # step 4: grows again
    grown = opt.state[w]["mu"].clone()
    assert float(grown.max()) > 1.0
    opt.backward_and_step(_loss(model, x, y) * 0.0, y)  # step 5: same half epoch, no reset
    assert torch.equal(opt.state[w]["mu"], grown)
    assert opt.epoch == 1.0


def test_cutoff_returns_to_plain_sgd_and_frees_mu():
    model = _mlp([5, 8, 8, 3])
    opt = _opt(model, steps_per_epoch=2, cutoff_epoch=1)
    for step in range(2):
        x, y = _batch(12, 5, 3, seed=step)
        opt.backward_and_step(_loss(model, x, y), y)
    assert opt.class_lr_active is False
    ref = copy.deepcopy(model)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    x, y = _batch(12, 5, 3, seed=7)
    opt.backward_and_step(_loss(model, x, y), y)
    _loss(ref, x, y).mean().backward()
    sgd.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert len(opt.state) == 0
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_state_dict_resume_continues_the_schedule():
    model = _mlp([5, 8, 8, 3])
    twin = copy.deepcopy(model)
    opt = _opt(model, steps_per_epoch=4)
    batches = [_batch(12, 5, 3, seed=s) for s in range(5)]
    for x, y in batches[:3]:
        opt.backward_and_step(_loss(model, x, y), y)
    resumed_model = copy.deepcopy(model)
    resumed = _opt(resumed_model, steps_per_epoch=4)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert resumed.steps_done == 3
    for x, y in batches[3:]:
        opt.backward_and_step(_loss(model, x, y), y)
        resumed.backward_and_step(_loss(resumed_model, x, y), y)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(next(model.parameters()), next(twin.parameters()))


def test_memory_refusal_raises_before_allocating(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 10))

    def no_alloc(*args, **kwargs):
        raise AssertionError("μ was allocated")

    monkeypatch.setattr(class_lr_module.torch, "ones", no_alloc)
    need = mu_nbytes({"0": model[0], "2": model[2]}, num_classes=10)
    assert need == 10 * (4 * 8 + 8 + 8 * 64 + 64) * 4
    fits_first = 10 * (4 * 8 + 8) * 4
    with pytest.raises(ClassLRError, match=r"restrict --class-lr-layers to '0'") as err:
        _opt(model, num_classes=10, memory_budget_bytes=fits_first + 100)
    msg = str(err.value)
    assert "\n" not in msg and "0 (" in msg and "2 (" in msg
    assert isinstance(err.value, TrainingError)
    with pytest.raises(ClassLRError, match="even the smallest layer"):
        _opt(model, num_classes=10, memory_budget_bytes=16)


def test_memory_refusal_default_budget_on_a_huge_model():
    with torch.device("meta"):  # 1e10 weights × 1000 classes: more than any machine's memory
        model = nn.Sequential(nn.Linear(100_000, 100_000), nn.Linear(100_000, 1000))
    with pytest.raises(ClassLRError, match="over the .* budget"):
        _opt(model, num_classes=1000)


def test_default_layers_skip_the_top_one_and_keep_the_bottom_sixteen():
    model = _mlp([4] + [6] * 20 + [3])
    names = default_class_lr_layers(model, num_classes=3)
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert names == linear[:16]
    small = _mlp([4, 6, 5])  # top layer has 5 outputs != 3 classes: it is "below the head", kept
    assert default_class_lr_layers(small, num_classes=3) == ["0", "2"]


def test_layer_errors_name_the_candidates():
    model = _mlp([5, 8, 8, 3])
    with pytest.raises(ClassLRError, match=r"'nope' is no module; nn.Linear layers: 0, 2, 4"):
        _opt(model, layers=["nope"])
    with pytest.raises(ClassLRError, match="a Tanh, not an nn.Linear"):
        _opt(model, layers=["1"])
    with pytest.raises(ClassLRError, match="no trainable nn.Linear"):
        _opt(nn.Sequential(nn.Conv1d(1, 3, 1), nn.Flatten()), num_classes=3)
    opt = _opt(model)
    with pytest.raises(ClassLRError, match="backward_and_step"):
        opt.step()
    assert opt.steps_done == 0
    x, y = _batch(6, 5, 3, seed=0)
    with pytest.raises(ClassLRError, match=r"labels must lie in \[0, 3\)"):
        opt.backward_and_step(_loss(model, x, y), y + 5)
    with pytest.raises(ClassLRError, match="reduction='none'"):
        opt.backward_and_step(_loss(model, x, y).mean(), y)


def test_layer_run_twice_is_refused():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(4, 3))
    opt = _opt(model, layers=["0"])
    x, y = _batch(6, 4, 3, seed=0)
    with pytest.raises(ClassLRError, match="ran 2 times"):
        opt.backward_and_step(_loss(model, x, y), y)


def test_lr_scheduler_sees_the_steps():
    model = _mlp([5, 8, 8, 3])
    opt = _opt(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = _batch(12, 5, 3, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" would fail here
        opt.backward_and_step(_loss(model, x, y), y)
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.05]
