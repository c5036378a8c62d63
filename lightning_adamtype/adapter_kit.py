"""What adapters are made of: the protocol, step counters, and the square-root form η = s / (sqrt(v) + e).

An adapter (:class:`OptimizerAdapter`) reads an optimizer's state right after its step and gives η_t per
parameter; most give it as a square-root form, (v per parameter, (s_i, e_i) per parameter) with
η_i = s_i / (sqrt(v_i) + e_i), which the backends read directly. This module holds what every adapter module
(:mod:`.adapters` for torch's optimizers, :mod:`.adapters_torch_extra`, :mod:`.third_party`) and the backends
share; it imports none of them.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Protocol, Sequence

import torch
from torch import Tensor

__all__ = [
    "NotMapped", "OptimizerAdapter", "Scalar", "ScalarTable", "SqrtForm", "device_steps", "from_sqrt_form",
    "group_lr", "host_or_device_sqrt", "host_steps", "min_from_sqrt_form", "scale_over_denominator", "scalar_table",
    "sqrt_plus_eps", "step_value", "times", "to_device", "upcast", "work_dtype",
]

Scalar = float | Tensor
#: (v per parameter, (s, e) per parameter) with η = s / (sqrt(v) + e): see ``sqrt_form`` on the adapters.
SqrtForm = tuple[list[Tensor], Sequence[tuple[Scalar, Scalar]]]


class NotMapped(ValueError):
    """Raised by an adapter for a group whose settings it does not map onto the template (a known limit, not a
    failure): the tracker stops measuring that group with one warning that gives the message, and training goes on."""


class ScalarTable(Sequence):
    """The (s_i, e_i) of a square-root form held as one ``[n, 2]`` tensor: what an adapter returns when the step
    counters live on the device (fused or capturable optimizers), computed for all parameters in a few operations
    instead of several per parameter. Reads as a sequence of (s, e) pairs of 0-dim views; :func:`scalar_table`
    returns the tensor itself."""

    def __init__(self, table: Tensor) -> None:
        self.table = table

    def __len__(self) -> int:
        return self.table.shape[0]

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = self.table[index]
        return (row[0], row[1])


def device_steps(states: Sequence[dict[str, Any]]) -> Tensor | None:
    """The step counters of ``states`` as one float32 vector, clamped to ≥ 1 as :func:`step_value` does, when every
    one is a tensor on one accelerator; None otherwise (host counters are read as floats, one by one)."""
    first = states[0]["step"] if states else None
    if not isinstance(first, Tensor) or first.is_cpu:  # host counters (the common case), decided on the first one
        return None
    steps = [s["step"] for s in states]
    if not all(isinstance(t, Tensor) and not t.is_cpu for t in steps):
        return None
    if len({t.device for t in steps}) != 1:
        return None
    return torch.stack(steps).to(torch.float32).clamp_min(1.0)


class OptimizerAdapter(Protocol):
    """What the tracker needs to know about one optimizer family."""

    def effective_stepsizes(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[Tensor]:
        """η_t for each parameter (same shape as the parameter), read from the state after the step.

        Returned tensors may be freshly allocated; the tracker owns them afterwards.
        """

    def coupled_weight_decay(self, group: dict[str, Any]) -> float:
        """The weight decay λ that the optimizer adds to the gradient (g = ∇ + λ·p), 0.0 if none or decoupled."""

    # Optional: ``scalars_by_step = True``: the (s, e) of ``sqrt_form`` depend on a parameter's state only through its
    # step count t (and on the group), so a group's repeat step may take them from one state per distinct t
    # (:mod:`lightning_adamtype.backends.steady`).
    # Optional: ``activity(group, states) -> list[Tensor]``: per parameter, a tensor whose entries are > 0 exactly
    # where the coordinate has had a non-zero gradient (its second moment, say). Adapters with ``sqrt_form`` need
    # none (v > 0 is used); without either, every coordinate counts as active.
    # Optional: ``consumed_gradients(group, states, grads) -> list[Tensor]``: g_t per parameter from the gradients the
    # tracker gathered (``p.grad``), called once per step before ``activity`` and ``effective_stepsizes``.
    # Optional: ``sparse_gradients = True``: parameters with sparse gradients (``p.grad.is_sparse``) are measured
    # (else the tracker leaves them out, with one warning); the adapter's ``consumed_gradients`` must return them dense
    # (every backend reads dense g), and its ``activity`` says which coordinates stepped (see SparseAdamAdapter).


def step_value(state: dict[str, Any]) -> Scalar:
    """The optimizer step count t of one parameter's state, as a Python float when it lives on the CPU.

    A CPU scalar is read without a device synchronisation; a device tensor (fused or capturable optimizers)
    is returned as a tensor so that the arithmetic stays on the device.
    """
    step = state["step"]
    # A state still at step 0 (its first step was skipped by a GradScaler inside a fused optimizer) reads as step 1:
    # the bias corrections 1 − β^t stay finite, and that step is masked out of every sum anyway.
    if isinstance(step, Tensor):
        if step.is_cpu:
            return max(float(step), 1.0)
        return (step.to(torch.float32) if not step.is_floating_point() else step).clamp_min(1.0)
    return max(float(step), 1.0)


_step_of = operator.itemgetter("step")
_is_cpu = operator.attrgetter("is_cpu")


def host_steps(states: Sequence[dict[str, Any]]) -> list[float] | None:
    """The step counts t (clamped to ≥ 1, as :func:`step_value`) of states whose counters are numbers or CPU tensors,
    read in C-level passes; None when some counter lives on an accelerator (reading it would synchronise)."""
    steps = list(map(_step_of, states))
    kinds = set(map(type, steps))
    if kinds <= {float, int} or (kinds == {Tensor} and all(map(_is_cpu, steps))):
        values = list(map(float, steps))
        if values and min(values) < 1.0:
            values = [max(v, 1.0) for v in values]
        return values
    return None


def group_lr(group: dict[str, Any]) -> Scalar:
    lr = group["lr"]
    if isinstance(lr, Tensor):
        return float(lr) if lr.device.type == "cpu" else lr
    return float(lr)


def work_dtype(t: Tensor) -> torch.dtype:
    """Effective stepsizes are computed in at least float32 (bf16/fp16 state is upcast)."""
    return torch.promote_types(t.dtype, torch.float32)


def upcast(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [t.to(work_dtype(t)) if t.dtype != work_dtype(t) else t for t in tensors]


def scale_over_denominator(
    numerators: Sequence[Scalar], denominators: list[Tensor]
) -> list[Tensor]:
    """η_i = s_i / d_i for per-parameter scalars s_i (floats or 0-dim tensors), in place on ``denominators``."""
    torch._foreach_reciprocal_(denominators)
    if all(isinstance(s, float) for s in numerators):
        torch._foreach_mul_(denominators, list(numerators))  # type: ignore[arg-type]
    else:
        device = denominators[0].device
        torch._foreach_mul_(
            denominators,
            [s if isinstance(s, Tensor) else to_device(s, None, device) for s in numerators],
        )
    return denominators


def sqrt_plus_eps(tensors: Sequence[Tensor], eps: float, divisors: Sequence[Scalar] | None = None) -> list[Tensor]:
    """sqrt(v_i) / c_i + eps with fresh output tensors (the optimizer's state is never written)."""
    out = torch._foreach_sqrt(upcast(tensors))
    if divisors is not None:
        if all(isinstance(c, float) for c in divisors):
            torch._foreach_div_(out, list(divisors))  # type: ignore[arg-type]
        else:
            device = out[0].device
            torch._foreach_div_(out, [c if isinstance(c, Tensor) else to_device(c, None, device) for c in divisors])
    torch._foreach_add_(out, eps)
    return out  # type: ignore[return-value,arg-type]


def from_sqrt_form(vs: Sequence[Tensor], scalars: Sequence[tuple[Scalar, Scalar]]) -> list[Tensor]:
    """η_i = s_i / (sqrt(v_i) + e_i) with fresh output tensors: sqrt, + e, 1/·, × s (4 multi-tensor passes)."""
    out = torch._foreach_sqrt(upcast(vs))
    offsets = [e for _, e in scalars]
    scales = [s for s, _ in scalars]
    if all(isinstance(e, float) for e in offsets) and len(set(offsets)) == 1:
        torch._foreach_add_(out, offsets[0])
    elif all(isinstance(e, float) for e in offsets):
        torch._foreach_add_(out, offsets)  # type: ignore[arg-type]
    else:
        device = out[0].device
        torch._foreach_add_(out, [e if isinstance(e, Tensor) else to_device(e, None, device) for e in offsets])
    torch._foreach_reciprocal_(out)
    if all(isinstance(s, float) for s in scales) and len(set(scales)) == 1:
        torch._foreach_mul_(out, scales[0])
        return out  # type: ignore[return-value,arg-type]
    return times(out, scales)  # type: ignore[return-value,arg-type]


def times(tensors: list[Tensor], scales: Sequence[Scalar]) -> list[Tensor]:
    if all(isinstance(s, float) for s in scales):
        torch._foreach_mul_(tensors, list(scales))  # type: ignore[arg-type]
    else:
        device = tensors[0].device
        torch._foreach_mul_(tensors, [s if isinstance(s, Tensor) else to_device(s, None, device) for s in scales])
    return tensors


def min_from_sqrt_form(vs: Sequence[Tensor], scalars: Sequence[tuple[Scalar, Scalar]], dtype: torch.dtype) -> Tensor:
    """min_i s_i / (sqrt(max_j v_ij) + e_i), in ``dtype``, from one ``_foreach_max`` and a few tiny ops."""
    vmax = torch.stack(torch._foreach_max(list(vs))).to(dtype)
    table = scalar_table(scalars, dtype, vmax.device)
    return (table[:, 0] / (vmax.sqrt() + table[:, 1])).min()


def to_device(values: Any, dtype: torch.dtype | None, device: torch.device) -> Tensor:
    """``torch.tensor(values)`` on ``device`` without a host synchronisation on the step path: built on the host
    and, on an accelerator, copied from pinned memory with ``non_blocking=True`` (a copy from pageable memory
    waits for the stream; the caching host allocator keeps the pinned block until the copy has run)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def scalar_table(scalars: Sequence[tuple[Scalar, Scalar]], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The (s, e) pairs of a square-root form as one [n, 2] tensor: one asynchronous host→device copy when they
    are floats (:func:`to_device`), a stack of the 0-dim tensors otherwise (device step counters or lr)."""
    if isinstance(scalars, ScalarTable):
        return scalars.table.to(device=device, dtype=dtype)
    if all(type(s) is float and type(e) is float for s, e in scalars):
        return to_device(scalars, dtype, device)
    return torch.stack(
        [torch.stack([torch.as_tensor(x, device=device).to(dtype).reshape(()) for x in pair]) for pair in scalars]
    )


def host_or_device_sqrt(x: Scalar) -> Scalar:
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x)
