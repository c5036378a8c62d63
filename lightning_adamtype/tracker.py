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

from . import backends, sharding
from .adapter_kit import NotMapped
from .adapters import AdapterError, adapter_lookup, validate_first_step
from .backends.one_pass import PARTIAL
from .backends.steady import SteadyPlan
from .checkpoint import load_tracker_state, tracker_state
from .gather import EmptyShard, StepGatherer
from .group_state import GroupState
from .options import TrackerOptions
from .parameter_memory import ParameterMemory
from .row import ACCUMULATOR_KEYS, add_step
from .summary import TOP_K, VerdictWatch, summary_text, top_shares
from .switch import agreed_violation, current_stepsizes, reason as switch_reason, switch_to_amsgrad
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
        self._failed_backends: set[str] = set()
        self.verdict_watch = VerdictWatch()  # the verdicts last read, for the warning on a turn
        self._handles: list[RemovableHandle] = []
        self._warned: set[str] = set()
        self.gatherer = StepGatherer(optimizer, self.adapter, self.options, self.memory, self._warn_once)
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
            self._drop_steady(state)  # (it holds the optimizer's state tensors)

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
                observed = self._observe_group(state, found_inf, record=phase == "record")
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

    # ------------------------------------------------------------------ one group
    def _observe_group(self, state: GroupState, found_inf: Tensor | None, record: bool) -> bool:
        """Gather, compute and (when ``record``) accumulate one group's step; True when it was accumulated."""
        if "steady" in state.cache:
            if record and found_inf is None and self._steady_step(state):
                return True
            self._drop_steady(state)
        return self._general_step(state, found_inf, record)

    @torch.no_grad()
    def _general_step(self, state: GroupState, found_inf: Tensor | None, record: bool) -> bool:
        """The group's step through the general path: gather, validate, choose a backend, compute, keep."""
        gathered = self.gatherer.gather(state, found_inf, record, self.observations)
        if gathered is None:
            return False
        if isinstance(gathered, EmptyShard):
            return self._join_empty(state, gathered)
        step, keys, shards = gathered
        if state.count == 0 and state.kept is None:  # an adapter's η is checked on its group's first observed step
            problem = validate_first_step(self.adapter, step)
            if problem is not None:
                raise AdapterError(problem)  # (the per-group boundary disables the group, with one warning)
        result = self._compute(state, step)
        self.memory.keep(state, keys, result.etas, result.scales, self.observations)
        if not record:
            return False
        if result.terms is None:  # the backend added the row itself
            state.last_finite = result.finite
        else:
            terms, n = result.terms, result.n
            if shards is not None:
                terms, n = sharding.combine(terms, n, shards.process_group, step.device, step.dtype)
            state.last_finite = add_step(step.accumulators, terms, n, step.weight, step.found_inf)
        if shards is not None:  # every rank joins the shares' reduction, as the terms'
            table = sharding.combine_shares(result.per_tensor, shards.positions, len(shards.keys),
                                            shards.process_group, step.device, step.dtype)
            state.tensors.add(shards.keys, table, step.weight, state.last_finite)
        elif result.per_tensor is not None:
            state.tensors.add(keys, result.per_tensor, step.weight, state.last_finite)
        if state.count == 0:
            state.clock_offset = self._optimizer_step(step.states) - self.observe_every
        state.count += 1
        if result.terms is None and result.etas is not None and shards is None and self.observe_every == 1:
            try:
                self._plan_steady(state, step, keys)
            except Exception:  # a plan only saves host time: without one the general path keeps running the group
                state.cache.pop("steady", None)
        return True

    def _steady_step(self, state: GroupState) -> bool:
        """The group's step through its :class:`SteadyPlan` (nothing it checks changed since the last step); False
        when the plan no longer applies (nothing was computed)."""
        try:
            finite = state.cache["steady"].run(state.group, self.optimizer.state, self.observations)
        except Exception as error:  # as a backend that fails: not used again, the general path takes the step
            self._failed_backends.add(state.backend)
            self._warn_once(f"{state.backend}-failed", f"the {state.backend} backend failed ({type(error).__name__}: "
                            f"{error}); the foreach backend runs instead")
            return False
        if finite is None:
            return False
        assert state.kept is not None
        state.last_finite = finite
        state.kept = (self.observations, *state.kept[1:])  # η_t is in the kept views, written over η_{t−1}
        state.count += 1
        return True

    def _plan_steady(self, state: GroupState, step: backends.GroupStep, keys: list[Tensor]) -> None:
        """Keep what this native step found, for the group's next steps (when :meth:`SteadyPlan.build` can)."""
        buffer = state.cache.get("buffer")
        plan = SteadyPlan.build(
            step.group, self.optimizer.state, self.adapter, keys, step.states, step.form, state.cache.get(state.backend),
            buffer[0] if buffer else None, step.accumulators, step.weight, state.tensors, self.options.coordinates,
            self.observations,
        )
        if plan is not None:
            state.cache["steady"] = plan

    def _drop_steady(self, state: GroupState) -> None:
        """Forget the group's plan; its parameters' η_{t−1} were taken at the plan's last step."""
        plan = state.cache.pop("steady", None)
        if plan is not None:
            self.memory.taken(plan.keys, plan.last)

    def _join_empty(self, state: GroupState, empty: EmptyShard) -> bool:
        """A sharded group of which this rank holds nothing joins the reduction with neutral terms and counts as
        observed: the verdicts and the switch run on every rank alike."""
        assert state.accumulators is not None
        shards, dtype = empty.shards, state.accumulators.dtype
        terms, n = sharding.combine(None, 0, shards.process_group, empty.device, dtype)
        state.last_finite = add_step(state.accumulators, terms, n, float(self.observe_every))
        table = sharding.combine_shares(None, [], len(shards.keys), shards.process_group, empty.device, dtype)
        state.tensors.add(shards.keys, table, float(self.observe_every), state.last_finite)
        if state.count == 0:
            state.clock_offset = self._optimizer_step(empty.states) - self.observe_every
        state.count += 1
        return True

    def _optimizer_step(self, states: list[dict[str, Any]]) -> int:
        """The optimizer's own step count t of a group (its first parameter's ``state["step"]``, read once per
        group: a device counter costs one synchronisation then), else this tracker's observations."""
        counter = states[0].get("step") if states else None
        if counter is None:
            return self.observations
        return int(round(float(sharding.local_view(counter))))

    def _compute(self, state: GroupState, step: backends.GroupStep) -> backends.StepResult:
        """The step through the group's best backend that takes it; a backend that fails is never used again."""
        for name in backends.candidates(self.kernel, step.device):
            if name in self._failed_backends:
                continue
            backend = backends.backend(name)
            why = backend.unavailable(step.device) or backend.decline(step)
            if why is not None:
                if name == self.kernel and why != PARTIAL:
                    self._warn_once(f"{name}-declined-{why}", f"kernel={name!r} does not run for a group: {why}; the foreach backend runs it")
                continue
            if name == "foreach":
                state.backend = name
                return backend.run(step)
            try:
                result = backend.run(step)
            except Exception as error:
                self._failed_backends.add(name)
                self._warn_once(f"{name}-failed", f"the {name} backend failed ({type(error).__name__}: {error}); the foreach backend runs instead")
                state.cache.clear()
                continue
            state.backend = name
            return result
        raise RuntimeError("no backend took the step")  # pragma: no cover - foreach takes every step

    # ------------------------------------------------------------------ verdicts and the switch
    def _update_verdicts(self, state: GroupState) -> bool:
        """Feed the group's detectors (:func:`lightning_adamtype.verdicts.update_verdicts`); True when a sample was
        taken and the switch may act."""
        return update_verdicts(state, self.observe_every, self.trend_options) and self.switch_to_amsgrad

    def _maybe_switch(self, state: GroupState, name: str) -> None:
        if name in self.switched or state.group is None:
            return
        detector = state.detectors["bias"]
        if not agreed_violation(detector):
            return
        was_amsgrad = state.group.get("amsgrad", False)
        why_not = switch_to_amsgrad(self.optimizer, self.adapter, state.group)
        if why_not is not None:
            self._warn_once("switch", f"switch_to_amsgrad=True but {why_not}")
            self.switched[name] = -1
            return
        if was_amsgrad:
            return
        if self.previous_stepsize == "recomputed":
            state.kept = None
            self._seed_stored_stepsizes(state.group)
        step = state.clock + 1  # the first optimizer step run as AMSGrad (the verdicts' clock)
        self.switched[name] = step
        options = self.trend_options
        self.switch_events.append((name, step, switch_reason(float(detector.slope), options.margin, options.patience)))

    def _seed_stored_stepsizes(self, group: dict[str, Any]) -> None:
        """After a switch in recomputed mode the group stores η_{t−1} (a running max cannot be undone): η_t now."""
        for p, eta in current_stepsizes(self.optimizer, self.adapter, group):
            self.memory.store(p, eta)

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
        out: dict[str, Tensor] = {}
        for name, state in zip(self.group_names(), self._groups):
            pieces = []
            params = [p for p in (state.group or {}).get("params", [])]
            for p in params:
                eta = self.memory.previous.get(id(p))
                if eta is None and id(p) in self.memory.scales and self.adapter is not None and self.optimizer.state.get(p):
                    with torch.no_grad():
                        eta = self.adapter.effective_stepsizes(state.group or {}, [self.optimizer.state[p]])[0]
                if isinstance(eta, Tensor) and eta.numel() > 1:  # (kept as −η where inactive)
                    pieces.append(sharding.local_view(eta).detach().reshape(-1).abs().to("cpu", torch.float32))
                elif eta is not None:
                    pieces.append(torch.full((sharding.local_view(p).numel(),), abs(float(eta)), dtype=torch.float32))
            if pieces:
                out[name] = torch.cat(pieces)
        return out

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
        from .readout import read_groups

        self._align_groups()
        out = read_groups(self.group_names(), self._groups)
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
        out = {}
        for name, state in zip(self.group_names(), self._groups):
            rows = state.tensors.read()
            if rows:
                index = {id(p): i for i, p in enumerate((state.group or {}).get("params", []))}
                named = {id(p): n for p, n in self.parameter_names.items()}
                out[name] = [(named.get(id(p), f"{name}[{index.get(id(p), '?')}]"), values) for p, values in rows]
        return out

    def summary(self) -> str:
        """A short text report (see :func:`lightning_adamtype.summary.summary_text`): per group both verdicts, their
        slopes and the step they last changed, the switch, the inactive share, the tensors with the largest shares of
        c and b, and what a violation means in practice."""
        return summary_text(self.name, self.compute(), dict(self.switched), self.tensor_shares())

    def held_tensors(self) -> list[Tensor]:
        """Every tensor the tracker keeps between steps (accumulators, η_{t−1} and its (s, e), the backends' buffers,
        trend-detector buffers, coupled-decay copies). For memory accounting."""
        from .readout import tensors_in

        memory = self.memory
        return tensors_in([memory.previous, memory.scales, memory.snapshots, [
            # (the one-pass backends' "eligible" entry and the steady plan hold the optimizer's own state tensors, not
            # the tracker's; the plan's η buffer is the "buffer" entry)
            (s.accumulators, {k: v for k, v in s.cache.items() if k not in ("eligible", "steady")}, s.detectors, s.last_finite)
            for s in self._groups
        ]])

    def held_bytes(self) -> int:
        """Bytes of the storages behind :meth:`held_tensors` (a storage shared by several views counts once)."""
        storages = {}
        for t in self.held_tensors():
            storage = t.untyped_storage()
            storages[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return sum(storages.values())

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Accumulators, verdict state and each parameter's η_{t−1} (on the CPU), so a resumed run continues."""
        self._align_groups()
        for state in self._groups:
            self._drop_steady(state)
        return tracker_state(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (also the previous version's); tensors move to the parameters'
        devices; an η_{t−1} whose parameter is missing or changed shape is dropped, with one warning."""
        for state in self._groups:
            self._drop_steady(state)
        load_tracker_state(self, state_dict)

    def __repr__(self) -> str:
        return f"ConditionTracker({type(self.optimizer).__name__}, name={self.name!r}, observations={self.observations})"
