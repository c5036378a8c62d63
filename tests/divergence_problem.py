"""The paper's divergence example (Chen et al., ICLR 2019; design notes §3) as a small plain-PyTorch loop.

Shared by tests/test_verdicts.py, tests/test_switch.py and tests/test_ddp.py. Nothing here imports the package:
the problem, the optimizers and the loop are plain torch, and the tests attach a ``ConditionTracker`` to it.

x ∈ ℝ (float64 Parameter of shape [1]), x₁ = 1. Each step draws i uniformly from {1, …, 11} (seeded). The
stochastic gradient is

    g = 11·x   if i = 1,   −x   otherwise        (|x| ≤ 1)
    g = 11·sign(x) if i = 1, −sign(x) otherwise   (|x| > 1)

Its mean points to 0 (the only stationary point). Adam with β2 = 0.9 drifts away; AMSGrad, AdaGrad and SGD
converge.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

BETAS = (0.0, 0.9)
EPS = 1e-8


def stochastic_gradient(x: torch.Tensor, i: int) -> torch.Tensor:
    """The paper's gradient for index ``i`` at ``x`` (a tensor of any shape; same dtype and device)."""
    inside = x.abs() <= 1
    big = 11.0 if i == 1 else -1.0
    return torch.where(inside, big * x, big * torch.sign(x))


def draw_indices(steps: int, seed: int) -> list[int]:
    """``steps`` indices drawn uniformly from {1, …, 11} with a seeded generator (host ints)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, 12, (steps,), generator=gen).tolist()


def make_param() -> torch.nn.Parameter:
    """x₁ = 1, float64, shape [1]."""
    return torch.nn.Parameter(torch.ones(1, dtype=torch.float64))


def inv_sqrt_schedule(base: float = 0.5) -> Callable[[int], float]:
    """LambdaLR factor so that the step t (1-based) runs with lr = base / sqrt(t) (with the optimizer's lr = 1)."""
    return lambda epoch: base / math.sqrt(epoch + 1)


def make_optimizer(kind: str, param: torch.nn.Parameter):
    """(optimizer, scheduler or None) for one of the measured configurations.

    kinds: "adam", "adam_sqrt" (lr = 0.5/√t), "amsgrad", "amsgrad_sqrt", "adagrad" (lr 0.1), "sgd" (lr 0.01),
    "rmsprop" (lr 0.01, alpha 0.9).
    """
    if kind == "adam":
        return torch.optim.Adam([param], lr=0.1, betas=BETAS, eps=EPS), None
    if kind == "amsgrad":
        return torch.optim.Adam([param], lr=0.1, betas=BETAS, eps=EPS, amsgrad=True), None
    if kind in ("adam_sqrt", "amsgrad_sqrt"):
        opt = torch.optim.Adam([param], lr=1.0, betas=BETAS, eps=EPS, amsgrad=kind == "amsgrad_sqrt")
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, inv_sqrt_schedule(0.5))
    if kind == "adagrad":
        return torch.optim.Adagrad([param], lr=0.1), None
    if kind == "sgd":
        return torch.optim.SGD([param], lr=0.01), None
    if kind == "rmsprop":
        return torch.optim.RMSprop([param], lr=0.01, alpha=0.9), None
    raise ValueError(f"unknown optimizer kind {kind!r}")


def train(
    param: torch.nn.Parameter,
    optimizer: torch.optim.Optimizer,
    indices: list[int],
    scheduler=None,
    *,
    nan_at: int | None = None,
    on_step: Callable[[int], None] | None = None,
) -> torch.nn.Parameter:
    """Run one optimizer step per index: ``x.grad = g``; ``optimizer.step()``; ``scheduler.step()``.

    ``nan_at`` (0-based step index) replaces that step's gradient by NaN. ``on_step(k)`` is called after step k
    (0-based) — e.g. to checkpoint. Returns ``param``.
    """
    for k, i in enumerate(indices):
        with torch.no_grad():
            g = stochastic_gradient(param.detach(), i)
            if nan_at is not None and k == nan_at:
                g = torch.full_like(g, float("nan"))
        param.grad = g
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if on_step is not None:
            on_step(k)
    return param


def run(kind: str, steps: int, seed: int, *, tracker_factory=None, nan_at: int | None = None):
    """Fresh problem + optimizer of ``kind``, ``steps`` steps with seed ``seed``.

    ``tracker_factory(optimizer)`` builds the tracker (attached before the first step). Returns
    ``(param, optimizer, tracker)``.
    """
    param = make_param()
    opt, sched = make_optimizer(kind, param)
    tracker = tracker_factory(opt) if tracker_factory is not None else None
    train(param, opt, draw_indices(steps, seed), sched, nan_at=nan_at)
    return param, opt, tracker
