"""Counting host reads of tensors during ``optimizer.step()`` (a helper for the tests, not a test module).

A host read (``Tensor.item`` / ``tolist`` / ``__bool__`` / ``__float__`` / ``__int__``) of a device tensor
synchronises the device with the host. :class:`ReadCounter` patches those methods of ``torch.Tensor`` and records
each call made while :meth:`ReadCounter.watching` is active; the tests wrap the whole public ``optimizer.step()``
call in it, so the optimizer's own step and every hook of the tracker (pre- and post-step) are watched.
:func:`allowed_ids` names what the optimizers themselves read for free (their 0-dim CPU step counters and CPU
tensor learning rates).

:func:`leaky_adam` registers, for its ``with`` block, an adapter for :class:`LeakyAdam` (``torch.optim.Adam``) that
reads a sum of the optimizer state on the host once per group and step: the tests use it to show that the guards
built on this module are not vacuous.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lightning_adamtype import TrendOptions, register_adapter, registered_adapters, unregister_adapter

__all__ = ["NO_SAMPLES", "READS", "LeakyAdam", "ReadCounter", "allowed_ids", "detector_samples", "leaky_adam"]

#: the Tensor methods that copy a value to the host
READS = ("item", "tolist", "__bool__", "__float__", "__int__")

#: no trend-detector sample before step 1000, so every step of a short run is a "non-logging" step
NO_SAMPLES = TrendOptions(warmup=1000)


class ReadCounter:
    """Patches the host-reading Tensor methods (through ``monkeypatch``, so they are restored after the test) and
    records ``(method, tensor)`` for each call made while :meth:`watching` is active."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.depth = 0
        self.calls: list[tuple[str, torch.Tensor]] = []
        for name in READS:
            original = getattr(torch.Tensor, name)

            def wrapper(t, *args, _name=name, _original=original, **kwargs):
                if self.depth:
                    self.calls.append((_name, t))
                return _original(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, wrapper)

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Record the host reads made inside the ``with`` block (wrap ``optimizer.step()`` in it)."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """``optimizer.step(*args, **kwargs)``, watched."""
        with self.watching():
            return optimizer.step(*args, **kwargs)

    def bad(self, optimizer: torch.optim.Optimizer) -> list[tuple[str, tuple[int, ...], torch.dtype, str]]:
        """The recorded reads of anything but what :func:`allowed_ids` allows: (method, shape, dtype, device)."""
        allowed = allowed_ids(optimizer)
        return [(name, tuple(t.shape), t.dtype, t.device.type) for name, t in self.calls if id(t) not in allowed]


def allowed_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    """ids of the optimizer's own 0-dim CPU step counters (and NAdam's mu_product) and CPU tensor learning rates:
    torch's optimizers read those on the host themselves, and reading them never synchronises a device."""
    allowed = set()
    for state in optimizer.state.values():
        for key in ("step", "mu_product"):
            t = state.get(key)
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dim() == 0:
                allowed.add(id(t))
    for group in optimizer.param_groups:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and lr.device.type == "cpu" and lr.dim() == 0:
            allowed.add(id(lr))
    return allowed


def detector_samples(tracker: Any) -> int:
    """How many samples the tracker's trend detectors have taken, over all groups (from its public checkpoint)."""
    return sum(d["count"] for g in tracker.state_dict()["groups"] for d in g["detectors"].values())


class LeakyAdam(torch.optim.Adam):
    """``torch.optim.Adam``, measured through :class:`LeakyAdamAdapter` inside :func:`leaky_adam`."""


class LeakyAdamAdapter:
    """Adam's own adapter, except that its ``sqrt_form`` (called once per group and observed step) first reads
    ``float(exp_avg_sq.sum())`` of the group's first parameter: one host read (on a GPU, a synchronisation)."""

    def __init__(self) -> None:
        self.inner = registered_adapters()[torch.optim.Adam]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def effective_stepsizes(self, group, states):
        return self.inner.effective_stepsizes(group, states)

    def coupled_weight_decay(self, group) -> float:
        return self.inner.coupled_weight_decay(group)

    def sqrt_form(self, group, states):
        float(states[0]["exp_avg_sq"].sum())
        return self.inner.sqrt_form(group, states)


@contextlib.contextmanager
def leaky_adam() -> Iterator[type[LeakyAdam]]:
    """:class:`LeakyAdam` with :class:`LeakyAdamAdapter` registered for the ``with`` block (unregistered after)."""
    register_adapter(LeakyAdam, LeakyAdamAdapter())
    try:
        yield LeakyAdam
    finally:
        unregister_adapter(LeakyAdam)
