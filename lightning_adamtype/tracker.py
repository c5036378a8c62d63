"""``ConditionTracker``: measures the Adam-type convergence conditions of a plain PyTorch optimizer.

No Lightning here. The tracker hooks the optimizer's ``step`` (pre- and post-hooks), gathers one
:class:`~lightning_adamtype.backends.GroupStep` per group after every step that really happened, hands it to the
group's backend (:mod:`lightning_adamtype.backends`), adds the step's row (:mod:`lightning_adamtype.row`) to the
group's accumulators on the device, and feeds the trend detectors. Numbers reach the host only in :meth:`compute`.

The hooks are a fail-safe boundary: nothing the package raises leaves ``optimizer.step()``. A group whose
measurement fails is reported once and no longer measured; training goes on bitwise as without the tracker.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from . import readout
from .adapter_kit import NotMapped
from .adapters import adapter_lookup
from .checkpoint import load_tracker_state, tracker_state
from .group_step import GroupStepper
from .group_state import GroupState
from .options import TrackerOptions
from .parameter_memory import ParameterMemory
from .row import ACCUMULATOR_KEYS
from .summary import TOP_K, VerdictWatch, summary_text, top_shares
from .switch import maybe_switch
from .trend import TrendOptions
from .verdicts import VERDICTS, update_verdicts

__all__ = ["ACCUMULATOR_KEYS", "VERDICTS", "ConditionTracker", "group_names"]


REPORT = (
    "training goes on untouched. Please report it (the message, the optimizer class and its param-group settings) "
    "to the lightning_adamtype issue tracker"
)


def group_names(optimizer: torch.optim.Optimizer, prefix: str | None = None) -> list[str]:
    """``<prefix>/pg<i>`` for each group (prefix defaults to the optimizer's class name), or the group's "name"."""
    prefix = prefix or type(optimizer).__name__
    names = []
    for i, group in enumerate(optimizer.param_groups):
        name = group.get("name")
        names.append(f"{prefix}/{name}" if isinstance(name, str) and name else f"{prefix}/pg{i}")
    return names


class ConditionTracker:
    """Track A_T, B_T, C_T, C2_T (Chen et al., ICLR 2019) for every parameter group of ``optimizer``.

    At every optimizer step t (per group, over the parameters that had a gradient):

        A_T  = Σ_t min_j η_{t,j}                B_T  = Σ_t ‖η_t ⊙ g_t‖₂²
        C_T  = Σ_{t≥2} ‖η_t − η_{t−1}‖₁         C2_T = Σ_{t≥2} ‖η_t − η_{t−1}‖₂²

    and :meth:`compute` adds variance_ratio = B/A and bias_ratio = C/A (both should go to 0), the per-coordinate
    view a_mean = Σ_t mean_j η_{t,j}, c_mean = Σ_t ‖η_t − η_{t−1}‖₁ / n'_t, bias_ratio_mean = c_mean / a_mean, the
    trend detectors' slopes and verdicts, and ``measured`` (1, or 0 once the group's measurement failed).

    Args:
        optimizer: any ``torch.optim.Optimizer`` with a registered adapter (see :func:`register_adapter`); others
            get one warning and train untouched.
        name: prefix of the group names (default: the optimizer's class name).
        switch_to_amsgrad: switch a group to AMSGrad in place when its bias verdict says violation (Adam, AdamW).
        trend: options of the trend detectors (:class:`~lightning_adamtype.trend.TrendOptions`).
        kernel: ``"auto"`` (default): ``"triton"`` on CUDA groups, ``"native"`` on CPU groups, where they can run,
            else ``"foreach"``; or one of those names (one warning where it cannot run, then ``"foreach"``).
            See :mod:`lightning_adamtype.backends`.
        previous_stepsize: ``"stored"`` (default): keep η_{t−1} (4 bytes per coordinate). ``"recomputed"``: rebuild
            it from the state, v_{t−1} = (v_t − w·g_t²)/k (Adam/AdamW without AMSGrad, Adagrad, RMSprop not
            centered; others store it, with one warning).
        observe_every: k ≥ 1: observe only the step pairs (t − 1, t) with t divisible by k, each weighted by k.
        coordinates: ``"active"`` (default): a, b, c, c2 sum over the coordinates the theory covers, those that
            have had a non-zero gradient (v > 0), and c, c2 leave out the step at which a coordinate becomes
            active; ``"all"``: every coordinate, the paper's formulas as written (see :data:`~lightning_adamtype.
            options.COORDINATES`).
        start_step: ignore the optimizer steps before this one (as if the tracker were attached there; 1 = from
            the first step).
        parameter_names: ``{parameter: name}`` (e.g. from ``module.named_parameters()``): checkpoints then key
            η_{t−1} by name, so a resumed run with reordered parameters keeps it; else by position in the group.

    State that belongs to a parameter (η_{t−1}, its (s, e), the step it was taken at) is keyed by the parameter
    object. A parameter without a gradient at a step is left out of that step; c and c2 only count parameters that
    also had an η at the previous observed step (a parameter whose shape changed starts over, with one warning);
    a step a ``GradScaler`` skipped is not counted.
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
        coordinates: str = "active",
        start_step: int = 1,
        parameter_names: dict[Tensor, str] | None = None,
    ) -> None:
        self.options = TrackerOptions(
            switch_to_amsgrad, trend, kernel, previous_stepsize, observe_every, coordinates, start_step
        ).validated(
            "ConditionTracker"
        )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"ConditionTracker expects a torch.optim.Optimizer, got {type(optimizer).__name__}; "
                "pass the optimizer itself (for a LightningOptimizer, its .optimizer)"
            )
        self.optimizer = optimizer
        self.name = name or type(optimizer).__name__
        self.parameter_names = dict(parameter_names or {})
        self.adapter, why_not = adapter_lookup(optimizer)
        self.observations = 0  # optimizer steps seen (host counter)
        #: group name → the optimizer step (this tracker's count) from which the group ran AMSGrad (-1: could not).
        self.switched: dict[str, int] = {}
        #: (group name, step, reason) for every switch, in order; readers may pop them (the callback does).
        self.switch_events: list[tuple[str, int, str]] = []
        self._groups: list[GroupState] = []
        self.memory = ParameterMemory()  # each parameter's η_{t−1}, keyed by the parameter
        self.verdict_watch = VerdictWatch()  # the verdicts last read, for the warning on a turn
        self._handles: list[RemovableHandle] = []
        self._warned: set[str] = set()
        self.stepper = GroupStepper(optimizer, self.adapter, self.options, self.memory, self._warn_once)
        if self.adapter is None:
            warnings.warn(
                f"lightning_adamtype: no adapter for optimizer class {type(optimizer).__qualname__!r} "
                f"({type(optimizer).__module__}): {why_not}; it is not monitored and trains untouched. Map it onto the paper's "
                "template with lightning_adamtype.register_adapter(YourOptimizer, adapter) "
                "(see lightning_adamtype.OptimizerAdapter).",
                UserWarning,
                stacklevel=2,
            )
            return
        self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
        self._handles.append(optimizer.register_step_post_hook(self._post_step))

    # ------------------------------------------------------------------ options (read-only views)
    @property
    def kernel(self) -> str:
        return self.options.kernel

    @property
    def previous_stepsize(self) -> str:
        return self.options.previous_stepsize

    @property
    def observe_every(self) -> int:
        return self.options.observe_every

    @property
    def switch_to_amsgrad(self) -> bool:
        return self.options.switch_to_amsgrad

    @property
    def trend_options(self) -> TrendOptions:
        assert self.options.trend is not None
        return self.options.trend

    # ------------------------------------------------------------------ lifecycle
    @property
    def attached(self) -> bool:
        """Whether the tracker is hooked to its optimizer."""
        return bool(self._handles)

    def remove(self) -> None:
        """Detach from the optimizer; the accumulators stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.memory.snapshots.clear()
        for state in self._groups:
            self.stepper.drop_steady(state)  # (it holds the optimizer's state tensors)

    def __deepcopy__(self, memo: dict) -> Any:
        raise TypeError(
            "a ConditionTracker cannot be copied: a copy would not be hooked to any optimizer and would silently stop "
            "updating. Save tracker.state_dict() and load it into a new ConditionTracker(optimizer) instead"
        )

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            "a ConditionTracker cannot be pickled (it holds hooks on a live optimizer); pickle tracker.state_dict() "
            "and load it into a new ConditionTracker(optimizer) instead"
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"lightning_adamtype ({self.name}): {message}", UserWarning, stacklevel=3)

    def _give_up(self, where: str, error: BaseException) -> None:
        """The boundary: an error outside any one group detaches the tracker, with one warning."""
        self.remove()
        self._warn_once(
            "tracker-failed",
            f"the tracker failed in its {where} ({type(error).__name__}: {error}) and detached itself; " + REPORT,
        )

    # ------------------------------------------------------------------ hooks
    def _phase(self, observation: int) -> str:
        """"record", "prepare" (take η_{t−1} only) or "skip" for an optimizer step, with ``observe_every``."""
        observation -= self.options.start_step - 1  # steps before start_step are not observed at all
        if observation < 1:
            return "skip"
        k = self.observe_every
        if k == 1 or observation % k == 0:
            return "record"
        return "prepare" if (observation + 1) % k == 0 else "skip"

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> tuple[Any, Any] | None:
        """Coupled weight decay puts λ·x_t (the parameter *before* the update) into g_t: keep x_t for the post-hook,
        once the gradients exist (now, or right after a closure returns, by wrapping it)."""
        try:
            return self._wrap_closure(optimizer, args, kwargs)
        except Exception as error:  # the boundary
            self._give_up("pre-step hook", error)
            return None

    def _wrap_closure(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> tuple[Any, Any] | None:
        assert self.adapter is not None
        self.memory.snapshots.clear()
        if self._phase(self.observations + 1) == "skip":
            return None
        if not any(self.adapter.coupled_weight_decay(group) != 0.0 for group in optimizer.param_groups):
            return None
        first = 1 if args and args[0] is optimizer else 0
        in_args = len(args) > first and callable(args[first])
        closure = args[first] if in_args else kwargs.get("closure")
        if not callable(closure):
            self.memory.take_snapshots(optimizer, self.adapter.coupled_weight_decay)
            return None

        coupled_weight_decay = self.adapter.coupled_weight_decay

        def closure_then_snapshot() -> Any:
            loss = closure()  # the user's closure: its errors are the user's
            try:
                self.memory.take_snapshots(optimizer, coupled_weight_decay)
            except Exception as error:  # the boundary
                self._give_up("snapshot of the parameters", error)
            return loss

        if in_args:
            return (*args[:first], closure_then_snapshot, *args[first + 1 :]), kwargs
        return args, {**kwargs, "closure": closure_then_snapshot}

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        try:
            self._observe_step(optimizer)
        except Exception as error:  # the boundary
            self._give_up("post-step hook", error)
        finally:
            self.memory.snapshots.clear()

    def _observe_step(self, optimizer: torch.optim.Optimizer) -> None:
        found_inf = getattr(optimizer, "found_inf", None)
        if isinstance(found_inf, Tensor) and found_inf.device.type == "cpu":
            # a CPU flag is read for free: a step a fused optimizer skipped is not a step
            if bool(found_inf.sum() > 0):
                return
            found_inf = None
        elif not isinstance(found_inf, Tensor):
            found_inf = None
        self.observations += 1
        phase = self._phase(self.observations)
        if phase == "skip":
            return
        self._align_groups()
        names = None
        for gi, state in enumerate(self._groups):
            if state.disabled:
                continue
            try:
                observed = self.stepper.observe(state, found_inf, phase == "record", self.observations)
                if observed and self._update_verdicts(state):
                    names = names or self.group_names()
                    self._maybe_switch(state, names[gi])
            except Exception as error:  # the boundary, per group
                names = names or self.group_names()
                self._disable(state, names[gi], error)

    def _disable(self, state: GroupState, name: str, error: BaseException) -> None:
        state.disabled = f"{type(error).__name__}: {error}"
        state.cache.clear()
        if isinstance(error, NotMapped):  # the adapter's own, deliberate refusal of these settings
            message = (f"group {name!r} of {type(self.optimizer).__name__} is not measured: {error}. compute() gives it "
                       "'measured' = 0 and training goes on untouched")
        else:
            message = (f"measuring group {name!r} of {type(self.optimizer).__name__} failed at optimizer step "
                       f"{self.observations} ({state.disabled}); this group is no longer measured (compute() gives it "
                       "'measured' = 0) and " + REPORT)
        self._warn_once(f"disabled-{name}", message)

    def _align_groups(self) -> None:
        """One :class:`GroupState` per param group, following each group (its "params" list, which
        ``optimizer.load_state_dict`` keeps, or its dict): a deleted group's state goes, an added group gets a new
        one; per-parameter state of parameters no longer in the optimizer is released."""
        groups = self.optimizer.param_groups
        if len(groups) == len(self._groups) and all(s.group is g for s, g in zip(self._groups, groups)):
            return
        by_params = {id(s.group["params"]): s for s in self._groups if s.group is not None}
        by_dict = {id(s.group): s for s in self._groups if s.group is not None}
        aligned, taken = [], set()
        for gi, group in enumerate(groups):
            state = by_params.get(id(group["params"])) or by_dict.get(id(group))
            if state is None or id(state) in taken:  # a new group, or states loaded before the first step
                loose = self._groups[gi] if gi < len(self._groups) and self._groups[gi].group is None else None
                state = loose or GroupState()
            state.group = group
            taken.add(id(state))
            aligned.append(state)
        if any(s.accumulators is not None and id(s) not in taken for s in self._groups):
            self._warn_once("group-removed", "a param group was removed from the optimizer; its numbers are dropped")
        self._groups = aligned
        live = {id(p) for group in groups for p in group["params"]}
        self.memory.release(live)

    # ------------------------------------------------------------------ verdicts and the switch
    def _update_verdicts(self, state: GroupState) -> bool:
        """Feed the group's detectors (:func:`lightning_adamtype.verdicts.update_verdicts`); True when a sample was
        taken and the switch may act."""
        return update_verdicts(state, self.observe_every, self.trend_options) and self.switch_to_amsgrad

    def _maybe_switch(self, state: GroupState, name: str) -> None:
        why_not = maybe_switch(self.optimizer, self.adapter, state, name, self.switched, self.switch_events,
                               self.options, self.memory)
        if why_not is not None:
            self._warn_once("switch", f"switch_to_amsgrad=True but {why_not}")

    # ------------------------------------------------------------------ reading
    def group_names(self) -> list[str]:
        """The names of the optimizer's groups, in order (``<name>/pg<i>`` or the group's "name")."""
        return group_names(self.optimizer, self.name)

    def backends(self) -> dict[str, str]:
        """``{group name: backend}`` of each group's latest observed step ("foreach", "native", "triton")."""
        self._align_groups()
        return {n: s.backend for n, s in zip(self.group_names(), self._groups) if s.backend}

    def stepsizes(self) -> dict[str, Tensor]:
        """``{group name: η of every coordinate}`` (flat float32 CPU) from the latest observed step: the kept
        η_{t−1}, or (recomputed mode) read now from the optimizer state through the adapter."""
        self._align_groups()
        return readout.stepsizes(self.group_names(), self._groups, self.memory, self.adapter, self.optimizer)

    def compute(self) -> dict[str, dict[str, float]]:
        """``{group name: {key: value}}`` with one host transfer per device (and one for the per-tensor shares).

        Keys: steps, a, b, c, c2, a_mean, c_mean, nonfinite_steps, activations (accumulated), inactive and
        coordinates (of the latest step), inactive_share, variance_ratio = b/a, bias_ratio = c/a, bias_ratio_mean
        = c_mean/a_mean (NaN before the first step); per verdict (``variance``, ``bias``): ``<kind>_slope`` (of the
        windowed increment ratio), ``<kind>_violation`` (1.0 trending toward violation, 0.0 holds, NaN unknown),
        ``<kind>_window_ratio``, ``<kind>_changed_at``, ``<kind>_steps_needed``; ``b_share_top<i>`` and
        ``c_share_top<i>`` (the largest per-tensor shares, names in :meth:`tensor_shares`); measured (0 once the
        group's measurement failed). Groups never observed are left out. A verdict that turned to violation since
        the previous call gives one warning (rank zero)."""
        self._align_groups()
        out = readout.read_groups(self.group_names(), self._groups)
        shares = self.tensor_shares()
        for name, row in out.items():
            for column, key in ((0, "b"), (1, "c")):
                top = top_shares(shares.get(name, []), column)
                for i in range(TOP_K):
                    row[f"{key}_share_top{i + 1}"] = top[i][1] if i < len(top) else math.nan
            if row["nonfinite_steps"] > 0:
                self._warn_once(
                    "nonfinite",
                    f"{name}: {int(row['nonfinite_steps'])} step(s) had non-finite (NaN/Inf) gradients or optimizer "
                    "state; they are left out of a, b, c, c2 and counted under 'nonfinite_steps'",
                )
        self.verdict_watch.check(self.name, out)
        return out

    def tensor_shares(self) -> dict[str, list[tuple[str, list[float]]]]:
        """``{group name: [(parameter name, [B_i, C_i, activations_i, inactive_i]), ...]}``: each parameter's
        accumulated b and c (its share is B_i / Σ B), activations, and inactive coordinates at the latest step.
        Names come from ``parameter_names`` (the callback passes ``named_parameters()``), else ``<group>[i]``."""
        self._align_groups()
        return readout.tensor_shares(self.group_names(), self._groups, self.parameter_names)

    def summary(self) -> str:
        """A short text report (see :func:`lightning_adamtype.summary.summary_text`): per group both verdicts, their
        slopes and the step they last changed, the switch, the inactive share, the tensors with the largest shares of
        c and b, and what a violation means in practice."""
        return summary_text(self.name, self.compute(), dict(self.switched), self.tensor_shares())

    def held_tensors(self) -> list[Tensor]:
        """Every tensor the tracker keeps between steps (accumulators, η_{t−1} and its (s, e), the backends' buffers,
        trend-detector buffers, coupled-decay copies). For memory accounting."""
        return readout.held_tensors(self.memory, self._groups)

    def held_bytes(self) -> int:
        """Bytes of the storages behind :meth:`held_tensors` (a storage shared by several views counts once)."""
        return readout.storage_bytes(self.held_tensors())

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Accumulators, verdict state and each parameter's η_{t−1} (on the CPU), so a resumed run continues."""
        self._align_groups()
        for state in self._groups:
            self.stepper.drop_steady(state)
        return tracker_state(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (also the previous version's); tensors move to the parameters'
        devices; an η_{t−1} whose parameter is missing or changed shape is dropped, with one warning."""
        for state in self._groups:
            self.stepper.drop_steady(state)
        load_tracker_state(self, state_dict)

    def __repr__(self) -> str:
        return f"ConditionTracker({type(self.optimizer).__name__}, name={self.name!r}, observations={self.observations})"
