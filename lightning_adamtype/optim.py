"""AdaFom: the algorithm proposed by Chen, Liu, Sun & Hong (ICLR 2019): AdaGrad's second moment with momentum.

    m_t = β1 m_{t−1} + (1 − β1) g_t
    v̂_t = (1/t) Σ_{s≤t} g_s²
    x_{t+1} = x_t − α_t m_t / sqrt(v̂_t),   α_t = lr / √t

so the effective stepsize is η_t = lr / (sqrt(Σ_{s≤t} g_s²) + eps) (eps added for numerical safety, as in
torch's Adagrad). It satisfies both convergence conditions of the paper; it is monitored like the others.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from .adapter_kit import group_lr, scale_over_denominator, sqrt_plus_eps
from .adapters import register_adapter

__all__ = ["AdaFom", "AdaFomAdapter"]


class AdaFom(torch.optim.Optimizer):
    """AdaFom (Chen et al., ICLR 2019): x ← x − lr · m_t / (sqrt(Σ_{s≤t} g_s²) + eps), m_t = EMA_β1(g).

    Args:
        params: parameters or parameter groups.
        lr: α in α_t = α/√t (so η_t = lr / (sqrt(Σ g²) + eps)).
        beta1: first-moment coefficient β1 ∈ [0, 1).
        eps: added to the denominator.
        weight_decay: coupled L2 penalty (g ← g + λx).
        foreach: use the multi-tensor implementation (default: True when all params are on CUDA/CPU tensors).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        beta1: float = 0.9,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
    ) -> None:
        if not 0.0 < lr:
            raise ValueError(f"AdaFom(lr={lr!r}): expected lr > 0")
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"AdaFom(beta1={beta1!r}): expected 0 <= beta1 < 1")
        if not 0.0 <= eps:
            raise ValueError(f"AdaFom(eps={eps!r}): expected eps >= 0")
        if not 0.0 <= weight_decay:
            raise ValueError(f"AdaFom(weight_decay={weight_decay!r}): expected weight_decay >= 0")
        super().__init__(params, dict(lr=lr, beta1=beta1, eps=eps, weight_decay=weight_decay, foreach=foreach))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One AdaFom step for every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, sums, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdaFom does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["sum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                sums.append(state["sum"])
                steps.append(state["step"])
            if not params:
                continue
            foreach = group["foreach"]
            if foreach is None:
                foreach = all(p.device.type in ("cpu", "cuda") for p in params)
            (_multi_tensor_adafom if foreach else _single_tensor_adafom)(
                params, grads, exp_avgs, sums, steps, lr=group["lr"], beta1=group["beta1"], eps=group["eps"],
                weight_decay=group["weight_decay"],
            )
        return loss


def _single_tensor_adafom(params, grads, exp_avgs, sums, steps, *, lr, beta1, eps, weight_decay) -> None:
    for p, g, m, s, t in zip(params, grads, exp_avgs, sums, steps):
        t += 1
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        m.lerp_(g, 1 - beta1)
        s.addcmul_(g, g, value=1)
        p.addcdiv_(m, s.sqrt().add_(eps), value=-lr)


def _multi_tensor_adafom(params, grads, exp_avgs, sums, steps, *, lr, beta1, eps, weight_decay) -> None:
    torch._foreach_add_(steps, 1)
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_addcmul_(sums, grads, grads, value=1)
    denom = torch._foreach_sqrt(sums)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr)


class AdaFomAdapter:
    """AdaFom: η_t = lr / (sqrt(Σ_{s≤t} g_s²) + eps) (α_t = lr/√t, v̂_t = mean of g²); weight decay is coupled."""

    def effective_stepsizes(self, group: dict[str, Any], states: list[dict[str, Any]]) -> list[Tensor]:
        denominators = sqrt_plus_eps([s["sum"] for s in states], group["eps"])
        return scale_over_denominator([group_lr(group)] * len(states), denominators)

    def coupled_weight_decay(self, group: dict[str, Any]) -> float:
        return float(group.get("weight_decay", 0.0))


register_adapter(AdaFom, AdaFomAdapter())  # type: ignore[arg-type]
