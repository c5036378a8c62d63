"""The options that :class:`~lightning_adamtype.ConditionTracker` and
:class:`~lightning_adamtype.AdamTypeMonitor` share, declared and validated once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .trend import TrendOptions

__all__ = ["COORDINATES", "KERNELS", "PREVIOUS_STEPSIZES", "TrackerOptions"]

#: ``kernel=`` values and what each selects (the backends live in :mod:`lightning_adamtype.backends`)
KERNELS = {
    "auto": "default: 'triton' on CUDA groups when Triton is installed, 'native' on CPU groups when the C kernel "
    "builds, else 'foreach'",
    "foreach": "the reference multi-tensor backend (every optimizer, dtype and device)",
    "native": "one C call per group (CPU, square-root-form optimizers with float32 or float64 state)",
    "triton": "two Triton launches per group (CUDA, square-root-form optimizers with float32 state)",
}
#: ``previous_stepsize=`` values
PREVIOUS_STEPSIZES = {
    "stored": "default, 4 bytes per coordinate",
    "recomputed": "no per-coordinate memory; Adam/AdamW/Adagrad/RMSprop",
}
#: ``coordinates=`` values: which coordinates a, b, c, c2 sum over
COORDINATES = {
    "active": "default: coordinates from their first non-zero gradient on (v > 0), the step at which a coordinate "
    "becomes active left out of c and c2 (the paper's assumption |g_1,j| > 0)",
    "all": "every coordinate that stepped, as the paper's formulas are written (eps and never-trained coordinates "
    "included)",
}


def _choice(owner: str, option: str, value: Any, allowed: dict[str, str]) -> None:
    if not isinstance(value, str) or value not in allowed:
        choices = ", ".join(f"{k!r} ({why})" for k, why in allowed.items())
        raise ValueError(f"{owner}({option}={value!r}): expected one of {choices}")


def _positive_int(owner: str, option: str, value: Any, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}({option}={value!r}): expected a positive int ({meaning})")


@dataclass(frozen=True)
class TrackerOptions:
    """How a tracker measures and acts (see :class:`~lightning_adamtype.ConditionTracker` for each option).

    Validated by :meth:`validated`, which names the owner, the option, the bad value and what is allowed."""

    switch_to_amsgrad: bool = False
    trend: TrendOptions | None = None
    kernel: str = "auto"
    previous_stepsize: str = "stored"
    observe_every: int = 1
    coordinates: str = "active"
    start_step: int = 1

    def validated(self, owner: str) -> "TrackerOptions":
        """``self`` with ``trend`` filled in; ValueError naming the bad option and the fix otherwise."""
        if not isinstance(self.switch_to_amsgrad, bool):
            raise ValueError(f"{owner}(switch_to_amsgrad={self.switch_to_amsgrad!r}): expected True or False")
        if self.trend is not None and not isinstance(self.trend, TrendOptions):
            raise ValueError(f"{owner}(trend={self.trend!r}): expected a lightning_adamtype.TrendOptions or None")
        _choice(owner, "kernel", self.kernel, KERNELS)
        _choice(owner, "previous_stepsize", self.previous_stepsize, PREVIOUS_STEPSIZES)
        _positive_int(
            owner, "observe_every", self.observe_every, "1, the default, observes every step; k > 1 observes the step "
            "pair (t − 1, t) for every t divisible by k and weighs it by k",
        )
        _choice(owner, "coordinates", self.coordinates, COORDINATES)
        _positive_int(
            owner, "start_step", self.start_step, "1, the default, observes from the first optimizer step; N > 1 "
            "ignores the first N − 1 steps, as if the tracker were attached at step N",
        )
        return dataclasses.replace(self, trend=self.trend or TrendOptions())

    def as_kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments of :class:`~lightning_adamtype.ConditionTracker`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
