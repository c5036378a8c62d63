"""Measuring one parameter group's optimizer step (:class:`GroupStepper`): the steady plan, else the general path.

The general path gathers the group's step record (:class:`lightning_adamtype.gather.StepGatherer`), checks an
adapter's first η, runs the best backend that takes the step (:mod:`lightning_adamtype.backends`; one that fails is
never used again), keeps each parameter's η_t (:class:`lightning_adamtype.parameter_memory.ParameterMemory`) and
adds the step's row, Σ over the group's counted coordinates and pairs (:mod:`lightning_adamtype.row`), to the
group's accumulators and each parameter's share of b and c to its table. After a full one-pass step it keeps a
:class:`lightning_adamtype.backends.steady.SteadyPlan`, which takes the group's next steps while what it checks
holds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import backends, sharding
from .adapters import AdapterError, validate_first_step
from .backends.one_pass import PARTIAL
from .backends.steady import SteadyPlan
from .gather import EmptyShard, StepGatherer
from .group_state import GroupState
from .options import TrackerOptions
from .parameter_memory import ParameterMemory
from .row import add_step

__all__ = ["GroupStepper"]


class GroupStepper:
    """Takes each group's step for one tracker (its optimizer, adapter, options and parameter memory)."""

    def __init__(self, optimizer: torch.optim.Optimizer, adapter: Any, options: TrackerOptions,
                 memory: ParameterMemory, warn_once: Callable[[str, str], None]) -> None:
        self.optimizer, self.adapter, self.options, self.memory = optimizer, adapter, options, memory
        self.warn_once = warn_once
        self.gatherer = StepGatherer(optimizer, adapter, options, memory, warn_once)
        self.failed_backends: set[str] = set()  # backends that failed once: not used again by this tracker
        self.observation = 0

    def observe(self, state: GroupState, found_inf: Tensor | None, record: bool, observation: int) -> bool:
        """Gather, compute and (when ``record``) accumulate the group's step at optimizer step ``observation`` (this
        tracker's count); True when it was accumulated."""
        self.observation = observation
        if "steady" in state.cache:
            if record and found_inf is None and self._steady_step(state):
                return True
            self.drop_steady(state)
        return self._general_step(state, found_inf, record)

    @torch.no_grad()
    def _general_step(self, state: GroupState, found_inf: Tensor | None, record: bool) -> bool:
        """The group's step through the general path: gather, validate, choose a backend, compute, keep."""
        gathered = self.gatherer.gather(state, found_inf, record, self.observation)
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
        self.memory.keep(state, keys, result.etas, result.scales, self.observation)
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
            state.clock_offset = self._optimizer_step(step.states) - self.options.observe_every
        state.count += 1
        if result.terms is None and result.etas is not None and shards is None and self.options.observe_every == 1:
            try:
                self._plan_steady(state, step, keys)
            except Exception:  # a plan only saves host time: without one the general path keeps running the group
                state.cache.pop("steady", None)
        return True

    def _steady_step(self, state: GroupState) -> bool:
        """The group's step through its :class:`SteadyPlan` (nothing it checks changed since the last step); False
        when the plan no longer applies (nothing was computed)."""
        try:
            finite = state.cache["steady"].run(state.group, self.optimizer.state, self.observation)
        except Exception as error:  # as a backend that fails: not used again, the general path takes the step
            self.failed_backends.add(state.backend)
            self.warn_once(f"{state.backend}-failed", f"the {state.backend} backend failed ({type(error).__name__}: "
                            f"{error}); the foreach backend runs instead")
            return False
        if finite is None:
            return False
        assert state.kept is not None
        state.last_finite = finite
        state.kept = (self.observation, *state.kept[1:])  # η_t is in the kept views, written over η_{t−1}
        state.count += 1
        return True

    def _plan_steady(self, state: GroupState, step: backends.GroupStep, keys: list[Tensor]) -> None:
        """Keep what this native step found, for the group's next steps (when :meth:`SteadyPlan.build` can)."""
        buffer = state.cache.get("buffer")
        plan = SteadyPlan.build(
            step.group, self.optimizer.state, self.adapter, keys, step.states, step.form, state.cache.get(state.backend),
            buffer[0] if buffer else None, step.accumulators, step.weight, state.tensors, self.options.coordinates,
            self.observation,
        )
        if plan is not None:
            state.cache["steady"] = plan

    def drop_steady(self, state: GroupState) -> None:
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
        state.last_finite = add_step(state.accumulators, terms, n, float(self.options.observe_every))
        table = sharding.combine_shares(None, [], len(shards.keys), shards.process_group, empty.device, dtype)
        state.tensors.add(shards.keys, table, float(self.options.observe_every), state.last_finite)
        if state.count == 0:
            state.clock_offset = self._optimizer_step(empty.states) - self.options.observe_every
        state.count += 1
        return True

    def _optimizer_step(self, states: list[dict[str, Any]]) -> int:
        """The optimizer's own step count t of a group (its first parameter's ``state["step"]``, read once per
        group: a device counter costs one synchronisation then), else this tracker's observations."""
        counter = states[0].get("step") if states else None
        if counter is None:
            return self.observation
        return int(round(float(sharding.local_view(counter))))

    def _compute(self, state: GroupState, step: backends.GroupStep) -> backends.StepResult:
        """The step through the group's best backend that takes it; a backend that fails is never used again."""
        for name in backends.candidates(self.options.kernel, step.device):
            if name in self.failed_backends:
                continue
            backend = backends.backend(name)
            why = backend.unavailable(step.device) or backend.decline(step)
            if why is not None:
                if name == self.options.kernel and why != PARTIAL:
                    self.warn_once(f"{name}-declined-{why}", f"kernel={name!r} does not run for a group: {why}; the foreach backend runs it")
                continue
            if name == "foreach":
                state.backend = name
                return backend.run(step)
            try:
                result = backend.run(step)
            except Exception as error:
                self.failed_backends.add(name)
                self.warn_once(f"{name}-failed", f"the {name} backend failed ({type(error).__name__}: {error}); the foreach backend runs instead")
                state.cache.clear()
                continue
            state.backend = name
            return result
        raise RuntimeError("no backend took the step")  # pragma: no cover - foreach takes every step
