"""Shared runs of the reference comparisons: the configurations (every supported optimizer and implementation), a
small two-group model with an lr schedule and a parameter without a gradient at some steps, the training loop that
drives the float64 oracle (tests/reference.py) beside the tracker, and the assertions that compare them."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_adamtype import ConditionTracker
from lightning_adamtype.optim import AdaFom
from reference import Reference

STEPS = 14
NONE_STEPS = {2, 5, 6, 10}  # 1-based steps at which `extra` has no gradient
RTOL = {
    "a": 1e-4,
    "b": 1e-4,
    "a_mean": 1e-4,
    "variance_ratio": 1e-4,
    "c": 1e-3,
    "c2": 1e-3,
    "c_mean": 1e-3,
    "bias_ratio": 1e-3,
    "bias_ratio_mean": 1e-3,
}

A = torch.optim.Adam
AW = torch.optim.AdamW

CONFIGS = [
    # Adam: three implementations, amsgrad, coupled weight decay, maximize
    ("adam-forloop", A, dict(lr=1e-2, foreach=False)),
    ("adam-foreach", A, dict(lr=1e-2, foreach=True)),
    ("adam-fused", A, dict(lr=1e-2, fused=True)),
    ("adam-amsgrad-forloop", A, dict(lr=1e-2, amsgrad=True, betas=(0.9, 0.6), foreach=False)),
    ("adam-amsgrad-foreach", A, dict(lr=1e-2, amsgrad=True, betas=(0.9, 0.6), foreach=True)),
    ("adam-amsgrad-fused", A, dict(lr=1e-2, amsgrad=True, betas=(0.9, 0.6), fused=True)),
    ("adam-wd-forloop", A, dict(lr=1e-2, weight_decay=0.1, foreach=False)),
    ("adam-wd-foreach", A, dict(lr=1e-2, weight_decay=0.1, foreach=True)),
    ("adam-wd-fused", A, dict(lr=1e-2, weight_decay=0.1, fused=True)),
    ("adam-maximize-wd-foreach", A, dict(lr=1e-3, weight_decay=0.1, maximize=True, foreach=True)),
    ("adam-maximize-wd-fused", A, dict(lr=1e-3, weight_decay=0.1, maximize=True, fused=True)),
    ("adam-decoupled-wd", A, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, foreach=True)),
    # AdamW: three implementations, amsgrad
    ("adamw-forloop", AW, dict(lr=1e-2, weight_decay=0.1, foreach=False)),
    ("adamw-foreach", AW, dict(lr=1e-2, weight_decay=0.1, foreach=True)),
    ("adamw-fused", AW, dict(lr=1e-2, weight_decay=0.1, fused=True)),
    ("adamw-amsgrad-forloop", AW, dict(lr=1e-2, amsgrad=True, betas=(0.9, 0.6), foreach=False)),
    ("adamw-amsgrad-foreach", AW, dict(lr=1e-2, amsgrad=True, betas=(0.9, 0.6), foreach=True)),
    ("adamw-amsgrad-fused", AW, dict(lr=1e-2, amsgrad=True, betas=(0.9, 0.6), fused=True)),
    # Adagrad
    ("adagrad-forloop", torch.optim.Adagrad, dict(lr=0.1, foreach=False)),
    ("adagrad-foreach", torch.optim.Adagrad, dict(lr=0.1, foreach=True)),
    ("adagrad-lrdecay-wd-forloop", torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.05, weight_decay=0.1, foreach=False)),
    ("adagrad-lrdecay-wd-foreach", torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.05, weight_decay=0.1, foreach=True)),
    ("adagrad-init-acc", torch.optim.Adagrad, dict(lr=0.1, initial_accumulator_value=0.3, foreach=True)),
    # RMSprop
    ("rmsprop-forloop", torch.optim.RMSprop, dict(lr=1e-2, foreach=False)),
    ("rmsprop-foreach", torch.optim.RMSprop, dict(lr=1e-2, foreach=True)),
    ("rmsprop-centered-forloop", torch.optim.RMSprop, dict(lr=1e-2, centered=True, foreach=False)),
    ("rmsprop-centered-foreach", torch.optim.RMSprop, dict(lr=1e-2, centered=True, foreach=True)),
    ("rmsprop-momentum-forloop", torch.optim.RMSprop, dict(lr=1e-2, momentum=0.9, foreach=False)),
    ("rmsprop-momentum-foreach", torch.optim.RMSprop, dict(lr=1e-2, momentum=0.9, foreach=True)),
    ("rmsprop-centered-momentum", torch.optim.RMSprop, dict(lr=1e-2, centered=True, momentum=0.5, foreach=True)),
    ("rmsprop-wd-forloop", torch.optim.RMSprop, dict(lr=1e-2, weight_decay=0.1, foreach=False)),
    ("rmsprop-wd-foreach", torch.optim.RMSprop, dict(lr=1e-2, weight_decay=0.1, foreach=True)),
    ("rmsprop-wd-maximize", torch.optim.RMSprop, dict(lr=1e-3, weight_decay=0.1, maximize=True, foreach=True)),
    # SGD
    ("sgd-plain-forloop", torch.optim.SGD, dict(lr=0.1, foreach=False)),
    ("sgd-plain-foreach", torch.optim.SGD, dict(lr=0.1, foreach=True)),
    ("sgd-momentum", torch.optim.SGD, dict(lr=0.1, momentum=0.9, foreach=True)),
    ("sgd-momentum-forloop", torch.optim.SGD, dict(lr=0.1, momentum=0.9, foreach=False)),
    ("sgd-nesterov", torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("sgd-dampening", torch.optim.SGD, dict(lr=0.1, momentum=0.8, dampening=0.3)),
    ("sgd-wd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
    ("sgd-wd-plain", torch.optim.SGD, dict(lr=0.1, weight_decay=0.1)),
    ("sgd-maximize-wd", torch.optim.SGD, dict(lr=1e-2, momentum=0.5, weight_decay=0.1, maximize=True)),
    ("sgd-fused", torch.optim.SGD, dict(lr=0.1, momentum=0.9, fused=True)),
    # Adamax
    ("adamax-forloop", torch.optim.Adamax, dict(lr=2e-2, foreach=False)),
    ("adamax-foreach", torch.optim.Adamax, dict(lr=2e-2, foreach=True)),
    ("adamax-wd", torch.optim.Adamax, dict(lr=2e-2, weight_decay=0.1, foreach=True)),
    # NAdam
    ("nadam-forloop", torch.optim.NAdam, dict(lr=2e-2, foreach=False)),
    ("nadam-foreach", torch.optim.NAdam, dict(lr=2e-2, foreach=True)),
    ("nadam-wd", torch.optim.NAdam, dict(lr=2e-2, weight_decay=0.1, foreach=True)),
    ("nadam-decoupled-wd", torch.optim.NAdam, dict(lr=2e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    ("nadam-momentum-decay", torch.optim.NAdam, dict(lr=2e-2, momentum_decay=0.1, foreach=False)),
    # RAdam: β2 = 0.9 → ρ_t ≤ 5 for t ≤ 5 (un-adapted), > 5 from t = 6 (rectified)
    ("radam-forloop", torch.optim.RAdam, dict(lr=1e-2, betas=(0.9, 0.9), foreach=False)),
    ("radam-foreach", torch.optim.RAdam, dict(lr=1e-2, betas=(0.9, 0.9), foreach=True)),
    ("radam-wd", torch.optim.RAdam, dict(lr=1e-2, betas=(0.9, 0.9), weight_decay=0.1, foreach=True)),
    ("radam-decoupled-wd", torch.optim.RAdam, dict(lr=1e-2, betas=(0.9, 0.9), weight_decay=0.1, decoupled_weight_decay=True)),
    # Adadelta: Δ_{t−1} rebuilt from the state after the step; coupled weight decay through a fixed point
    ("adadelta-forloop", torch.optim.Adadelta, dict(lr=1.0, foreach=False)),
    ("adadelta-foreach", torch.optim.Adadelta, dict(lr=1.0, foreach=True)),
    ("adadelta-rho-eps", torch.optim.Adadelta, dict(lr=0.5, rho=0.5, eps=1e-4, foreach=True)),
    ("adadelta-wd-forloop", torch.optim.Adadelta, dict(lr=1.0, weight_decay=0.1, foreach=False)),
    ("adadelta-wd-maximize-foreach", torch.optim.Adadelta, dict(lr=0.1, weight_decay=0.1, maximize=True, foreach=True)),
    # Adafactor: factored (2-D) and plain (1-D) second moments, relative step size, update clipping d
    ("adafactor-forloop", torch.optim.Adafactor, dict(lr=1e-2, foreach=False)),
    ("adafactor-foreach", torch.optim.Adafactor, dict(lr=1e-2, foreach=True)),
    ("adafactor-wd-maximize", torch.optim.Adafactor, dict(lr=1e-2, weight_decay=0.5, maximize=True, foreach=False)),
    ("adafactor-eps2-d", torch.optim.Adafactor, dict(lr=0.3, eps=(1e-3, 1.0), d=3.0, beta2_decay=-0.5, foreach=True)),
    # AdaFom (the paper's method, shipped by the package)
    ("adafom-forloop", AdaFom, dict(lr=0.1, foreach=False)),
    ("adafom-foreach", AdaFom, dict(lr=0.1, foreach=True)),
    ("adafom-wd", AdaFom, dict(lr=0.1, weight_decay=0.1, beta1=0.5)),
]
CONFIG_IDS = [c[0] for c in CONFIGS]


# ---------------------------------------------------------------------------------------------- helpers


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(4, 6)
        self.l2 = nn.Linear(6, 2)
        self.extra = nn.Parameter(torch.randn(5))  # its grad is None at NONE_STEPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x))) + 0.1 * self.extra[:2] * self.extra.sum()


def make_run(cls, kwargs, seed: int = 0, lr_factor: float = 0.5, device: str = "cpu"):
    """Model, optimizer with two groups (group 1 at lr_factor × the lr), ExponentialLR scheduler, data stream."""
    torch.manual_seed(seed)
    model = Net().to(device)
    kwargs = dict(kwargs)
    lr = kwargs.pop("lr")
    lr1 = lr * lr_factor if not isinstance(lr, torch.Tensor) else torch.tensor(float(lr) * lr_factor)
    groups = [
        {"params": [model.l1.weight, model.l1.bias]},
        {"params": [model.l2.weight, model.extra, model.l2.bias], "lr": lr1},
    ]
    opt = cls(groups, lr=lr, **kwargs)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    gen = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(8, 4, generator=gen).to(device), torch.randn(8, 2, generator=gen).to(device)) for _ in range(64)]
    return model, opt, sched, data


def train(model, opt, sched, data, steps: range, ref: Reference | None = None) -> None:
    """Steps `steps` (1-based numbers) of training; `ref` (if any) observes each optimizer step."""
    for t in steps:
        x, y = data[t - 1]
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if t in NONE_STEPS:
            model.extra.grad = None
        if ref is not None:
            ref.before_step()
        opt.step()
        if ref is not None:
            ref.after_step()
        sched.step()


def assert_matches(tracker: ConditionTracker, ref: Reference, prefix: str | None = None) -> dict:
    got = tracker.compute()
    prefix = prefix or type(tracker.optimizer).__name__
    expected = {f"{prefix}/pg{i}": e for i, e in enumerate(ref.compute()) if e is not None}
    assert set(got) == set(expected), (got.keys(), expected.keys())
    for name, exp in expected.items():
        values = got[name]
        assert values["steps"] == exp["steps"], (name, values["steps"], exp["steps"])
        for key, rtol in RTOL.items():
            assert values[key] == pytest.approx(exp[key], rel=rtol, abs=1e-12), (name, key, values[key], exp[key])
    return got


def assert_same(got: dict, expected: dict, rel: float) -> None:
    """Two compute() results agree key by key (NaN equals NaN; rel=0 means bit for bit)."""
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].keys() == expected[name].keys(), name
        for key, value in expected[name].items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(got[name][key]), (name, key, got[name][key])
            elif rel == 0.0:
                assert got[name][key] == value, (name, key, got[name][key], value)
            else:
                assert got[name][key] == pytest.approx(value, rel=rel, abs=1e-15), (name, key, got[name][key], value)
