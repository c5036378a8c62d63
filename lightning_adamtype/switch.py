"""Switching an Adam/AdamW group to AMSGrad in place when its bias verdict says violation.

A pure piece: it reads a verdict, agrees on it across ranks, and asks the adapter to switch. The tracker calls it
only at trend-sample steps (the only steps at which a verdict can change).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["agreed_violation", "current_stepsizes", "switch_to_amsgrad"]


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
