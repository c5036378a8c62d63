"""The accumulator row of one parameter group: declared once, everything else derives from it.

A backend reduces one observed step of one group to five **terms** (:data:`TERM_KEYS`), in float64:

    min_eta = min_j η_{t,j}          b  = Σ_j (η_{t,j} g_{t,j})²          eta_sum = Σ_j η_{t,j}
    c       = Σ_j |η_{t,j} − η_{t−1,j}|       c2 = Σ_j (η_{t,j} − η_{t−1,j})²   (coordinates with an η_{t−1})

together with the coordinate counts n (coordinates that stepped) and n' (those with an η_{t−1}). The group's
accumulators (:data:`ACCUMULATOR_KEYS`, one device tensor) then add, for a finite step, weighted by k
(``observe_every``):

    k · [1, min_eta, b, c, c2, eta_sum / n, c / n', 0]           (c / n' is 0 when n' = 0)

and, for a step with a NaN/Inf anywhere, ``[0, …, 0, 1]`` (counted under ``nonfinite_steps``, left out of every
sum). A step that a GradScaler skipped inside a fused optimizer adds nothing. :func:`add_step` is that definition;
the one-pass kernels (:mod:`lightning_adamtype.backends.native`, :mod:`lightning_adamtype.backends.triton`) do the
same inside their launch, and the tests check them against :func:`add_step`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ACCUMULATOR_KEYS", "TERM_KEYS", "accumulator_dtype", "add_step", "new_accumulators", "row_of"]

#: what a group accumulates, in this order, in one device tensor
ACCUMULATOR_KEYS = ("steps", "a", "b", "c", "c2", "a_mean", "c_mean", "nonfinite_steps")
#: the five per-step terms a backend computes, in this order
TERM_KEYS = ("min_eta", "b", "c", "c2", "eta_sum")


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64, except on devices without it (MPS), where float32 is used."""
    return torch.float32 if device.type == "mps" else torch.float64


def new_accumulators(device: torch.device) -> Tensor:
    """A zero accumulator row on ``device``."""
    return torch.zeros(len(ACCUMULATOR_KEYS), dtype=accumulator_dtype(device), device=device)


def row_of(terms: Tensor, n: Tensor | float, n_previous: Tensor | float) -> Tensor:
    """[1, min_eta, b, c, c2, eta_sum / n, c / n', 0] from the five ``terms`` (c / n' = 0 when n' = 0)."""
    one = torch.ones(1, dtype=terms.dtype, device=terms.device)
    c = terms[2:3]
    if isinstance(n_previous, Tensor):
        c_mean = torch.where(n_previous > 0, c / n_previous.clamp_min(1), torch.zeros_like(c))
    else:
        c_mean = c / n_previous if n_previous > 0 else torch.zeros_like(c)
    return torch.cat([one, terms[0:4], terms[4:5] / n, c_mean.reshape(1), torch.zeros_like(one)])


_NONFINITE: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _nonfinite_row(dtype: torch.dtype, device: torch.device) -> Tensor:
    """[0, …, 0, 1]: what a non-finite step adds (made once per dtype and device, not at every step)."""
    key = (dtype, device)
    if key not in _NONFINITE:
        row = torch.zeros(len(ACCUMULATOR_KEYS), dtype=dtype, device=device)
        row[-1] = 1.0  # a fill kernel on accelerators, no host sync
        _NONFINITE[key] = row
    return _NONFINITE[key]


def add_step(
    accumulators: Tensor,
    terms: Tensor,
    n: Tensor | float,
    n_previous: Tensor | float,
    weight: float = 1.0,
    skipped: Tensor | None = None,
) -> Tensor:
    """Add one observed step to ``accumulators`` (in place, on the device, no host read); returns the bool
    0-dim tensor "the step was finite" (or skipped, so that a trend detector does not read it as NaN).

    ``skipped``: a device bool/number flag (a GradScaler's ``found_inf``) whose step adds nothing at all."""
    row = row_of(terms.to(accumulators.dtype), n, n_previous)
    finite = torch.isfinite(row).all()
    row = torch.where(finite, row * weight, _nonfinite_row(row.dtype, row.device))
    if skipped is not None:
        skip = skipped.to(accumulators.device).reshape(()) > 0
        row = row.masked_fill(skip, 0.0)
        finite = finite | skip
    accumulators.add_(row)
    return finite
