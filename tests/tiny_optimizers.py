"""A minimal optimizer the package does not know, for the tests that register an adapter of their own."""

from __future__ import annotations

import torch


class TinyRMS(torch.optim.Optimizer):
    """v ← β·v + (1 − β)·g², x ← x − α_t·g/(√v + eps), with α_t = lr, or lr·√(1 − β^t) when ``corrected``; the
    step count t is a Python int in each parameter's state (a new object every step)."""

    def __init__(self, params, lr=1e-2, beta=0.9, eps=1e-8, corrected=False):
        super().__init__(params, dict(lr=lr, beta=beta, eps=eps, corrected=corrected))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"], state["v"] = 0, torch.zeros_like(p)
                state["step"] += 1
                state["v"].mul_(group["beta"]).addcmul_(p.grad, p.grad, value=1 - group["beta"])
                scale = group["lr"] * ((1 - group["beta"] ** state["step"]) ** 0.5 if group["corrected"] else 1.0)
                p.addcdiv_(p.grad, state["v"].sqrt().add_(group["eps"]), value=-scale)
