"""Windowed increments of a group's cumulative sums: the transient-free ratios the verdicts are read from.

A ratio of cumulative sums, C(T)/A(T), remembers every step since the tracker started: on a real network 94 % of C
is collected in the first ten steps, so C/A falls like 1/T for every optimizer and says nothing about the late run
(design notes §4). The verdicts therefore read the ratio of the *increments* over the second half of the run so far,

    r_B(T) = (B(T) − B(S)) / (A(T) − A(S)),      r_C(T) = (C(T) − C(S)) / (A(T) − A(S)),      S ≈ T/2,

which tends to 0 when B/A (or C/A) does and forgets everything before T/2, so a verdict does not depend on whether
the tracker was attached at step 1 or later. :class:`IncrementWindow` keeps snapshots of the cumulative row at the
steps ceil(10^(n/16)) (16 per decade, from step 1) in a small device ring covering the last factor of two; S is
the newest snapshot at or before T/2 (within 16 % of it). Host ints choose the slots; nothing here reads the device.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["IncrementWindow", "POINTS_PER_DECADE"]

#: density of the snapshot grid
POINTS_PER_DECADE = 16
#: snapshots kept: more than the grid points in a factor of two (16·log10(2) ≈ 4.8), with margin for ceil rounding
_SLOTS = 8


def _grid(n: int) -> int:
    return max(1, math.ceil(10.0 ** (n / POINTS_PER_DECADE) - 1e-9))


class IncrementWindow:
    """Snapshots of a cumulative row at log-spaced steps; :meth:`increment_ratio` reads the windowed ratio."""

    def __init__(self) -> None:
        self._index = 0  # next grid index
        self._next = 1  # next snapshot step
        self._steps: list[int] = []  # host: the step of each stored snapshot, oldest first (at most _SLOTS)
        self._ring: Tensor | None = None
        self._slots: list[int] = []  # ring slot of each stored snapshot
        self._written = 0

    def observe(self, step: int, row: Tensor) -> None:
        """Called after every observed step with the cumulative ``row`` (any 1-D device tensor): keeps a copy when
        ``step`` reaches the next grid point (a device copy, no sync)."""
        if step < self._next:
            return
        while self._next <= step:
            self._index += 1
            self._next = _grid(self._index)
        if self._ring is None or self._ring.shape[1:] != row.shape or self._ring.device != row.device:
            self._ring = torch.zeros((_SLOTS, *row.shape), dtype=row.dtype, device=row.device)
            self._steps, self._slots, self._written = [], [], 0
        slot = self._written % _SLOTS
        self._ring[slot].copy_(row.detach())
        self._written += 1
        self._steps.append(step)
        self._slots.append(slot)
        if len(self._steps) > _SLOTS:
            self._steps.pop(0)
            self._slots.pop(0)

    def base_step(self, step: int) -> int | None:
        """S: the newest snapshot step ≤ step / 2 (None when there is none yet)."""
        found = None
        for s in self._steps:
            if 2 * s <= step:
                found = s
        return found

    def increment_ratio(self, step: int, row: Tensor, numerator: int, denominator: int) -> Tensor:
        """(row[numerator] − S[numerator]) / (row[denominator] − S[denominator]) at ``step`` (0-dim tensor on the
        row's device; NaN when there is no snapshot at or before step / 2, or the denominator's increment is 0)."""
        base = self.base_step(step)
        if base is None or self._ring is None:
            return torch.full((), math.nan, dtype=row.dtype, device=row.device)
        old = self._ring[self._slots[self._steps.index(base)]]
        den = row[denominator] - old[denominator]
        ratio = (row[numerator] - old[numerator]) / torch.where(den > 0, den, torch.ones_like(den))
        return torch.where(den > 0, ratio, torch.full_like(ratio, math.nan))

    def state_dict(self) -> dict[str, Any]:
        return {"index": self._index, "next": self._next, "steps": list(self._steps), "slots": list(self._slots),
                "written": self._written, "ring": None if self._ring is None else self._ring.detach().clone()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        self._index, self._next = int(state["index"]), int(state["next"])
        self._steps, self._slots = [int(s) for s in state["steps"]], [int(s) for s in state["slots"]]
        self._written = int(state["written"])
        ring = state.get("ring")
        self._ring = None if ring is None else ring.detach().to(device or ring.device).clone()
