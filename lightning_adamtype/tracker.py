"""``ConditionTracker``: measures the Adam-type convergence conditions of a plain PyTorch optimizer.

No Lightning here: this is what plain loops and Fabric users attach. The tracker hooks the optimizer's
``step`` (pre- and post-hooks), reads η_t and g_t through the optimizer's adapter after every step that really
happened, and keeps per-group accumulators as tensors on the parameters' device. Numbers reach the host only in
:meth:`ConditionTracker.compute`.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch._utils import _flatten_dense_tensors
from torch.utils.hooks import RemovableHandle

from .adapters import OptimizerAdapter, _from_sqrt_form, _min_from_sqrt_form, find_adapter, scalar_table, to_device
from .kernels import chunks, scratch_recomputed_terms, scratch_terms, sqrt_form_kernels
from . import native_kernels, triton_kernels
from .conditions import _sum, _sum_squares, accumulator_dtype, min_stepsize, oscillation, squared_step_norm, stepsize_sum
from .trend import TrendDetector, TrendOptions

__all__ = ["ConditionTracker", "ACCUMULATOR_KEYS", "group_names"]

#: Accumulated per group, in this order, in one device tensor.
ACCUMULATOR_KEYS = ("steps", "a", "b", "c", "c2", "a_mean", "c_mean", "nonfinite_steps")


#: groups with at most this many coordinates take the concatenated ("flat") path when η_{t−1} is stored.
FLAT_MAX_NUMEL = 1 << 18  # measured on a 2-core CPU: faster up to 250k coordinates, slower at 1M (benchmarks/README.md)

KERNELS = {
    "auto": "default: 'triton' on CUDA groups when Triton is installed, 'native' on CPU groups when a C compiler "
    "works, else 'foreach'",
    "foreach": "multi-tensor torch operations",
    "compiled": "one torch.compile'd pass per tensor",
    "triton": "two Triton launches per group (CUDA)",
    "native": "one C call per group (CPU; compiled on first use with the system's C compiler)",
}
#: the one-call-per-group kernels: kernel option → module with ``available``, ``GroupLaunch`` and the mode constants
GROUP_KERNELS = {"triton": triton_kernels, "native": native_kernels}
#: what ``kernel="auto"`` takes on each device type (others: the torch paths)
AUTO_GROUP_KERNEL = {"cuda": "triton", "cpu": "native"}
PREVIOUS_STEPSIZES = {
    "stored": "default, 4 bytes per coordinate",
    "recomputed": "no per-coordinate memory; Adam/AdamW/Adagrad/RMSprop",
}


def check_kernel_options(owner: str, kernel: Any, previous_stepsize: Any) -> None:
    """ValueError naming the option, the value and what is allowed, for ``kernel`` and ``previous_stepsize``."""
    for option, value, allowed in (("kernel", kernel, KERNELS), ("previous_stepsize", previous_stepsize, PREVIOUS_STEPSIZES)):
        if not isinstance(value, str) or value not in allowed:
            choices = ", ".join(f"{k!r} ({why})" for k, why in allowed.items())
            raise ValueError(f"{owner}({option}={value!r}): expected one of {choices}")


@functools.lru_cache(maxsize=1)
def _dtensor_class() -> type | None:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - very old torch
        return None
    return DTensor


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2's sharded parameters and state)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def check_observe_every(owner: str, observe_every: Any) -> None:
    """ValueError naming the value unless ``observe_every`` is a positive int."""
    if isinstance(observe_every, bool) or not isinstance(observe_every, int) or observe_every < 1:
        raise ValueError(
            f"{owner}(observe_every={observe_every!r}): expected a positive int (1, the default, observes every step; "
            "k > 1 observes the step pair (t − 1, t) for every t divisible by k and weighs it by k)"
        )


def group_names(optimizer: torch.optim.Optimizer, prefix: str | None = None) -> list[str]:
    """``<prefix>/pg<i>`` for each group (prefix defaults to the optimizer's class name), or the group's "name"."""
    prefix = prefix or type(optimizer).__name__
    names = []
    for i, group in enumerate(optimizer.param_groups):
        name = group.get("name")
        names.append(f"{prefix}/{name}" if isinstance(name, str) and name else f"{prefix}/pg{i}")
    return names


def _scratch_concatenation(tensors: list[Tensor]) -> Tensor:
    """A new 1-D tensor holding ``tensors`` one after another, never a view of them: the small-group kernels
    overwrite it in place. (``flatten_dense_tensors`` is one C++ call for the views and the concatenation, but it
    returns a view when given a single tensor.)"""
    if len(tensors) == 1:
        return tensors[0].reshape(-1).clone()
    return _flatten_dense_tensors(tensors)


def _per_coordinate(table: Tensor, sizes: list[int]) -> tuple[Tensor, Tensor]:
    """The two columns of an [n, 2] (s, e) table repeated over each tensor's ``sizes[i]`` coordinates."""
    repeats = to_device(sizes, None, table.device)
    total = sum(sizes)
    return tuple(torch.repeat_interleave(table[:, i], repeats, output_size=total) for i in (0, 1))  # type: ignore[return-value]


def _same_objects(a: list, b: list) -> bool:
    """The same objects, in the same order (what the tracker kept last step is what it is given now)."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _keep_scales(state: "_GroupState", indices: list[int], table: Tensor) -> None:
    """Recomputed mode: this step's (s, e) rows (one per parameter, views of ``table``) become the next step's
    (s', e'); no η_{t−1} is stored for those parameters. ``table`` is kept too (:func:`_previous_scales_table`)."""
    rows = table.unbind(0)
    for pi, row in zip(indices, rows):
        state.previous_scales[pi] = row
        state.previous.pop(pi, None)
    state.previous_rows = list(rows)
    state.previous_table = table
    state.flat_previous_scalars = None  # (the small-group path sets it again when its scalars are host floats)


def _previous_scales_table(state: "_GroupState", indices: list[int]) -> Tensor:
    """The (s', e') of η_{t−1} of the parameters ``indices`` as one [n, 2] tensor: the table kept last step when
    its rows are exactly these (no operation), else a stack of the rows."""
    olds = [state.previous_scales[pi] for pi in indices]
    if state.previous_table is not None and _same_objects(olds, state.previous_rows):
        return state.previous_table
    return torch.stack(olds)


def _laid_out(state: "_GroupState", terms: Tensor, total: int, dtype: torch.dtype) -> Tensor:
    """The accumulators' row [1, a, b, c, c2, Ση/n, c/n, 0] from a group's five terms, in one ``addmv`` with the
    group's layout (built once per group size: a group's device and dtype do not change)."""
    if state.flat_layout is None or state.flat_layout[0] != total:
        state.flat_layout = (total, *_contribution_layout(total, dtype, terms.device))
    _, offset, layout = state.flat_layout
    return torch.addmv(offset, layout, terms.to(dtype))


def _contribution_layout(total: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """(offset, matrix) with offset + matrix @ [min η, Σ(ηg)², Σ|Δη|, Σ(Δη)², Ση] = the row the accumulators add:
    [1, min η, Σ(ηg)², Σ|Δη|, Σ(Δη)², Ση/n, Σ|Δη|/n, 0] (the last slot counts non-finite steps), for a group of
    n = ``total`` coordinates. One ``addmv`` per step instead of eight small operations. Built on the host and copied
    once (:func:`to_device`): setting elements of a CUDA tensor one by one copies each from pageable memory, a sync."""
    matrix = [[0.0] * 5 for _ in ACCUMULATOR_KEYS]
    for row, column in enumerate(range(4), start=1):
        matrix[row][column] = 1.0
    matrix[5][4] = 1.0 / total
    matrix[6][2] = 1.0 / total
    offset = [1.0] + [0.0] * (len(ACCUMULATOR_KEYS) - 1)
    return to_device(offset, dtype, device), to_device(matrix, dtype, device)


@dataclass
class _GroupState:
    """Bookkeeping of one parameter group: the accumulators and the previous effective stepsizes."""

    accumulators: Tensor | None = None  # float64 [len(ACCUMULATOR_KEYS)] on the group's device
    previous: dict[int, Tensor | float] = field(default_factory=dict)  # param index → η_{t−1}
    previous_scales: dict[int, Tensor] = field(default_factory=dict)  # param index → (s, e) of η_{t−1} (recomputed)
    flat_previous: Tensor | None = None  # small groups: η_{t−1} of all parameters in one buffer ...
    flat_views: list[Tensor] = field(default_factory=list)  # ... and the views of it held in ``previous``
    flat_layout: tuple[int, Tensor, Tensor] | None = None  # small groups: (n, *_contribution_layout(n, ...))
    previous_rows: list[Tensor] = field(default_factory=list)  # recomputed: the (s, e) rows kept last step ...
    previous_table: Tensor | None = None  # ... the [n, 2] table they are rows of ...
    flat_previous_scalars: tuple[float, float] | None = None  # ... and, small groups, the host floats if all equal
    group_launch: Any = None  # the group-kernel paths: a GroupLaunch of triton_kernels or native_kernels
    sharded: bool = False  # coordinates sharded across ranks: ``previous`` holds this rank's shards only
    last_seen: dict[int, int] = field(default_factory=dict)  # param index → observation at which η was taken
    count: int = 0  # observations of this group (host clock of the trend detectors)
    last_finite: Tensor | None = None  # bool tensor: was the latest step finite (else the detectors see NaN)
    detectors: dict[str, TrendDetector] = field(default_factory=dict)  # "variance" / "bias"


class ConditionTracker:
    """Track A_T, B_T, C_T, C2_T (Chen et al., ICLR 2019) for every parameter group of ``optimizer``.

    At every optimizer step t (per group, over the parameters that had a gradient):

        A_T  = Σ_t min_j η_{t,j}                B_T  = Σ_t ‖η_t ⊙ g_t‖₂²
        C_T  = Σ_{t≥2} ‖η_t − η_{t−1}‖₁         C2_T = Σ_{t≥2} ‖η_t − η_{t−1}‖₂²

    and :meth:`compute` adds variance_ratio = B/A and bias_ratio = C/A (both should go to 0), plus the
    per-coordinate view a_mean = Σ_t mean_j η_{t,j}, c_mean = Σ_t ‖η_t − η_{t−1}‖₁ / n_t and
    bias_ratio_mean = c_mean / a_mean.

    Verdicts: per group, two :class:`~lightning_adamtype.trend.TrendDetector` estimate the slope of
    log(ratio) against log(step) (keys ``variance_slope``, ``bias_slope``) and decide whether each condition
    trends toward violation (``variance_violation``, ``bias_violation``). They update on the device at
    log-spaced sample steps only.

    Args:
        optimizer: any ``torch.optim.Optimizer`` with a registered adapter (see :func:`register_adapter`).
            Others get one warning and are left untouched.
        name: prefix of the group names (default: the optimizer's class name).
        switch_to_amsgrad: when a group's bias verdict holds, switch that group to AMSGrad in place (Adam and
            AdamW; others get one warning). The verdict is read on the host only at the detector's sample steps
            (``points_per_decade`` per decade), the only steps at which it can change; under
            ``torch.distributed`` rank 0's decision is broadcast so every rank switches at the same step.
        trend: options of the trend detectors (:class:`~lightning_adamtype.trend.TrendOptions`).
        observe_every: k ≥ 1. With k > 1 only the step pairs (t − 1, t) with t divisible by k are observed (η_{t−1} is
            taken at step t − 1, nothing is done at the other steps), and each observed step's contributions are
            weighted by k: A_T ≈ k·Σ_{t ≡ 0 (mod k)} min_j η_{t,j}, likewise b, c, c2, and ``steps`` counts the
            optimizer steps represented. The estimates are unbiased when the per-step terms do not correlate with
            t mod k (a schedule or data order with a period that divides k would alias); the trend detectors see
            one sample per k steps, so their warm-up and window are in observed steps. Work per step falls to 2/k
            of the default (k = 2 saves nothing).
        kernel: ``"auto"`` (default): ``"triton"`` for groups on a CUDA device when Triton is installed,
            ``"native"`` for groups on the CPU when a C compiler works, else ``"foreach"``. ``"foreach"``:
            multi-tensor ``torch._foreach_*`` operations (small groups: one concatenated pass). ``"triton"``: for
            optimizers whose η = s/(sqrt(v) + e) (Adam, AdamW, Adagrad, RMSprop not centered) with float32 state on
            a CUDA device, two launches per group per step, reading v, g (and η_{t−1}) once
            (:mod:`lightning_adamtype.triton_kernels`); elsewhere the foreach path (one warning when asked for
            explicitly). ``"native"``: the same on the CPU, one call per group per step of a C loop compiled on
            first use (:mod:`lightning_adamtype.native_kernels`; about a second, then cached on disk); without a C
            compiler, the foreach path (one warning when asked for explicitly). ``"compiled"``: for the same
            optimizers, one ``torch.compile``'d pass per tensor; the first steps compile (seconds), other optimizers
            keep the foreach path. Needs a C++ compiler on CPU (Triton on GPU); without one, one warning and the
            foreach path. Slower than ``"native"`` / ``"triton"`` (two loops per tensor on the CPU, one launch per
            reduction per tensor on a GPU).
        previous_stepsize: ``"stored"`` (default): keep η_{t−1} (4 bytes per coordinate) for c and c2.
            ``"recomputed"``: keep none and rebuild η_{t−1} from the optimizer state after the step,
            v_{t−1} = (v_t − w·g_t²)/k, for Adam/AdamW (not AMSGrad), Adagrad and RMSprop (not centered): exact up
            to the float32 rounding of v_t (see :mod:`lightning_adamtype.kernels`). Groups that cannot be
            recomputed (AMSGrad, centered RMSprop, other optimizers) store η_{t−1}, with one warning.

    The tracker may be attached at any time; its first observation has no η_{t−1}, so c counts from its second.
    A parameter whose ``grad`` is None at a step is left out of that step, and c/c2 only count parameters that
    also had an η at the previous observed step. A step skipped by a ``GradScaler`` is not counted: the plain
    optimizers are not stepped at all, and fused ones are masked with the scaler's ``found_inf`` on the device.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        name: str | None = None,
        *,
        switch_to_amsgrad: bool = False,
        trend: TrendOptions | None = None,
        kernel: str = "auto",
        previous_stepsize: str = "stored",
        observe_every: int = 1,
    ) -> None:
        check_kernel_options("ConditionTracker", kernel, previous_stepsize)
        check_observe_every("ConditionTracker", observe_every)
        self.observe_every = observe_every
        self.kernel = kernel
        self.previous_stepsize = previous_stepsize
        if not isinstance(switch_to_amsgrad, bool):
            raise ValueError(f"ConditionTracker(switch_to_amsgrad={switch_to_amsgrad!r}): expected True or False")
        if trend is not None and not isinstance(trend, TrendOptions):
            raise ValueError(
                f"ConditionTracker(trend={trend!r}): expected a lightning_adamtype.TrendOptions or None"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"ConditionTracker expects a torch.optim.Optimizer, got {type(optimizer).__name__}; "
                "pass the optimizer itself (for a LightningOptimizer, its .optimizer)"
            )
        self.optimizer = optimizer
        self.name = name or type(optimizer).__name__
        self.adapter: OptimizerAdapter | None = find_adapter(optimizer)
        self.observations = 0  # optimizer steps seen by this tracker (host counter)
        self.switch_to_amsgrad = switch_to_amsgrad
        self.trend_options = trend or TrendOptions()
        #: group name → the optimizer step (this tracker's count) from which the group ran AMSGrad.
        self.switched: dict[str, int] = {}
        #: (group name, step, reason) for every switch, in order; readers may pop them (the callback does).
        self.switch_events: list[tuple[str, int, str]] = []
        self._groups: list[_GroupState] = []
        self._snapshots: dict[int, dict[int, Tensor]] = {}  # group → parameter index → x_t (coupled decay)
        self._accumulate_constants: dict[tuple, tuple[Tensor, Tensor]] = {}  # (dtype, device) → see _constants
        self._handles: list[RemovableHandle] = []
        self._warned: set[str] = set()
        if self.adapter is None:
            warnings.warn(
                f"lightning_adamtype: no adapter for optimizer class {type(optimizer).__qualname__!r} "
                f"({type(optimizer).__module__}); it is not monitored and trains untouched. Map it onto the paper's "
                "template with lightning_adamtype.register_adapter(YourOptimizer, adapter) "
                "(see lightning_adamtype.OptimizerAdapter).",
                UserWarning,
                stacklevel=2,
            )
            return
        self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
        self._handles.append(optimizer.register_step_post_hook(self._post_step))

    # ------------------------------------------------------------------ hooks
    @property
    def attached(self) -> bool:
        """Whether the tracker is hooked to its optimizer."""
        return bool(self._handles)

    def remove(self) -> None:
        """Detach from the optimizer; the accumulators stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._snapshots.clear()

    def _phase(self, observation: int) -> str:
        """"record", "prepare" (take η_{t−1} only) or "skip" for an optimizer step, with ``observe_every``."""
        k = self.observe_every
        if k == 1 or observation % k == 0:
            return "record"
        return "prepare" if (observation + 1) % k == 0 else "skip"

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> tuple[Any, Any] | None:
        """Coupled weight decay puts λ·x_t (the parameter *before* the update) into g_t: keep x_t for the post-hook.

        The copy is taken once the gradients exist: now, or, when ``step`` got a closure (Lightning always passes
        one; the gradients are computed inside it), right after the closure returns, by wrapping it.
        """
        assert self.adapter is not None
        self._snapshots.clear()
        if self._phase(self.observations + 1) == "skip":
            return None
        if not any(self.adapter.coupled_weight_decay(group) != 0.0 for group in optimizer.param_groups):
            return None
        first = 1 if args and args[0] is optimizer else 0  # torch passes the optimizer itself as args[0]
        in_args = len(args) > first and callable(args[first])
        closure = args[first] if in_args else kwargs.get("closure")
        if not callable(closure):
            self._take_snapshots(optimizer)
            return None

        def closure_then_snapshot() -> Any:
            loss = closure()
            self._take_snapshots(optimizer)
            return loss

        if in_args:
            return (*args[:first], closure_then_snapshot, *args[first + 1 :]), kwargs
        return args, {**kwargs, "closure": closure_then_snapshot}

    def _take_snapshots(self, optimizer: torch.optim.Optimizer) -> None:
        assert self.adapter is not None
        self._snapshots.clear()
        with torch.no_grad():
            for gi, group in enumerate(optimizer.param_groups):
                if self.adapter.coupled_weight_decay(group) != 0.0:
                    self._snapshots[gi] = {
                        pi: p.detach().clone() for pi, p in enumerate(group["params"]) if p.grad is not None
                    }

    @torch.no_grad()
    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        assert self.adapter is not None
        found_inf = getattr(optimizer, "found_inf", None)
        if isinstance(found_inf, Tensor) and found_inf.device.type == "cpu":
            # A CPU flag is read for free: a step the scaler skipped inside a fused optimizer is not a step, exactly
            # as when the scaler does not call step() at all. (A device flag is applied on the device, below.)
            skipped = bool(found_inf.sum() > 0)
            found_inf = None
            if skipped:
                self._snapshots.clear()
                return
        self.observations += 1
        phase = self._phase(self.observations)
        if phase == "skip":
            self._snapshots.clear()
            return
        while len(self._groups) < len(optimizer.param_groups):
            self._groups.append(_GroupState())
        for gi, group in enumerate(optimizer.param_groups):
            if self._observe_group(optimizer, gi, group, found_inf, record=phase == "record"):
                self._update_verdicts(gi)
        self._snapshots.clear()

    # ------------------------------------------------------------------ math per group
    def _observe_group(
        self,
        optimizer: torch.optim.Optimizer,
        gi: int,
        group: dict[str, Any],
        found_inf: Tensor | None,
        record: bool = True,
    ) -> bool:
        """Add this step's contributions for one group (weighted by ``observe_every``); False when no parameter of
        the group took part, or when ``record`` is False (η_t is then only kept as the next step's η_{t−1})."""
        assert self.adapter is not None
        state = self._groups[gi]
        snapshot = self._snapshots.get(gi, {})
        uniform = getattr(self.adapter, "uniform_stepsize", None)
        needs_state = not callable(uniform)  # plain SGD keeps no state at all
        optimizer_state = optimizer.state
        entries, states, grads = [], [], []  # (one pass over the group: this runs at every step)
        for pi, p in enumerate(group["params"]):
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                self._warn_once("sparse", "sparse gradients are not measured; those parameters are left out")
                continue
            param_state = optimizer_state.get(p)
            if needs_state and not param_state:
                continue
            if p.numel() == 0:  # no coordinate: nothing to add, and no minimum to take
                continue
            entries.append((pi, p, snapshot.get(pi)))
            states.append(param_state or {})
            grads.append(grad)
        if not entries:
            return False
        shards = None  # the process group over which this group's coordinates are sharded (FSDP2 / DTensor)
        if is_dtensor(entries[0][1]):
            local = self._local_shards(entries, states, grads)
            if local is None:
                return False
            shards, entries, states, grads, device = local
            state.sharded = shards is not None
        else:
            device = entries[0][1].device
        dtype = accumulator_dtype(device)
        if state.accumulators is None:
            state.accumulators = torch.zeros(len(ACCUMULATOR_KEYS), dtype=dtype, device=device)
        if not entries:  # this rank holds no coordinate of a sharded group: it still joins the reduction
            if not record:  # every rank is at the same phase: all skip the reduction together
                return False
            return self._accumulate(state, self._combine_shards(None, 0, 0, shards, device), found_inf)

        # g_t: the gradient the optimizer consumed (unscaled; + coupled weight decay with maximize's sign).
        consumed = getattr(self.adapter, "consumed_gradients", None)
        if callable(consumed):  # an optimizer that rewrote p.grad in place during its step
            grads = consumed(group, states, grads)
        # With a GradScaler, plain optimizers get unscaled grads (scaler.unscale_), and fused ones (which receive
        # grad_scale/found_inf) write the unscaled gradient back into p.grad during their step: p.grad is g_t.
        wd = self.adapter.coupled_weight_decay(group)
        if wd != 0.0:
            if any(x is None for _, _, x in entries):  # a gradient appeared after the pre-hook without a closure
                self._warn_once(
                    "snapshot",
                    "coupled weight decay: some gradients were set after optimizer.step() began and outside a "
                    "closure, so x_t was not seen before the update; λ·x_{t+1} is used in g_t for them",
                )
                entries = [(pi, p, p.detach() if x is None else x) for pi, p, x in entries]
            sign = -1.0 if group.get("maximize", False) else 1.0
            # ‖η ⊙ (±∇ + λx)‖ = ‖η ⊙ (∇ ± λx)‖
            grads = torch._foreach_add(grads, [s for _, _, s in entries], alpha=sign * wd)

        indices = [pi for pi, _, _ in entries]
        numel = sum(p.numel() for _, p, _ in entries)
        with_previous = [
            i
            for i, pi in enumerate(indices)
            if state.last_seen.get(pi) == self.observations - 1 and (pi in state.previous or pi in state.previous_scales)
        ]
        if callable(uniform):
            contributions, new_previous = self._uniform_contributions(
                state, uniform(group), grads, entries, with_previous, numel, dtype, device
            )
        else:
            sqrt_form = getattr(self.adapter, "sqrt_form", None)
            form = sqrt_form(group, states) if callable(sqrt_form) else None  # read once per step
            all_or_none = len(with_previous) in (0, len(entries))
            path, update = self._choose_path(group, form, numel, all_or_none, found_inf, grads)
            group_result = None
            if path in GROUP_KERNELS:
                # unsharded groups add their row to the accumulators inside the kernel (contributions None)
                group_result = self._try_group_kernel(
                    path, state, form, update, grads, indices, with_previous, dtype, fused=record and shards is None
                )
                if group_result is None:  # it failed (one warning) and is never chosen again
                    path, update = self._choose_path(group, form, numel, all_or_none, found_inf, grads)
            if group_result is not None:
                contributions, new_previous = group_result
            elif path == "kernels":
                contributions, new_previous = self._sqrt_form_contributions(
                    state, form, update, grads, indices, with_previous, numel, dtype, found_inf
                )
            elif path == "flat":
                contributions, new_previous = self._flat_contributions(
                    state, form, update, grads, indices, with_previous, dtype
                )
            else:
                if form is not None:  # P1: min η from max v, no copy
                    amin, etas = _min_from_sqrt_form(*form, dtype), _from_sqrt_form(*form)
                else:
                    min_fn = getattr(self.adapter, "min_effective_stepsize", None)
                    amin = min_fn(group, states, dtype) if callable(min_fn) else None
                    etas = self.adapter.effective_stepsizes(group, states)
                contributions, new_previous = self._tensor_contributions(
                    state, etas, grads, indices, with_previous, numel, dtype, found_inf, amin
                )
        for pi, eta in zip(indices, new_previous):
            if eta is not None:
                state.previous[pi] = eta
            state.last_seen[pi] = self.observations
        if not record:  # (the same phase on every rank: a sharded group skips its reduction everywhere)
            return False
        if contributions is None:  # already added by the group kernel (Triton or native)
            state.count += 1
            return True
        if shards is not None:
            coords = sum(entries[i][1].numel() for i in with_previous)
            contributions = self._combine_shards(contributions, numel, coords, shards, device)
        return self._accumulate(state, contributions, found_inf)

    def _accumulate(self, state: _GroupState, contributions: Tensor, found_inf: Tensor | None) -> bool:
        """Add one observed step's contributions (weighted by ``observe_every``) to the group's accumulators.

        A step with a NaN/Inf anywhere in its contributions is left out of every sum and counted on its own; a step a
        GradScaler skipped inside a fused optimizer (``found_inf``) is left out and not counted at all. Both are
        decided on the device (the warning is issued when the numbers are read, in :meth:`compute`).
        """
        acc = state.accumulators
        assert acc is not None
        finite = torch.isfinite(contributions).all()
        if self.observe_every > 1:
            contributions = contributions * self.observe_every
        zero, nonfinite_row = self._constants(acc)
        if contributions.numel() < acc.numel():  # the paths that leave out the non-finite counter's slot
            contributions = torch.cat([contributions, zero])
        row = torch.where(finite, contributions, nonfinite_row)  # [..., 0] or [0, ..., 0, 1]
        if found_inf is None:
            state.last_finite = finite
        else:
            skipped = found_inf.to(acc.device) > 0
            state.last_finite = finite | skipped
            row = row.masked_fill(skipped, 0.0)
        acc.add_(row)
        state.count += 1
        return True

    def _constants(self, acc: Tensor) -> tuple[Tensor, Tensor]:
        """(a one-element zero, the row a non-finite step adds: 0 everywhere and 1 in the non-finite counter),
        made once per accumulator dtype and device."""
        key = (acc.dtype, acc.device)
        if key not in self._accumulate_constants:
            row = to_device([0.0] * (acc.numel() - 1) + [1.0], acc.dtype, acc.device)  # no element-wise set: no sync
            self._accumulate_constants[key] = (torch.zeros(1, dtype=acc.dtype, device=acc.device), row)
        return self._accumulate_constants[key]

    # ------------------------------------------------------------------ sharded parameters (FSDP2 / DTensor)
    def _local_shards(self, entries: list, states: list[dict[str, Any]], grads: list[Tensor]):
        """This rank's shards of a group of DTensor parameters (FSDP2's ``fully_shard``, Lightning's
        ``ModelParallelStrategy``): (process group of the sharded mesh dimension or None when only replicated,
        local entries, states and grads without empty shards, device). None (with one warning) when the
        coordinates are sharded over more than one mesh dimension."""
        param = entries[0][1]
        sharded_dims = [i for i, placement in enumerate(param.placements) if placement.is_shard()]
        if len(sharded_dims) > 1:
            self._warn_once(
                "mesh",
                f"parameters sharded over {len(sharded_dims)} mesh dimensions ({param.placements}) are not measured "
                "(one sharded dimension is supported: FSDP2 / HSDP)",
            )
            return None
        shards = param.device_mesh.get_group(mesh_dim=sharded_dims[0]) if sharded_dims else None
        device = param.to_local().device
        local_entries, local_states, local_grads = [], [], []
        for (pi, p, snap), st, g in zip(entries, states, grads):
            p_local = p.to_local() if is_dtensor(p) else p
            if p_local.numel() == 0:
                continue
            local_entries.append((pi, p_local, snap.to_local() if is_dtensor(snap) else snap))
            local_states.append({k: v.to_local() if is_dtensor(v) else v for k, v in st.items()})
            local_grads.append(g.to_local() if is_dtensor(g) else g)
        return shards, local_entries, local_states, local_grads, device

    @staticmethod
    def _combine_shards(
        contributions: Tensor | None, numel: int, coords: int, shards: Any, device: torch.device
    ) -> Tensor:
        """This rank's contributions combined with the other shards': a is the minimum, b, c, c2, Ση and the
        coordinate counts are sums (two small all-reduces on the device, no host synchronisation); then
        a_mean = Ση / n and c_mean = c / (coordinates with an η_{t−1}). ``None``: this rank holds no coordinate."""
        dtype = accumulator_dtype(device)
        counts = to_device([float(numel), float(coords)], dtype, device)
        if contributions is None:  # neutral terms
            amin = torch.full((1,), math.inf, dtype=dtype, device=device)
            sums = torch.cat([torch.zeros(4, dtype=dtype, device=device), counts])
        else:
            amin = contributions[1:2].clone()
            sums = torch.cat([contributions[2:5], (contributions[5] * numel).reshape(1), counts])
        if shards is not None:
            torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM, group=shards)
            torch.distributed.all_reduce(amin, op=torch.distributed.ReduceOp.MIN, group=shards)
        b, c, c2, eta_sum, total, total_coords = sums.unbind()
        one = torch.ones((), dtype=dtype, device=device)
        return torch.stack(
            [one, amin[0], b, c, c2, eta_sum / total, torch.where(total_coords > 0, c / total_coords.clamp_min(1), 0 * c)]
        )

    def _choose_path(
        self,
        group: dict[str, Any],
        form: Any,
        numel: int,
        previous_all_or_none: bool,
        found_inf: Tensor | None,
        grads: list[Tensor],
    ) -> tuple[str, tuple[float, float] | None]:
        """How this group is computed at this step, and the second-moment update (k, w) when η_{t−1} is rebuilt:

        - ``"kernels"``: one kernel call per tensor (:mod:`lightning_adamtype.kernels`; compiled or eager), for
          ``previous_stepsize="recomputed"``, or ``kernel="compiled"`` on groups above ``FLAT_MAX_NUMEL``;
        - ``"flat"``: small groups (≤ ``FLAT_MAX_NUMEL``): v and g concatenated, one eager kernel call, with η_{t−1}
          stored in one flat buffer or recomputed;
        - ``"triton"`` / ``"native"``: float32 groups on a CUDA device / the CPU (``kernel`` "auto", or that name):
          two launches / one C call per group;
        - ``"foreach"``: multi-tensor operations (every other case, and any optimizer without a square-root form).

        A fused step that a GradScaler may skip (``found_inf``) keeps a stored η_{t−1} on the foreach path.
        """
        if form is None:
            if self.previous_stepsize == "recomputed":
                self._warn_recompute()
            return "foreach", None
        one_call = self._group_kernel(form[0], grads) if found_inf is None and previous_all_or_none else None
        if self.previous_stepsize == "recomputed":
            update_fn = getattr(self.adapter, "second_moment_update", None)
            update = update_fn(group) if callable(update_fn) else None
            if update is not None:
                if one_call:
                    return one_call, update
                small = numel <= FLAT_MAX_NUMEL and previous_all_or_none and found_inf is None
                return ("flat" if small and self._same_kind(form) else "kernels"), update
            self._warn_recompute()
        if one_call:
            return one_call, None
        if found_inf is not None:
            return "foreach", None
        if numel <= FLAT_MAX_NUMEL and previous_all_or_none and self._same_kind(form):
            return "flat", None
        if self.kernel == "compiled":
            return "kernels", None
        return "foreach", None

    def _group_kernel(self, vs: list[Tensor], grads: list[Tensor]) -> str | None:
        """The one-call-per-group kernel (a key of :data:`GROUP_KERNELS`) this group can take, or None: ``kernel`` is
        that name, or "auto" and the name of the group's device type in :data:`AUTO_GROUP_KERNEL`; the kernel runs
        on the device; every v and g is a contiguous float32 tensor on it. One warning when it was asked for by name
        and cannot run."""
        device = vs[0].device
        name = AUTO_GROUP_KERNEL.get(device.type) if self.kernel == "auto" else self.kernel
        if name not in GROUP_KERNELS or f"{name}-failed" in self._warned:
            return None
        module = GROUP_KERNELS[name]
        if not module.available(device):
            if self.kernel == "triton":
                self._warn_once(
                    "triton",
                    f"kernel='triton' needs Triton and a CUDA device (this group is on {device}"
                    f"{'' if triton_kernels.triton is not None else ', and Triton is not installed'}); "
                    "the foreach path runs instead",
                )
            elif self.kernel == "native":
                reason = native_kernels.unavailable_reason()
                self._warn_once(
                    "native",
                    f"kernel='native' needs a CPU group and a working C compiler (this group is on {device}"
                    f"{'; ' + reason if reason else ''}); the foreach path runs instead",
                )
            return None
        index = vs[0].get_device()  # an int (-1 on the CPU): cheaper to compare than torch.device objects
        eligible = all(
            t.dtype == torch.float32 and t.get_device() == index and t.is_contiguous() for ts in (vs, grads) for t in ts
        )
        if not eligible and self.kernel == name:
            kinds = sorted({f"{t.dtype}{'' if t.is_contiguous() else ' non-contiguous'} on {t.device}" for t in (*vs, *grads)})
            self._warn_once(
                f"{name}-state",
                f"kernel={name!r} needs contiguous float32 state and gradients on one device; a group has "
                f"{', '.join(kinds)}: it takes the foreach path",
            )
        return name if eligible else None

    @staticmethod
    def _same_kind(form: tuple) -> bool:
        """All second moments on one device with one working dtype (they can be concatenated)."""
        return len({(v.device, torch.promote_types(v.dtype, torch.float32)) for v in form[0]}) == 1

    def _warn_recompute(self) -> None:
        self._warn_once(
            "recompute",
            f"previous_stepsize='recomputed': {type(self.optimizer).__name__} with these settings (AMSGrad, centered, "
            "β2 = 0 or an optimizer without a linear second-moment update) cannot rebuild η_{t−1} from its state; "
            "η_{t−1} is stored for it (4 bytes per coordinate)",
        )

    def _flat_contributions(
        self,
        state: _GroupState,
        form: tuple,
        update: tuple[float, float] | None,
        grads: list[Tensor],
        indices: list[int],
        with_previous: list[int],
        dtype: torch.dtype,
    ) -> tuple[Tensor, list[Tensor | None]]:
        """Small groups (≤ ``FLAT_MAX_NUMEL`` coordinates): concatenate v and g (scratch copies) and run one eager
        kernel on them (:func:`~lightning_adamtype.kernels.scratch_terms`, or
        :func:`~lightning_adamtype.kernels.scratch_recomputed_terms`): ≈ 30 operations per step, against ≈ 50
        multi-tensor ones or one compiled call per 8 tensors, whose per-call overheads dominate on small models.
        Stored η_{t−1} lives in one flat buffer (``previous`` holds views of it); the row is laid out with one
        ``addmv`` (:func:`_contribution_layout`); the first step's c, c2 are 0 (the kernels return 0)."""
        vs, scalars = form
        device = vs[0].device
        work = torch.promote_types(vs[0].dtype, torch.float32)
        sizes = [v.numel() for v in vs]
        total = sum(sizes)
        v_flat = _scratch_concatenation(vs).to(work)
        g_flat = _scratch_concatenation(grads).to(work)
        s: Tensor | float
        e: Tensor | float
        if all(isinstance(x, float) for pair in scalars for x in pair) and len(set(scalars)) == 1:
            s, e = scalars[0]
        else:
            s, e = _per_coordinate(scalar_table(scalars, work, device), sizes)
        if update is not None:
            terms = self._flat_recomputed(state, scalars, update, v_flat, g_flat, s, e, sizes, indices, with_previous, dtype)
            new_previous: list[Tensor | None] = [None] * len(indices)
        else:
            terms = self._flat_stored(state, vs, v_flat, g_flat, s, e, sizes, indices, with_previous, work)
            new_previous = list(state.flat_views)
        return _laid_out(state, terms, total, dtype), new_previous

    def _flat_stored(self, state, vs, v_flat, g_flat, s, e, sizes, indices, with_previous, work) -> Tensor:
        """η_{t−1} from the group's flat buffer (kept, with the same views, from step to step), then η_t into it."""
        total = v_flat.numel()
        previous, persistent = None, False
        if with_previous:
            views = [state.previous.get(pi) for pi in indices]
            previous = state.flat_previous
            persistent = (
                previous is not None
                and previous.numel() == total
                and previous.dtype == work
                and _same_objects(views, state.flat_views)
            )
            if not persistent:
                previous = torch.cat([view.reshape(-1) for view in views]).to(work)  # type: ignore[union-attr]
        terms, eta = scratch_terms(v_flat, g_flat, previous, s, e)  # η_t lands in v_flat's memory
        if persistent:  # the same buffer and views as last step: η_t copied in (1 operation, not 2 per tensor)
            state.flat_previous.copy_(eta)  # type: ignore[union-attr]
        else:
            state.flat_previous = eta
            state.flat_views = [chunk.view(v.shape) for chunk, v in zip(eta.split(sizes), vs)]
        return terms

    def _flat_recomputed(
        self, state, scalars, update, v_flat, g_flat, s, e, sizes, indices, with_previous, dtype
    ) -> Tensor:
        """η_{t−1} rebuilt from v_t and g_t (:func:`~lightning_adamtype.kernels.scratch_recomputed_terms`); the
        (s, e) of this step are kept per parameter (rows of one table) for the next."""
        device, work = v_flat.device, v_flat.dtype
        keep, weight = update
        if with_previous:
            olds = [state.previous_scales[pi] for pi in indices]
            if state.flat_previous_scalars is not None and _same_objects(olds, state.previous_rows):
                ps, pe = state.flat_previous_scalars  # the same host floats for every parameter, as last step
            else:
                ps, pe = _per_coordinate(_previous_scales_table(state, indices).to(work), sizes)
            terms = scratch_recomputed_terms(v_flat, g_flat, s, e, ps, pe, 1.0 / keep, weight)
        else:
            terms, _ = scratch_terms(v_flat, g_flat, None, s, e)
        _keep_scales(state, indices, scalar_table(scalars, dtype, device))
        state.flat_previous_scalars = (s, e) if isinstance(s, float) and isinstance(e, float) else None
        return terms

    def _try_group_kernel(self, name: str, *args: Any, **kwargs: Any) -> tuple[Tensor | None, list[Tensor | None]] | None:
        """:meth:`_group_kernel_contributions`, or None (one warning) when the kernel cannot compile or launch here;
        nothing is written before the launches, so the caller's other path starts from the same state."""
        try:
            return self._group_kernel_contributions(GROUP_KERNELS[name], *args, **kwargs)
        except Exception as error:
            self._warn_once(
                f"{name}-failed",
                f"the {'Triton' if name == 'triton' else name} kernels could not run ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:200] if str(error) else ''}); the foreach path runs instead",
            )
            return None

    def _group_kernel_contributions(
        self,
        kernels: Any,
        state: _GroupState,
        form: tuple,
        update: tuple[float, float] | None,
        grads: list[Tensor],
        indices: list[int],
        with_previous: list[int],
        dtype: torch.dtype,
        fused: bool = False,
    ) -> tuple[Tensor | None, list[Tensor | None]]:
        """The five terms in one call of ``kernels`` (:mod:`~lightning_adamtype.triton_kernels`: two launches on a
        CUDA device; :mod:`~lightning_adamtype.native_kernels`: one C call on the CPU) through its ``GroupLaunch``,
        η_{t−1} stored in the group's flat buffer (as on the small-group path) or rebuilt from the state. ``fused``:
        the kernel also adds the row to the accumulators and sets ``last_finite`` (what :meth:`_accumulate` does,
        without its ten small operations), and None is returned; else the row, laid out with one ``addmv``."""
        vs, scalars = form
        device = vs[0].device
        sizes = tuple(v.numel() for v in vs)
        total = sum(sizes)
        launch = state.group_launch
        if not isinstance(launch, kernels.GroupLaunch) or launch.sizes != sizes or launch.device != device:
            launch = state.group_launch = kernels.GroupLaunch(sizes, device)
        new_previous: list[Tensor | None]
        assert state.accumulators is not None
        accumulate = (state.accumulators, 1.0 / total, float(self.observe_every)) if fused else None
        if update is not None:
            keep, weight = update
            table = scalar_table(scalars, dtype, device)  # kept: its rows are the next step's (s', e')
            if with_previous:
                previous_table = _previous_scales_table(state, indices)
                both = torch.cat([table, previous_table.to(dtype)], dim=1).to(torch.float32)
                terms = launch.terms(vs, grads, None, both, kernels.RECOMPUTED, 1.0 / keep, weight, accumulate)
            else:
                terms = launch.terms(vs, grads, None, table.to(torch.float32), kernels.CURRENT, accumulate=accumulate)
            _keep_scales(state, indices, table)
            new_previous = [None] * len(indices)
        else:
            table = launch.scalar_table(scalars)  # (the native launch's is overwritten by its next call)
            buffer = state.flat_previous
            shapes = [v.shape for v in vs]
            # the buffer has this launch's layout when it has its padded size and the views have these shapes
            # (padded size = unpadded size only when no padding is needed, so the offsets then agree too)
            reusable = (
                buffer is not None
                and buffer.numel() == launch.eta_numel
                and buffer.dtype == torch.float32
                and [f.shape for f in state.flat_views] == shapes
            )
            if with_previous:
                views = [state.previous.get(pi) for pi in indices]
                if not (reusable and _same_objects(views, state.flat_views)):  # held elsewhere: copied in once
                    buffer = torch.empty(launch.eta_numel, dtype=torch.float32, device=device)
                    for into, view in zip(launch.eta_views(buffer, shapes), views):
                        into.copy_(view)  # type: ignore[arg-type]
                mode = kernels.STORED
            else:
                if not reusable:
                    buffer = torch.empty(launch.eta_numel, dtype=torch.float32, device=device)
                mode = kernels.FIRST
            terms = launch.terms(vs, grads, buffer, table, mode, accumulate=accumulate)
            if buffer is not state.flat_previous:
                state.flat_previous = buffer
                state.flat_views = launch.eta_views(buffer, shapes)  # type: ignore[arg-type]
            new_previous = list(state.flat_views)
        if accumulate is not None:
            state.last_finite = launch.finite_flag
            return None, new_previous
        return _laid_out(state, terms, total, dtype), new_previous

    def _kernels(self):
        if self.kernel == "compiled" and "compile-failed" not in self._warned:
            return sqrt_form_kernels(True)
        return sqrt_form_kernels(False)

    def _run_kernel(self, name: str, *args: Tensor) -> Tensor:
        kernels = self._kernels()
        try:
            return getattr(kernels, name)(*args)
        except Exception as error:  # no C++ compiler / Triton, or an unsupported dtype: eager is the same math
            if not kernels.compiled:
                raise
            self._warn_once(
                "compile-failed",
                f"kernel='compiled' could not compile ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                "the same math runs eagerly instead",
            )
            return getattr(sqrt_form_kernels(False), name)(*args)

    def _sqrt_form_contributions(
        self,
        state: _GroupState,
        form: tuple,
        update: tuple[float, float] | None,
        grads: list[Tensor],
        indices: list[int],
        with_previous: list[int],
        numel: int,
        dtype: torch.dtype,
        found_inf: Tensor | None,
    ) -> tuple[Tensor, list[Tensor | None]]:
        """The square-root-form path (:mod:`lightning_adamtype.kernels`): the group's tensors are sorted by
        (has η_{t−1}, working dtype) and passed to the kernels in chunks of 8, 4, 2 or 1 tensors (one Python call
        and, compiled, one fused loop per tensor). Rows of tensors with η_{t−1} come first, so c is a slice sum."""
        vs, scalars = form
        device = vs[0].device
        previous_set = set(with_previous)
        works = [torch.promote_types(v.dtype, torch.float32) for v in vs]
        kinds = [(k not in previous_set, str(works[k])) for k in range(len(vs))]
        order = sorted(range(len(vs)), key=kinds.__getitem__)  # usually the identity
        table = scalar_table([scalars[k] for k in order], dtype, device)  # row r belongs to tensor order[r]
        if update is not None:
            factors = to_device([1.0 / update[0], update[1]], dtype, device)
        rows: list[Tensor] = []
        new_previous: list[Tensor | None] = [None] * len(vs)
        start = 0
        while start < len(order):  # runs of one (has η_{t−1}, working dtype)
            stop = start + 1
            while stop < len(order) and kinds[order[stop]] == kinds[order[start]]:
                stop += 1
            has_previous, work = order[start] in previous_set, works[order[start]]
            for a, b in chunks(stop - start):
                ks = order[start + a : start + b]
                v_chunk = [vs[k].reshape(-1) for k in ks]  # views (copies only for non-contiguous state)
                g_chunk = [grads[k].reshape(-1).to(work) for k in ks]
                t_chunk = table[start + a : start + b].to(work)
                if update is not None:  # recomputed: no per-coordinate buffer
                    if has_previous:
                        p_chunk = torch.stack([state.previous_scales[indices[k]] for k in ks]).to(work)
                        rows.append(self._run_kernel("recomputed", v_chunk, g_chunk, t_chunk, p_chunk, factors.to(work)))
                    else:
                        rows.append(self._run_kernel("current", v_chunk, g_chunk, t_chunk))
                    continue
                buffers = [self._previous_buffer(state, indices[k], vs[k], work, has_previous) for k in ks]
                name = "stored" if has_previous else "first"
                rows.append(self._run_kernel(name, v_chunk, g_chunk, [b.view(-1) for b in buffers], t_chunk))
                for k, buf in zip(ks, buffers):
                    new_previous[k] = buf
            start = stop
        if update is not None:
            skipped = found_inf.to(device) > 0 if found_inf is not None else None
            for k, new in zip(order, table.unbind(0)):
                pi = indices[k]
                old = state.previous_scales.get(pi)
                if skipped is not None and old is not None:  # a skipped step keeps the previous scalars
                    new = torch.where(skipped, old, new)
                state.previous_scales[pi] = new
                state.previous.pop(pi, None)
        terms = torch.cat(rows).to(dtype)
        coords = sum(vs[k].numel() for k in with_previous)
        zero = torch.zeros((), dtype=dtype, device=device)
        c = terms[: len(with_previous), 2].sum() if with_previous else zero
        contributions = torch.stack(
            [
                torch.ones((), dtype=dtype, device=device),
                terms[:, 0].min(),
                terms[:, 1].sum(),
                c,
                terms[: len(with_previous), 3].sum() if with_previous else zero,
                terms[:, 4].sum() / numel,
                c / coords if with_previous else zero,
            ]
        )
        return contributions, new_previous

    @staticmethod
    def _previous_buffer(state: _GroupState, pi: int, v: Tensor, work: torch.dtype, has_previous: bool) -> Tensor:
        """The contiguous η buffer of one parameter, written in place by the kernels: the stored η_{t−1} when it
        has v's shape and the working dtype (a view into a small group's flat buffer is copied out once)."""
        buf = state.previous.get(pi)
        if (
            has_previous
            and isinstance(buf, Tensor)
            and buf.shape == v.shape
            and buf.dtype == work
            and buf.is_contiguous()
            and buf._base is None
        ):
            return buf
        if has_previous and isinstance(buf, Tensor):
            return buf.to(dtype=work, memory_format=torch.contiguous_format).reshape(v.shape).clone()
        return torch.empty(v.shape, dtype=work, device=v.device)

    # ------------------------------------------------------------------ verdicts and the switch
    def _update_verdicts(self, gi: int) -> None:
        state = self._groups[gi]
        acc = state.accumulators
        assert acc is not None
        if not state.detectors:
            state.detectors = {
                kind: TrendDetector(self.trend_options, device=acc.device, dtype=acc.dtype) for kind in ("variance", "bias")
            }
        sampled = False
        for kind, key in (("variance", "b"), ("bias", "c")):
            detector = state.detectors[kind]
            if state.count >= detector.next_sample_step:  # host ints: no device work on other steps
                ratio = acc[ACCUMULATOR_KEYS.index(key)] / acc[ACCUMULATOR_KEYS.index("a")]
                if state.last_finite is not None:  # a non-finite step is an invalid sample, not a frozen ratio
                    ratio = torch.where(state.last_finite, ratio, torch.full_like(ratio, math.nan))
                sampled |= detector.update(state.count, ratio)
        if sampled and self.switch_to_amsgrad:  # the group's name is built only here, at sample steps
            name = self.group_names()[gi]
            if name not in self.switched:
                self._maybe_switch(gi, name)

    def _maybe_switch(self, gi: int, name: str) -> None:
        """Read the bias verdict (one byte, only at a sample step), share rank 0's, and switch if it holds."""
        detector = self._groups[gi].detectors["bias"]
        flag = detector.violation.to(torch.uint8).reshape(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_backend() == "gloo":
                flag = flag.cpu()
            torch.distributed.broadcast(flag, src=0)
        if not bool(flag):
            return
        group = self.optimizer.param_groups[gi]
        enable = getattr(self.adapter, "enable_amsgrad", None)
        if not callable(enable):
            self._warn_once(
                "switch",
                f"switch_to_amsgrad=True but {type(self.optimizer).__name__} cannot switch to AMSGrad "
                "(only Adam and AdamW can); it is left alone",
            )
            self.switched[name] = -1
            return
        if group.get("amsgrad", False):
            return
        enable(self.optimizer, group)
        if self.previous_stepsize == "recomputed":
            # AMSGrad's running max cannot be undone, so from here on this group stores η_{t−1}. Seed it with η_t
            # (AMSGrad's max starts at v_t, so this is the η_t the next step's oscillation is measured against).
            state = self._groups[gi]
            with_state = [(pi, p) for pi, p in enumerate(group["params"]) if self.optimizer.state.get(p)]
            if with_state:
                etas = self.adapter.effective_stepsizes(group, [self.optimizer.state[p] for _, p in with_state])
                for (pi, _), eta in zip(with_state, etas):
                    state.previous[pi] = eta
                    state.previous_scales.pop(pi, None)
        step = self.observations + 1
        self.switched[name] = step
        slope = float(detector.slope)
        reason = (
            f"bias ratio C/A is not going to 0: log-log slope {slope:.3f} > -{self.trend_options.margin} "
            f"for {self.trend_options.patience} samples in a row"
        )
        self.switch_events.append((name, step, reason))

    @staticmethod
    def _tensor_contributions(
        state: _GroupState,
        etas: list[Tensor],
        grads: list[Tensor],
        indices: list[int],
        with_previous: list[int],
        numel: int,
        dtype: torch.dtype,
        found_inf: Tensor | None,
        amin: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        zero = torch.zeros((), dtype=dtype, device=etas[0].device)
        c = c2 = c_mean = zero
        new_previous = etas
        scratch: dict[int, Tensor] = {}
        if with_previous and found_inf is None:
            # P2: η_{t−1} is owned by the tracker and replaced below: take the differences in place, then reuse
            # the buffers for η ⊙ g (no full-size temporaries).
            current = [etas[i] for i in with_previous]
            previous = [state.previous[indices[i]] for i in with_previous]
            torch._foreach_sub_(previous, current)  # η_{t−1} − η_t: same norms as η_t − η_{t−1}
            c = _sum(torch._foreach_norm(previous, 1), dtype)
            c2 = _sum_squares(torch._foreach_norm(previous, 2), dtype)
            c_mean = c / sum(e.numel() for e in current)
            scratch = dict(zip(with_previous, previous))
        elif with_previous:
            current = [etas[i] for i in with_previous]
            previous = [state.previous[indices[i]] for i in with_previous]
            c, c2, diffs = oscillation(current, previous, dtype)
            c_mean = c / sum(e.numel() for e in current)
            if found_inf is not None:
                # A skipped step keeps η_{t−1}: previous + (1 − found_inf)·(η − previous).
                keep = 1 - found_inf.to(device=etas[0].device, dtype=etas[0].dtype)
                new_previous = list(etas)
                for k, i in enumerate(with_previous):
                    new_previous[i] = previous[k] + keep * diffs[k]
        one = torch.ones((), dtype=dtype, device=etas[0].device)
        return (
            torch.stack(
                [
                    one,
                    min_stepsize(etas, dtype) if amin is None else amin,
                    squared_step_norm(etas, grads, dtype, out=[scratch.get(i) for i in range(len(etas))]),
                    c,
                    c2,
                    stepsize_sum(etas, dtype) / numel,
                    c_mean,
                ]
            ),
            new_previous,
        )

    @staticmethod
    def _uniform_contributions(
        state: _GroupState,
        eta: float | Tensor,
        grads: list[Tensor],
        entries: list[tuple[int, Tensor, Any]],
        with_previous: list[int],
        numel: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> tuple[Tensor, list[float | Tensor]]:
        """Every coordinate shares one η (SGD): no per-coordinate η is materialised or stored."""
        eta_t = eta.to(device=device, dtype=dtype) if isinstance(eta, Tensor) else to_device(eta, dtype, device)
        work = torch.promote_types(grads[0].dtype, torch.float32)  # bf16/fp16 gradients: the norm in float32
        grad_sq = torch.stack([n.to(dtype).square() for n in torch._foreach_norm(grads, 2, dtype=work)]).sum()
        coords = sum(entries[i][1].numel() for i in with_previous)
        if with_previous:
            prev = torch.stack([torch.as_tensor(state.previous[entries[i][0]], dtype=dtype, device=device) for i in with_previous])
            sizes = to_device([float(entries[i][1].numel()) for i in with_previous], dtype, device)
            diff = (eta_t - prev).abs()
            c, c2 = (diff * sizes).sum(), (diff.square() * sizes).sum()
            c_mean = c / coords
        else:
            c = c2 = c_mean = torch.zeros((), dtype=dtype, device=device)
        contributions = torch.stack(
            [torch.ones((), dtype=dtype, device=device), eta_t, eta_t.square() * grad_sq, c, c2, eta_t, c_mean]
        )
        return contributions, [eta] * len(entries)

    # ------------------------------------------------------------------ memory accounting
    def held_tensors(self) -> list[Tensor]:
        """Every tensor the tracker keeps between steps (accumulators, η_{t−1} buffers and views, (s, e) pairs,
        trend-detector buffers, coupled-decay copies), found by walking its own state, so new fields are counted
        without being listed here. For memory accounting (``benchmarks/bench.py``, ``tests/test_hot_path.py``)."""
        found: dict[int, Tensor] = {}
        seen: set[int] = set()

        def walk(obj: Any) -> None:
            if id(obj) in seen:
                return
            seen.add(id(obj))
            if isinstance(obj, Tensor):
                found[id(obj)] = obj
            elif isinstance(obj, dict):
                for value in obj.values():
                    walk(value)
            elif isinstance(obj, (list, tuple)):
                for value in obj:
                    walk(value)
            elif type(obj).__module__.startswith(__package__) and hasattr(obj, "__dict__"):
                for value in vars(obj).values():
                    walk(value)

        walk(self._groups)
        walk(self._snapshots)
        walk(self._accumulate_constants)
        walk([value for value in vars(self).values() if isinstance(value, Tensor)])
        return list(found.values())

    def held_bytes(self) -> int:
        """Bytes of the storages behind :meth:`held_tensors` (a storage shared by several views counts once)."""
        storages = {}
        for t in self.held_tensors():
            storage = t.untyped_storage()
            storages[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return sum(storages.values())

    # ------------------------------------------------------------------ reading
    def stepsizes_from_state(self, group_index: int) -> dict[int, Tensor]:
        """η of every parameter of a group that has optimizer state, read now through the adapter
        (``{parameter index: η}``; for the histograms when ``previous_stepsize="recomputed"`` keeps no η)."""
        if self.adapter is None or not callable(getattr(self.adapter, "effective_stepsizes", None)):
            return {}
        group = self.optimizer.param_groups[group_index]
        with_state = [(pi, p) for pi, p in enumerate(group["params"]) if self.optimizer.state.get(p)]
        if not with_state:
            return {}
        with torch.no_grad():
            etas = self.adapter.effective_stepsizes(group, [self.optimizer.state[p] for _, p in with_state])
        return {pi: eta for (pi, _), eta in zip(with_state, etas)}

    def group_names(self) -> list[str]:
        """The names of the optimizer's groups, in order (design: ``<name>/pg<i>`` or the group's "name")."""
        return group_names(self.optimizer, self.name)

    def compute(self) -> dict[str, dict[str, float]]:
        """``{group name: {key: value}}`` with one host transfer.

        Keys: steps, a, b, c, c2, a_mean, c_mean (accumulated) and variance_ratio = b/a, bias_ratio = c/a,
        bias_ratio_mean = c_mean/a_mean (NaN before the first step). Groups never stepped are left out.
        """
        names = self.group_names()
        live = [(names[i], g) for i, g in enumerate(self._groups) if g.accumulators is not None and i < len(names)]
        if not live:
            return {}
        rows = []
        for _, g in live:
            assert g.accumulators is not None
            verdicts = [
                torch.stack([d.slope.to(g.accumulators), d.violation.to(g.accumulators)]) if d is not None
                else torch.full((2,), math.nan, dtype=g.accumulators.dtype, device=g.accumulators.device)
                for d in (g.detectors.get("variance"), g.detectors.get("bias"))
            ]
            rows.append(torch.cat([g.accumulators.detach(), *verdicts]).to("cpu", torch.float64))
        host = torch.stack(rows).tolist()
        out = {}
        for (name, _), values in zip(live, host):
            row = _with_ratios(dict(zip(ACCUMULATOR_KEYS, values[: len(ACCUMULATOR_KEYS)])))
            v_slope, v_viol, b_slope, b_viol = values[len(ACCUMULATOR_KEYS):]
            row.update(
                variance_slope=v_slope,
                bias_slope=b_slope,
                variance_violation=v_viol == 1.0,
                bias_violation=b_viol == 1.0,
            )
            out[name] = row
            if row["nonfinite_steps"] > 0:
                self._warn_once(
                    "nonfinite",
                    f"{name}: {int(row['nonfinite_steps'])} step(s) had non-finite (NaN/Inf) gradients or optimizer "
                    "state; they are left out of a, b, c, c2 and counted under 'nonfinite_steps'",
                )
        return out

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Accumulators and previous effective stepsizes (on the CPU), so a resumed run continues exactly."""
        return {
            "version": 1,
            "observations": self.observations,
            "switched": dict(self.switched),
            "groups": [
                {
                    "accumulators": None if g.accumulators is None else g.accumulators.detach().cpu().clone(),
                    # Sharded groups: η_{t−1} differs per rank and checkpoints keep rank 0's callback state, so it is not
                    # saved (the first step after a resume then adds no c; previous_stepsize="recomputed" needs none).
                    "previous": {}
                    if g.sharded
                    else {
                        pi: (eta.detach().cpu().clone() if isinstance(eta, Tensor) else eta) for pi, eta in g.previous.items()
                    },
                    "previous_scales": {pi: sc.detach().cpu().clone() for pi, sc in g.previous_scales.items()},
                    "last_seen": dict(g.last_seen),
                    "count": g.count,
                    "detectors": {kind: d.state_dict() for kind, d in g.detectors.items()},
                }
                for g in self._groups
            ],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; tensors move to the device of the group's parameters."""
        self.observations = int(state_dict.get("observations", 0))
        self._groups = []
        for gi, saved in enumerate(state_dict.get("groups", [])):
            params = self.optimizer.param_groups[gi]["params"] if gi < len(self.optimizer.param_groups) else []
            device = params[0].device if params else torch.device("cpu")
            g = _GroupState()
            acc = saved.get("accumulators")
            if acc is not None:
                acc = acc.to(device=device, dtype=accumulator_dtype(device)).clone()
                if acc.numel() < len(ACCUMULATOR_KEYS):  # a checkpoint of an older version: new keys start at 0
                    acc = torch.cat([acc, acc.new_zeros(len(ACCUMULATOR_KEYS) - acc.numel())])
                g.accumulators = acc
            for pi, eta in saved.get("previous", {}).items():
                pi = int(pi)
                target = params[pi].device if pi < len(params) else device
                g.previous[pi] = eta.to(target).clone() if isinstance(eta, Tensor) else eta  # P2 writes into it
            for pi, sc in saved.get("previous_scales", {}).items():
                pi = int(pi)
                g.previous_scales[pi] = sc.to(params[pi].device if pi < len(params) else device).clone()
            g.last_seen = {int(k): int(v) for k, v in saved.get("last_seen", {}).items()}
            g.count = int(saved.get("count", 0))
            for kind, det_state in saved.get("detectors", {}).items():
                det = TrendDetector(self.trend_options, device=device, dtype=accumulator_dtype(device))
                det.load_state_dict(det_state)
                g.detectors[kind] = det
            self._groups.append(g)
        self.switched = {str(k): int(v) for k, v in state_dict.get("switched", {}).items()}

    # ------------------------------------------------------------------ misc
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"lightning_adamtype ({self.name}): {message}", UserWarning, stacklevel=3)

    def __repr__(self) -> str:
        return f"ConditionTracker({type(self.optimizer).__name__}, name={self.name!r}, observations={self.observations})"


def _with_ratios(values: dict[str, float]) -> dict[str, float]:
    def ratio(num: float, den: float) -> float:
        return num / den if den > 0 else math.nan

    values["steps"] = float(values["steps"])
    values["nonfinite_steps"] = float(values["nonfinite_steps"])
    values["variance_ratio"] = ratio(values["b"], values["a"])
    values["bias_ratio"] = ratio(values["c"], values["a"])
    values["bias_ratio_mean"] = ratio(values["c_mean"], values["a_mean"])
    return values
