"""What the one-pass backends (:mod:`.native` on the CPU, :mod:`.triton` on CUDA) share.

Both compute, for optimizers whose η_i = s_i / (sqrt(v_i) + e_i), the nine terms of :mod:`lightning_adamtype.row`
of a whole group, and each tensor's share (b_i, c_i, activations_i, inactive_i), in one call that reads every v and
g once (and η_{t−1} once, writing η_t over it). Per coordinate: active at t ⟺ v_t ≠ 0 (v_t > 0, or a NaN, which
then reaches the sums and makes the step non-finite); η is kept signed, −η where the coordinate is inactive. Modes:

- ``FIRST``: no η_{t−1}; the signed η_t is written into the group's flat η buffer;
- ``STORED``: the signed η_{t−1} read from the flat buffer (active at t − 1 ⟺ its sign bit is clear), the signed
  η_t written over it;
- ``CURRENT``: no η_{t−1} and nothing written (recomputed mode, first step);
- ``RECOMPUTED``: η_{t−1} rebuilt from v_t and g_t, v_{t−1} = max((v_t − w·g_t²)/k, 0), active at t − 1 ⟺
  v_{t−1} > :data:`RECOMPUTED_ZERO` · v_t (else v_{t−1} is taken as 0: it was, up to v_t's roundings); the table
  holds (s, e, s', e') per tensor.

Counted (b, min η, Ση): the coordinates active at t (``coordinates="active"``) or all; pairs (c, c2): counted and
active at t − 1, or (``"all"``) every coordinate, with |η_{t−1}|; activations: inactive at t − 1 and active at t;
inactive: v_t = 0. No counted coordinate gives min η = +inf (a neutral element: :func:`lightning_adamtype.row.row_of`
reads it as 0, a sharded group's minimum over ranks skips it).

:class:`FlatEtaLayout` places each tensor's η in the flat buffer; :class:`OnePassBackend` decides the mode, keeps
the buffer (its views are what the tracker stores as each parameter's η_{t−1}, so a step whose η_{t−1} are exactly
those views copies nothing) and calls the launch.
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from ..adapter_kit import scalar_table
from . import GroupStep, StepResult

__all__ = [
    "CURRENT", "FIRST", "RECOMPUTED", "RECOMPUTED_ZERO", "SHARES", "STORED", "FlatEtaLayout", "OnePassBackend",
    "addresses",
]

#: the decline of a step whose parameters do not all have an η_{t−1} (a parameter without a gradient at the previous
#: step): normal and transient, so the tracker does not warn about it
PARTIAL = "only some of its parameters have an η_{t−1}"

#: the launch modes (the C source in :mod:`.native_build` repeats them)
FIRST, STORED, CURRENT, RECOMPUTED = 0, 1, 2, 3

#: recomputed mode: a coordinate counts as inactive at t − 1 when its rebuilt v_{t−1} ≤ this × v_t (v_t − w·g_t² of a
#: coordinate whose first gradient came at t is 0 up to a few roundings of v_t); every backend uses this one value
RECOMPUTED_ZERO = 1e-6

#: per tensor, what a launch's ``per_tensor`` holds: b_i, c_i, activations_i, inactive_i (StepResult.per_tensor)
SHARES = 4


def addresses(tensors: Sequence[Tensor]) -> tuple[int, ...]:
    """The tensors' data pointers (what the launches' address tables hold)."""
    return tuple(map(Tensor.data_ptr, tensors))


@dataclass
class FlatEtaLayout:
    """Tensor i's η at ``offsets[i]`` of one flat buffer, each start rounded up to 4 elements (16-byte aligned)."""

    sizes: tuple[int, ...]
    offsets: list[int] = field(init=False)
    eta_numel: int = field(init=False)

    def __post_init__(self) -> None:
        self.offsets, offset = [], 0
        for n in self.sizes:
            self.offsets.append(offset)
            offset += -(-n // 4) * 4
        self.eta_numel = offset

    def check_launch(self, vs: Sequence[Tensor], gs: Sequence[Tensor], eta: Tensor | None, table: Tensor, mode: int,
                     dtype: torch.dtype = torch.float32) -> None:
        """The kernels read raw addresses: n v's and g's, a contiguous [n, ≥2] table of ``dtype`` (≥4 in RECOMPUTED)
        and, in FIRST / STORED, an η buffer of :attr:`eta_numel` elements; ValueError naming what is wrong else."""
        n, columns = len(self.sizes), 4 if mode == RECOMPUTED else 2
        bad_table = (
            table.dim() != 2 or table.shape[0] != n or table.shape[1] < columns
            or table.dtype != dtype or not table.is_contiguous()
        )
        needs_eta = mode in (FIRST, STORED)
        if len(vs) != n or len(gs) != n or bad_table or (needs_eta and (eta is None or eta.numel() < self.eta_numel)):
            raise ValueError(
                f"a launch for {n} tensors (η buffer of {self.eta_numel}) got {len(vs)} v, {len(gs)} g, a "
                f"{table.dtype} table of shape {tuple(table.shape)} (expected contiguous {str(dtype).replace('torch.', '')}, {n} rows of at "
                f"least {columns} in mode {mode}) and {'no η buffer' if eta is None else f'an η buffer of {eta.numel()}'}"
            )

    def eta_views(self, buffer: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
        """Each tensor's η as a view of the flat buffer, in its parameter's shape."""
        return [buffer.narrow(0, o, n).view(shape) for o, n, shape in zip(self.offsets, self.sizes, shapes)]


def same_objects(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Whether ``a`` and ``b`` hold the same objects (``is``), in the same order."""
    return len(a) == len(b) and all(map(operator.is_, a, b))


_dtype = operator.attrgetter("dtype")
_shape = operator.attrgetter("shape")


class OnePassBackend:
    """The shared part of the native and Triton backends; subclasses set ``name``, ``launch_class``,
    ``device_type`` and :meth:`unavailable`."""

    name = ""
    device_type = ""
    #: the dtypes the kernel takes (v, g and η of one dtype)
    dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    launch_class: Any = None

    def unavailable(self, device: torch.device) -> str | None:  # pragma: no cover - overridden
        raise NotImplementedError

    def decline(self, step: GroupStep) -> str | None:
        """None when the group has a square-root form, contiguous v and g of one of :attr:`dtypes` on this backend's
        device, all or none of its parameters with an η_{t−1}, and no GradScaler flag to apply on the device."""
        if step.form is None:
            return "its effective stepsize is not of the form s / (sqrt(v) + e)"
        if step.activity is not step.form[0]:  # (the kernels read activity from the v they read: v ≠ 0)
            return "its coordinates' activity is not its square-root form's v"
        if step.found_inf is not None:
            return "a fused step that a GradScaler may skip is applied on the device by the foreach backend"
        with_previous = step.with_previous
        if with_previous not in (0, len(step.params)):
            return PARTIAL
        vs = step.form[0]
        # the state tensors found eligible last time (checked once), held weakly: the optimizer's state is not the
        # tracker's to keep alive (nor to count in held_bytes), and a dead one never matches a new tensor
        known = step.cache.get("eligible")
        if known is None or len(known) != len(vs) or not all(map(operator.is_, map(weakref.ref.__call__, known), vs)):
            why = self._ineligible([*vs, *step.grads])
            if why is not None:
                return why
            step.cache["eligible"] = list(map(weakref.ref, vs))
        elif set(map(_dtype, step.grads)) != {vs[0].dtype} or not all(map(Tensor.is_contiguous, step.grads)):
            return self._ineligible([*vs, *step.grads])  # (a gradient's device is its parameter's: torch enforces it)
        return None

    def _contiguous_on_device(self, t: Tensor) -> bool:
        return t.dtype in self.dtypes and t.is_contiguous() and t.device.type == self.device_type

    def _ineligible(self, tensors: list[Tensor]) -> str | None:
        if not all(map(self._contiguous_on_device, tensors)) or len(set(map(_dtype, tensors))) != 1:
            kinds = sorted({f"{t.dtype}{'' if t.is_contiguous() else ' non-contiguous'} on {t.device}" for t in tensors})
            wanted = " or ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return (f"it needs contiguous {wanted} state and gradients of one dtype on {self.device_type}; the group "
                    f"has {', '.join(kinds)}")
        if len({t.device for t in tensors}) != 1:
            return "its tensors are on more than one device"
        return None

    def _launch(self, step: GroupStep, sizes: tuple[int, ...], dtype: torch.dtype) -> Any:
        launch = step.cache.get(self.name)
        if launch is None or launch.sizes != sizes or launch.device != step.device or launch.dtype != dtype:
            launch = step.cache[self.name] = self.launch_class(sizes, step.device, dtype)
            step.cache.pop("buffer", None)
        return launch

    def run(self, step: GroupStep) -> StepResult:
        """One launch: StepResult(terms (None when the launch added the row itself, ``finite`` then its flag), n,
        etas= the flat buffer's views (stored mode) or scales= the (s, e) table (recomputed mode), per_tensor=).
        ``finite`` and ``per_tensor`` are the launch's own buffers, overwritten by the group's next step."""
        assert step.form is not None
        vs, scalars = step.form
        sizes = tuple(map(Tensor.numel, vs))
        n = sum(sizes)
        real = vs[0].dtype
        launch = self._launch(step, sizes, real)
        accumulate = (step.accumulators, float(step.weight)) if step.fuse else None
        has_previous = step.with_previous > 0
        coordinates = step.coordinates
        if step.update is not None:
            keep, weight = step.update
            table = scalar_table(scalars, real, step.device)
            if has_previous:
                both = torch.cat([table, torch.stack(step.previous_scales).to(real)], dim=1)  # type: ignore[arg-type]
                terms = launch.terms(vs, step.grads, None, both, RECOMPUTED, 1.0 / keep, weight, accumulate, coordinates)
            else:
                terms = launch.terms(vs, step.grads, None, table, CURRENT, accumulate=accumulate, coordinates=coordinates)
            result = StepResult(None, n, scales=table.to(step.dtype), per_tensor=launch.per_tensor)
        else:
            buffer, views = self._buffer(step, launch, has_previous)
            mode = STORED if has_previous else FIRST
            terms = launch.terms(vs, step.grads, buffer, launch.scalar_table(scalars), mode, accumulate=accumulate, coordinates=coordinates)
            result = StepResult(None, n, etas=views, per_tensor=launch.per_tensor)
        if step.fuse:
            result.finite = launch.finite_flag
        else:
            result.terms = terms.to(step.dtype).clone()
        return result

    @staticmethod
    def _buffer(step: GroupStep, launch: Any, has_previous: bool) -> tuple[Tensor, list[Tensor]]:
        """The group's flat η buffer and its views: the kept one when the parameters' η_{t−1} are its views (no
        copy), else a new one with the η_{t−1} copied in."""
        kept = step.cache.get("buffer")
        shapes = None
        if kept is not None:
            buffer, views = kept
            if has_previous:  # η_{t−1} has its parameter's shape (the tracker checks): the views are the layout
                if same_objects(step.previous, views):
                    return buffer, views
            else:
                shapes = list(map(_shape, step.params))
                if list(map(_shape, views)) == shapes:
                    return buffer, views
        shapes = shapes or list(map(_shape, step.params))
        buffer = torch.empty(launch.eta_numel, dtype=launch.dtype, device=step.device)
        views = launch.eta_views(buffer, shapes)
        if has_previous:
            for into, old in zip(views, step.previous):
                into.copy_(old)
        step.cache["buffer"] = (buffer, views)
        return buffer, views
