"""The accumulator row of one parameter group: declared once, everything else derives from it.

A backend reduces one observed step of one group to nine **terms** (:data:`TERM_KEYS`), in float64, over the
*counted* coordinates (``coordinates="active"``, the default: those active at t, i.e. with a non-zero gradient at
some step so far, v_t > 0; ``coordinates="all"``: every coordinate that stepped) and the *pairs* (active: counted
at t and active at t − 1; all: every coordinate with an η_{t−1}):

    min_eta = min_{j counted} η_{t,j}        b = Σ_{j counted} (η_{t,j} g_{t,j})²     eta_sum = Σ_{j counted} η_{t,j}
    c  = Σ_{j pairs} |η_{t,j} − η_{t−1,j}|   c2 = Σ_{j pairs} (η_{t,j} − η_{t−1,j})²
    n_counted, n_pairs                        (how many coordinates each sum ran over)
    activations = #{j with an η_{t−1}: inactive at t − 1, active at t}   inactive = #{j stepped: inactive at t}

so the step at which a coordinate gets its first gradient (η falls by about lr/eps) never enters c or c2 in the
active mode. A backend keeps η_t for the next step with its sign carrying the activity: −η for a coordinate
inactive at t (η > 0 always, so |kept| is η_t).

The group's accumulators (:data:`ACCUMULATOR_KEYS`, one device tensor) then add, for a finite step, weighted by k
(``observe_every``):

    k · [1, min_eta, b, c, c2, eta_sum / n_counted, c / n_pairs, 0, activations]   (a ratio with a zero count is 0,
                                                                                  min_eta is 0 when n_counted = 0)

and set the two *levels* (:data:`LEVEL_KEYS`) to the step's ``[inactive, n]`` (n: coordinates that stepped). A step
with a NaN/Inf anywhere adds ``[0, …, 0, 1, 0]`` (counted under ``nonfinite_steps``, left out of every sum) and
leaves the levels. A step that a GradScaler skipped inside a fused optimizer adds nothing. :func:`add_step` is that
definition; the one-pass kernels (:mod:`lightning_adamtype.backends.native`, :mod:`lightning_adamtype.backends.triton`)
do the same inside their launch, and the tests check them against :func:`add_step`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ACCUMULATOR_KEYS", "LEVEL_KEYS", "ROW_KEYS", "TERM_KEYS", "accumulator_dtype", "add_step", "new_accumulators", "row_of"]

#: what a group adds up, in this order, at the start of its one device tensor
ROW_KEYS = ("steps", "a", "b", "c", "c2", "a_mean", "c_mean", "nonfinite_steps", "activations")
#: what the latest finite step sets (not adds), after the sums: inactive coordinates, coordinates that stepped
LEVEL_KEYS = ("inactive", "coordinates")
#: the group's device tensor: the sums, then the levels
ACCUMULATOR_KEYS = ROW_KEYS + LEVEL_KEYS
#: the nine per-step terms a backend computes, in this order
TERM_KEYS = ("min_eta", "b", "c", "c2", "eta_sum", "n_counted", "n_pairs", "activations", "inactive")


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64, except on devices without it (MPS), where float32 is used."""
    return torch.float32 if device.type == "mps" else torch.float64


def new_accumulators(device: torch.device) -> Tensor:
    """A zero accumulator row on ``device``."""
    return torch.zeros(len(ACCUMULATOR_KEYS), dtype=accumulator_dtype(device), device=device)


def row_of(terms: Tensor) -> Tensor:
    """[1, min_eta, b, c, c2, eta_sum / n_counted, c / n_pairs, 0, activations] from the nine ``terms`` (a ratio
    with a zero count is 0; min_eta is 0 when no coordinate was counted)."""
    one = torch.ones(1, dtype=terms.dtype, device=terms.device)
    counted, pairs = terms[5:6], terms[6:7]
    zero = torch.zeros_like(one)
    a = torch.where(counted > 0, terms[0:1], zero)
    a_mean = torch.where(counted > 0, terms[4:5] / counted.clamp_min(1), zero)
    c_mean = torch.where(pairs > 0, terms[2:3] / pairs.clamp_min(1), zero)
    return torch.cat([one, a, terms[1:4], a_mean, c_mean, zero, terms[7:8]])


_NONFINITE: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _nonfinite_row(dtype: torch.dtype, device: torch.device) -> Tensor:
    """[0, …, 0, 1, 0]: what a non-finite step adds (made once per dtype and device, not at every step)."""
    key = (dtype, device)
    if key not in _NONFINITE:
        row = torch.zeros(len(ROW_KEYS), dtype=dtype, device=device)
        row[ROW_KEYS.index("nonfinite_steps")] = 1.0  # a fill kernel on accelerators, no host sync
        _NONFINITE[key] = row
    return _NONFINITE[key]


def add_step(
    accumulators: Tensor,
    terms: Tensor,
    n: Tensor | float,
    weight: float = 1.0,
    skipped: Tensor | None = None,
) -> Tensor:
    """Add one observed step to ``accumulators`` (in place, on the device, no host read) and set its levels to
    [inactive, n]; returns the bool 0-dim tensor "the step was finite" (or skipped, so that a trend detector does
    not read it as NaN).

    ``n``: the coordinates that stepped. ``skipped``: a device bool/number flag (a GradScaler's ``found_inf``) whose
    step adds nothing at all."""
    terms = terms.to(accumulators.dtype)
    row = row_of(terms)
    finite = torch.isfinite(row).all()
    row = torch.where(finite, row * weight, _nonfinite_row(row.dtype, row.device))
    k = len(ROW_KEYS)
    levels = accumulators[k:]
    count = n.to(terms) if isinstance(n, Tensor) else torch.full_like(terms[8], float(n))
    new_levels = torch.where(finite, torch.stack([terms[8], count.reshape(())]), levels)
    if skipped is not None:
        skip = skipped.to(accumulators.device).reshape(()) > 0
        row = row.masked_fill(skip, 0.0)
        new_levels = torch.where(skip, levels, new_levels)
        finite = finite | skip
    accumulators[:k].add_(row)
    levels.copy_(new_levels)
    return finite
