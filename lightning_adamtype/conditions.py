"""The per-step math of the convergence conditions, on lists of tensors (multi-tensor ``torch._foreach_*``).

For one parameter group at step t, with η_t the effective stepsizes and g_t the gradients consumed:

    a_t  = min_j η_{t,j}                      (accumulates to A_T)
    b_t  = ‖η_t ⊙ g_t‖₂²                      (accumulates to B_T)
    c_t  = ‖η_t − η_{t−1}‖₁                   (accumulates to C_T; coordinates seen at both steps)
    c2_t = ‖η_t − η_{t−1}‖₂²                  (accumulates to C2_T)
    s_t  = Σ_j η_{t,j}                        (for the per-coordinate view: mean η = s_t / n_t)

Nothing here moves a number to the host; every result is a 0-dim tensor on the tensors' device, in float64
where the device supports it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["accumulator_dtype", "min_stepsize", "squared_step_norm", "oscillation", "stepsize_sum"]


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 for accumulators, except on devices without it (MPS), where float32 is used."""
    return torch.float32 if device.type == "mps" else torch.float64


def _sum(values: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.stack(list(values)).to(dtype).sum()  # P4: one cast


def min_stepsize(etas: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """min_j η_j over all coordinates of all tensors: −max_j(−η_j)."""
    return -_sum_max(torch._foreach_neg(list(etas)), dtype)


def _sum_max(values: list[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.stack(torch._foreach_max(values)).max().to(dtype)  # P4: one cast


def stepsize_sum(etas: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """Σ_j η_j (η ≥ 0, so this is the 1-norm)."""
    return _sum(torch._foreach_norm(list(etas), 1), dtype)


def squared_step_norm(
    etas: Sequence[Tensor], grads: Sequence[Tensor], dtype: torch.dtype, out: Sequence[Tensor | None] | None = None
) -> Tensor:
    """‖η ⊙ g‖₂² = Σ_j (η_j g_j)², summed over the tensors.

    ``out``: optional scratch buffers (one per tensor, or None) that receive η ⊙ g instead of a fresh tensor.
    """
    if not etas:
        return torch.zeros((), dtype=dtype)
    if out is None:
        out = [None] * len(etas)
    steps = [
        torch.mul(e, g.to(e.dtype), out=buf) if buf is not None else e * g.to(e.dtype)
        for e, g, buf in zip(etas, grads, out)
    ]
    return _sum_squares(torch._foreach_norm(steps, 2), dtype)


def _sum_squares(norms: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.stack(list(norms)).to(dtype).square().sum()  # P4: one cast


def oscillation(etas: Sequence[Tensor], previous: Sequence[Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(‖η − η_prev‖₁, ‖η − η_prev‖₂², the differences η − η_prev), summed over the tensors."""
    diffs = torch._foreach_sub(list(etas), list(previous))
    l1 = _sum(torch._foreach_norm(diffs, 1), dtype)
    l2sq = _sum_squares(torch._foreach_norm(diffs, 2), dtype)
    return l1, l2sq, diffs
