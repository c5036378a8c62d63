"""Feeding a group's two trend detectors (:class:`lightning_adamtype.trend.TrendDetector`) after an observed step.

The verdicts compare an accumulated sum with A = Σ min η: variance (B/A → 0, the paper's condition on Σ‖η g‖²) and
bias (C/A → 0, on Σ‖η_t − η_{t−1}‖₁). Each is read through the windowed increment ratio
(N(T) − N(S)) / (A(T) − A(S)), S ≈ T/2 (:mod:`lightning_adamtype.increments`), on the optimizer's own step clock T,
so a tracker attached at step 300 reads, from step 600 on, the windows a tracker attached at step 1 reads.
"""

from __future__ import annotations

import torch

from .group_state import GroupState
from .row import ACCUMULATOR_KEYS
from .trend import TrendDetector, TrendOptions

__all__ = ["VERDICTS", "update_verdicts"]

#: the two verdicts and the accumulated sum each compares with A: variance (B/A → 0) and bias (C/A → 0)
VERDICTS = {"variance": "b", "bias": "c"}


def update_verdicts(state: GroupState, observe_every: int, options: TrendOptions) -> bool:
    """Advance the group's clock T = clock_offset + k·count (k = ``observe_every``), snapshot its accumulators for
    the windows, and feed each detector that is due (host integers decide; no host read) with its windowed ratio
    (N(T) − N(S)) / (A(T) − A(S)), NaN after a non-finite step (an invalid sample, not a frozen ratio). True when
    a detector took a sample."""
    acc = state.accumulators
    assert acc is not None
    clock = state.clock = state.clock_offset + observe_every * state.count
    state.window.observe(clock, acc)
    if not state.detectors:
        state.detectors = {k: TrendDetector(options, device=acc.device, dtype=acc.dtype) for k in VERDICTS}
    sampled = False
    for kind, key in VERDICTS.items():
        detector = state.detectors[kind]
        if clock >= detector.next_sample_step and clock > detector.last_step:
            ratio = state.window.increment_ratio(clock, acc, ACCUMULATOR_KEYS.index(key), ACCUMULATOR_KEYS.index("a"))
            if state.last_finite is not None:
                ratio = torch.where(state.last_finite, ratio, torch.full_like(ratio, float("nan")))
            sampled |= detector.update(clock, ratio)
    return sampled
