"""Gathering one group's step record (:class:`lightning_adamtype.backends.GroupStep`) after the optimizer's step.

For one param group at one observed step: the parameters that stepped (a gradient, and optimizer state where the
adapter needs it), left out with one warning each kind when they cannot be measured (sparse gradients, meta
device, not real), their local shards under FSDP2, the gradient g_t the optimizer consumed (the adapter's
``consumed_gradients``, plus coupled weight decay λ·x_t), the adapter's square-root form or uniform stepsize, and
each parameter's η_{t−1} (:class:`lightning_adamtype.parameter_memory.ParameterMemory`). What runs the step
(:mod:`lightning_adamtype.backends`) and what is accumulated is the tracker's.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from . import backends, sharding
from .group_state import GroupState
from .options import TrackerOptions
from .parameter_memory import ParameterMemory
from .row import new_accumulators

__all__ = ["EmptyShard", "Shards", "StepGatherer"]

_is_sparse = operator.attrgetter("is_sparse")
_is_meta = operator.attrgetter("is_meta")


@dataclass
class Shards:
    """A sharded group's step on this rank: the process group of its sharded mesh dimension (None: only
    replicated), the group's parameters that stepped (on every rank the same list, in order) and the positions in
    it of those of which this rank holds coordinates (the step's keys)."""

    process_group: Any
    keys: list[Tensor]
    positions: list[int]


@dataclass
class EmptyShard:
    """A sharded group of which this rank holds no coordinate: it joins the group's reductions with neutral terms."""

    device: torch.device
    shards: Shards
    states: list[dict[str, Any]]  # the optimizer states of the group's parameters (their global step counts)


class StepGatherer:
    """Gathers a group's :class:`GroupStep` for one tracker (its optimizer, adapter, options and memory)."""

    def __init__(self, optimizer: torch.optim.Optimizer, adapter: Any, options: TrackerOptions,
                 memory: ParameterMemory, warn: Callable[[str, str], None]) -> None:
        self.optimizer, self.adapter, self.options, self.memory = optimizer, adapter, options, memory
        self._warn_once = warn

    def gather(self, state: GroupState, found_inf: Tensor | None, record: bool, observation: int):
        """(:class:`GroupStep`, parameter keys, shards) of the parameters that stepped at ``observation``; an
        :class:`EmptyShard` for a sharded group of which this rank holds nothing (it still joins the reduction when
        ``record``); None when no parameter stepped."""
        assert self.adapter is not None and state.group is not None
        group, adapter = state.group, self.adapter
        uniform_fn = getattr(adapter, "uniform_stepsize", None)
        needs_state = not callable(uniform_fn)
        opt_state = self.optimizer.state  # read every step: a state may be deleted, replaced or cleared
        keys, params, states, grads = [], [], [], []
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            st = opt_state.get(p)
            if needs_state and not st:
                continue
            keys.append(p)
            states.append(st or {})
            grads.append(grad)
        if any(map(_is_sparse, grads)) or any(map(_is_meta, keys)) or not all(map(Tensor.is_floating_point, keys)):
            keys, states, grads = self._measurable(keys, states, grads)
        params = list(keys)
        all_states = states  # (before a sharded group's local filtering)
        shards = None
        if keys and sharding.is_dtensor(keys[0]):
            measurable, process_group = sharding.shard_group(keys[0])
            if not measurable:
                self._warn_once("mesh", f"parameters sharded over several mesh dimensions ({keys[0].placements}) are not measured")
                return None
            state.sharded = process_group is not None
            local = [(k, sharding.local_view(p), {n: sharding.local_view(v) for n, v in st.items()}, sharding.local_view(g))
                     for k, p, st, g in zip(keys, params, states, grads)]
            held = [i for i, entry in enumerate(local) if entry[1].numel() > 0]
            shards = Shards(process_group, list(keys), held)
            local = [local[i] for i in held]
            keys, params, states, grads = (list(x) for x in zip(*local)) if local else ([], [], [], [])
            device = keys[0].to_local().device if keys else group["params"][0].to_local().device
        else:
            if 0 in map(Tensor.numel, params):
                keep = [i for i, p in enumerate(params) if p.numel() > 0]
                keys, params, states, grads = ([x[i] for i in keep] for x in (keys, params, states, grads))
            if not keys:
                return None
            device = params[0].device
        if state.accumulators is None:
            state.accumulators = new_accumulators(device)
        if not keys:  # a sharded group of which this rank holds nothing: it still joins the reduction
            return EmptyShard(device, shards, all_states) if record and shards is not None else None
        grads = self._consumed(group, keys, states, grads)
        return self._group_step(state, group, keys, params, states, grads, found_inf, record, shards, observation), keys, shards

    def _measurable(self, keys: list[Tensor], states: list[dict], grads: list[Tensor]) -> tuple[list, list, list]:
        """Leave out (one warning per kind) parameters with sparse gradients (unless the adapter declares
        ``sparse_gradients = True``: its ``consumed_gradients`` densifies them), on the meta device or not real."""
        kept: tuple[list, list, list] = ([], [], [])
        sparse_ok = getattr(self.adapter, "sparse_gradients", False) is True
        for p, st, grad in zip(keys, states, grads):
            sparse = grad.is_sparse and not sparse_ok
            if sparse or p.is_meta or not p.is_floating_point():
                kind = "sparse gradients" if sparse else "meta-device" if p.is_meta else f"{p.dtype}"
                self._warn_once(f"unmeasurable-{kind}", f"parameters with {kind} are not measured; they are left out")
                continue
            for into, x in zip(kept, (p, st, grad)):
                into.append(x)
        return kept

    def _consumed(self, group: dict[str, Any], keys: list[Tensor], states: list[dict], grads: list[Tensor]) -> list[Tensor]:
        """g_t: the gradient the optimizer consumed (+ coupled weight decay λ·x_t with maximize's sign)."""
        assert self.adapter is not None
        consumed = getattr(self.adapter, "consumed_gradients", None)
        if callable(consumed):
            grads = consumed(group, states, grads)
        wd = self.adapter.coupled_weight_decay(group)
        if wd == 0.0:
            return grads
        snaps = [self.memory.snapshots.get(id(k)) for k in keys]
        if any(x is None for x in snaps):
            self._warn_once(
                "snapshot",
                "coupled weight decay: some gradients were set after optimizer.step() began and outside a closure, "
                "so x_t was not seen before the update; λ·x_{t+1} is used in g_t for them",
            )
            snaps = [k.detach() if x is None else x for k, x in zip(keys, snaps)]
        snaps = [sharding.local_view(x) for x in snaps]
        sign = -1.0 if group.get("maximize", False) else 1.0
        return list(torch._foreach_add(grads, snaps, alpha=sign * wd))  # type: ignore[arg-type]

    def _group_step(self, state, group, keys, params, states, grads, found_inf, record, shards, observation) -> backends.GroupStep:
        assert self.adapter is not None and state.accumulators is not None
        adapter = self.adapter
        uniform_fn = getattr(adapter, "uniform_stepsize", None)
        uniform = uniform_fn(group) if callable(uniform_fn) else None
        form_fn = getattr(adapter, "sqrt_form", None)
        form = form_fn(group, states) if uniform is None and callable(form_fn) else None
        update = None
        if self.options.previous_stepsize == "recomputed" and uniform is None:
            update_fn = getattr(adapter, "second_moment_update", None)
            update = update_fn(group) if form is not None and callable(update_fn) else None
            if update is None:
                self._warn_once(
                    "recompute",
                    f"previous_stepsize='recomputed': {type(self.optimizer).__name__} with these settings (AMSGrad, "
                    "centered, β2 = 0 or no linear second-moment update) cannot rebuild η_{t−1} from its state; "
                    "η_{t−1} is stored for it (4 bytes per coordinate)",
                )
        previous, scales = self.memory.previous_of(state, keys, params, update is not None, observation, self._warn_once)
        min_fn = getattr(adapter, "min_effective_stepsize", None)
        activity_fn = getattr(adapter, "activity", None)
        activity = form[0] if form is not None else activity_fn(group, states) if uniform is None and callable(activity_fn) else None
        return backends.GroupStep(
            group=group, params=params, states=states, grads=grads, form=form, uniform=uniform,
            effective_stepsizes=lambda: adapter.effective_stepsizes(group, states),
            min_stepsize=(lambda dtype: min_fn(group, states, dtype)) if callable(min_fn) else None,
            update=update, previous=previous, previous_scales=scales, found_inf=found_inf,
            accumulators=state.accumulators, weight=float(self.options.observe_every),
            fuse=record and shards is None and found_inf is None, cache=state.cache, activity=activity,
            coordinates=self.options.coordinates,
        )
