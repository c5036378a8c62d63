"""Switching an Adam/AdamW group to AMSGrad in place when its bias verdict says violation.

A pure piece: it reads a verdict, agrees on it across ranks, and asks the adapter to switch. The tracker calls it
only at trend-sample steps (the only steps at which a verdict can change).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["agreed_violation", "current_stepsizes", "maybe_switch", "switch_to_amsgrad"]


def agreed_violation(detector: Any) -> bool:
    """The bias verdict as one host bool (one byte read); under ``torch.distributed`` rank 0's, broadcast, so that
    every rank switches at the same step."""
    flag = detector.violation.to(torch.uint8).reshape(1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "gloo":
            flag = flag.cpu()
        torch.distributed.broadcast(flag, src=0)
    return bool(flag)


def switch_to_amsgrad(optimizer: torch.optim.Optimizer, adapter: Any, group: dict[str, Any]) -> str | None:
    """Switch ``group`` to AMSGrad through ``adapter.enable_amsgrad``; returns why it cannot (None when it did, or
    when the group runs AMSGrad already)."""
    enable = getattr(adapter, "enable_amsgrad", None)
    if not callable(enable):
        return f"{type(optimizer).__name__} cannot switch to AMSGrad (only Adam and AdamW can); it is left alone"
    if not group.get("amsgrad", False):
        enable(optimizer, group)
    return None


def reason(slope: float, margin: float, patience: int) -> str:
    """The message of a switch event."""
    return (
        f"bias ratio C/A is not going to 0: log-log slope {slope:.3f} > -{margin} for {patience} samples in a row"
    )


def current_stepsizes(optimizer: torch.optim.Optimizer, adapter: Any, group: dict[str, Any]) -> list[tuple[Any, Tensor]]:
    """(parameter, signed η_t) for every parameter of ``group`` with optimizer state, read now through the adapter:
    η_t where the coordinate is active, −η_t where it is not (the sign convention of :mod:`lightning_adamtype.row`)."""
    with_state = [p for p in group["params"] if optimizer.state.get(p)]
    if not with_state:
        return []
    states = [optimizer.state[p] for p in with_state]
    etas = adapter.effective_stepsizes(group, states)
    activity_fn = getattr(adapter, "activity", None)
    if callable(activity_fn):
        etas = [torch.where(a > 0, e, -e) for a, e in zip(activity_fn(group, states), etas)]
    return list(zip(with_state, etas))


def maybe_switch(optimizer: torch.optim.Optimizer, adapter: Any, state: Any, name: str, switched: dict[str, int],
                 events: list[tuple[str, int, str]], options: Any, memory: Any) -> str | None:
    """Switch group ``name`` (its :class:`lightning_adamtype.group_state.GroupState` ``state``) to AMSGrad when its
    bias verdict, agreed across ranks, says violation and it was not switched before: ``switched[name]`` = the first
    optimizer step run as AMSGrad (the verdicts' clock), an event (name, step, reason) appended to ``events``; in
    recomputed mode the group then stores η_{t−1} in ``memory`` (a running max cannot be undone), seeded with η_t.
    Returns why it cannot switch (``switched[name]`` = −1 then), else None."""
    if name in switched or state.group is None:
        return None
    detector = state.detectors["bias"]
    if not agreed_violation(detector):
        return None
    was_amsgrad = state.group.get("amsgrad", False)
    why_not = switch_to_amsgrad(optimizer, adapter, state.group)
    if why_not is not None:
        switched[name] = -1
        return why_not
    if was_amsgrad:
        return None
    if options.previous_stepsize == "recomputed":
        state.kept = None
        for p, eta in current_stepsizes(optimizer, adapter, state.group):
            memory.store(p, eta)
    step = state.clock + 1
    switched[name] = step
    trend = options.trend
    events.append((name, step, reason(float(detector.slope), trend.margin, trend.patience)))
    return None

