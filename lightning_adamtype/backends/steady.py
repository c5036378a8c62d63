"""A group's repeat step on a one-pass backend: the launch of the previous step, its inputs re-read and revalidated.

Once a group has taken a full step through the native (CPU) or Triton (CUDA) backend (gather, form, checks,
launch: the tracker's general path), most of what that step found holds at the next one: the same parameters
stepped, with the same optimizer state dicts, the same v tensors and step counters, the same η buffer.
:class:`SteadyPlan` keeps what that step found and, at the next optimizer step, re-reads only what changes (the
gradients and the step counts) and re-checks, in C-level passes over the lists (no Python code per tensor), that
the rest still holds:

- the group's parameters are the same objects, and the same ones have a gradient;
- ``optimizer.state`` is the same dict, with the same state dict objects in the same order (a state replaced,
  added or removed, ``load_state_dict``: another dict or other values);
- each v (read again from its state under the same key) still starts at the same address, and each step counter
  is the same object, a host number or a CPU tensor (device counters, of fused or capturable optimizers, take the
  general path); the plan holds them, so an address seen again is the same live allocation;
- each gradient is a contiguous tensor of the bytes its v has (of the launch's dtype, the same count);
- the adapter's square-root form still reads that v (an AMSGrad switch changes the key) and gives host floats;
- the group's coupled weight decay is still 0 and η_{t−1} is the previous optimizer step's.

Then (s_i, e_i) = the adapter's ``sqrt_form`` at one state per distinct step count (adapters that declare
``scalars_by_step``: s and e depend on the state only through t) and the launch runs in STORED mode, writing η_t
over η_{t−1} in the group's buffer and adding the step to the accumulators and each tensor's share to its
:class:`lightning_adamtype.tensor_shares.TensorShares`: on the CPU one C call with its argument list kept (the
shares accumulated in C), on CUDA the Triton launch's own call (the (s, e) table copied to the device, the shares
added there). The result is the general path's: the same kernels on the same inputs. When any check fails the
plan is dropped and the general path runs the step (and may build a new plan).
"""

from __future__ import annotations

import ctypes
import operator
from itertools import chain, compress, repeat
from typing import Any

import torch
from torch import Tensor

from ..adapter_kit import to_device
from ..tensor_shares import TensorShares
from . import native, steady_checks
from .one_pass import STORED, same_objects

__all__ = ["SteadyPlan"]

_grad = operator.attrgetter("grad")
_value = operator.attrgetter("value")
_nbytes = operator.attrgetter("nbytes")
_step = operator.itemgetter("step")


class _NativeCall:
    """The native launch of a plan: the C call's argument list and address tables kept; each step writes the
    gradients' addresses and the (s, e) table and calls it (the shares are accumulated in C)."""

    def __init__(self, launch: native.GroupLaunch, vs: list[Tensor], eta: Tensor, accumulators: Tensor, weight: float,
                 shares: TensorShares, coordinates: str) -> None:
        values = shares.values
        if values is None or values.dtype != torch.float64 or not values.is_contiguous() or values.device.type != "cpu":
            raise ValueError("the shares are not a contiguous float64 CPU table")
        n = len(vs)
        self.launch, self.shares = launch, shares
        # the C call writes through these addresses: the call holds what they belong to (memory that stays valid),
        # and a shares table replaced since (a realignment) declines the step
        self._held = (eta, accumulators, values)
        self._g_ptrs = (ctypes.c_int64 * n)()
        self._v_ptrs = (ctypes.c_int64 * n)(*map(Tensor.data_ptr, vs))
        table = launch.scalar_table([(0.0, 0.0)] * n)  # the launch's host table ([n, 2]), written each step
        self.double = launch.dtype == torch.float64
        self._table, self._table_address, self.n = launch.host_table(), table.data_ptr(), n
        # for the compiled checks: the counts of the v tensors, and where the step counts are read to
        self._numels = (ctypes.c_int64 * n)(*(v.numel() for v in vs))
        self.steps = (ctypes.c_double * n)()
        #: the trailing arguments of steady_checks.gather: this call's address tables and whether it reads float64
        self.gather_arguments = (ctypes.addressof(self._v_ptrs), ctypes.addressof(self._numels),
                                 ctypes.addressof(self._g_ptrs), ctypes.addressof(self.steps), self.double)
        self._args = launch.arguments(STORED, coordinates, self._v_ptrs, self._g_ptrs, eta, table, 1.0, 0.0,
                                      accumulators.data_ptr(), float(weight), values.data_ptr())

    def step(self, grads: list[Tensor] | None, scalars: tuple[float, float] | list[float],
             checks: Any = None) -> Tensor | None:
        """Launch with ``grads``' addresses (None: :func:`steady_checks.gather` wrote them) and ``scalars``: one
        (s, e) for every tensor, or the flat table; ``checks`` (the compiled extension) fills a uniform table."""
        if self.shares.values is not self._held[2]:
            return None
        if grads is not None:
            self._g_ptrs[:] = list(map(Tensor.data_ptr, grads))
        if type(scalars) is tuple:
            if checks is not None:
                checks.fill_pairs(self._table_address, self.n, *scalars, self.double)
            else:
                self._table[:] = list(scalars) * self.n
        else:
            self._table[:] = scalars  # type: ignore[assignment]
        args = self._args
        args[-1] = self.launch.threads()
        self.launch.call(*args)
        return self.launch.finite_flag


class _TritonCall:
    """The Triton launch of a plan: the launch's own call (its address tables are rebuilt only when an address
    changed), the (s, e) table copied to the device, the shares added on the device."""

    def __init__(self, launch: Any, vs: list[Tensor], eta: Tensor, accumulators: Tensor, weight: float,
                 shares: TensorShares, coordinates: str, keys: list[Tensor]) -> None:
        self.launch, self.vs, self.eta, self.shares, self.keys = launch, vs, eta, shares, keys
        self.accumulate, self.weight, self.coordinates = (accumulators, float(weight)), float(weight), coordinates

    def step(self, grads: list[Tensor] | None, scalars: tuple[float, float] | list[float],
             checks: Any = None) -> Tensor | None:
        assert grads is not None
        table = list(scalars) * len(self.vs) if type(scalars) is tuple else scalars
        launch = self.launch
        device_table = to_device(table, torch.float32, launch.device).view(-1, 2)
        launch.terms(self.vs, grads, self.eta, device_table, STORED, accumulate=self.accumulate,
                     coordinates=self.coordinates)
        self.shares.add(self.keys, launch.per_tensor, self.weight, launch.finite_flag)
        return launch.finite_flag


def _call_for(launch: Any, vs: list[Tensor], eta: Tensor, accumulators: Tensor, weight: float, shares: TensorShares,
              coordinates: str, keys: list[Tensor]) -> _NativeCall | _TritonCall:
    if isinstance(launch, native.GroupLaunch):
        return _NativeCall(launch, vs, eta, accumulators, weight, shares, coordinates)
    from . import triton  # (imported only for a group the Triton backend already ran)

    if isinstance(launch, triton.GroupLaunch):
        return _TritonCall(launch, vs, eta, accumulators, weight, shares, coordinates, keys)
    raise ValueError(f"no plan for a {type(launch).__name__}")


class SteadyPlan:
    """What one full one-pass step of a group found, to run the group's next steps without the general path."""

    def __init__(self, group: dict[str, Any], opt_state: dict, adapter: Any, params: list[Tensor], keys: list[Tensor],
                 states: list[dict], v_key: str, launch: Any, eta: Tensor, accumulators: Tensor,
                 weight: float, shares: TensorShares, coordinates: str, observation: int) -> None:
        self.group, self.opt_state, self.adapter = group, opt_state, adapter
        self.params, self.keys, self.states, self.v_key = list(params), keys, list(states), v_key
        self.mask = list(map(operator.is_not, map(_grad, params), repeat(None)))
        self.everyone = all(self.mask)
        self.mask_bytes = None if self.everyone else bytes(self.mask)
        self.state_values = list(opt_state.values())
        self.vs = list(map(operator.itemgetter(v_key), states))
        self.v_ptrs = list(map(Tensor.data_ptr, self.vs))
        self.nbytes = list(map(_nbytes, self.vs))
        self.steps = list(map(_step, states))
        self.step_cells = self._step_cells(self.steps)
        self.last = observation
        self.call = _call_for(launch, self.vs, eta, accumulators, weight, shares, coordinates, keys)

    @staticmethod
    def _step_cells(steps: list[Any]) -> list[Any] | None:
        """ctypes views of CPU tensor step counters of one dtype (read without a torch call), or None when the counters
        are host numbers (read as they are)."""
        if all(type(s) in (float, int) for s in steps):
            return None
        kinds = {(s.dtype, s.device.type, s.dim()) if isinstance(s, Tensor) else None for s in steps}
        if len(kinds) != 1:
            raise ValueError(f"step counters of mixed kinds {kinds}")
        dtype, device, dim = next(iter(kinds))  # type: ignore[misc]
        if device != "cpu" or dim != 0 or dtype not in native.C_REAL:
            raise ValueError(f"step counters {dtype} on {device}")
        return [native.C_REAL[dtype].from_address(s.data_ptr()) for s in steps]

    @classmethod
    def build(cls, group: dict[str, Any], opt_state: dict, adapter: Any, keys: list[Tensor], states: list[dict],
              form: Any, launch: Any, eta: Tensor | None, accumulators: Tensor, weight: float,
              shares: TensorShares, coordinates: str, observation: int) -> SteadyPlan | None:
        """A plan from a full step just taken (its parameters ``keys`` and their ``states``, the
        adapter's square-root ``form``, the launch and its η buffer ``eta``), or None when the group's next step
        cannot be taken this way (then the general path keeps running it)."""
        if not getattr(adapter, "scalars_by_step", False) or launch is None or eta is None:
            return None
        if callable(getattr(adapter, "consumed_gradients", None)) or adapter.coupled_weight_decay(group) != 0.0:
            return None
        if not same_objects(shares.params, keys):
            return None
        params = group["params"]
        if not same_objects(list(compress(params, map(operator.is_not, map(_grad, params), repeat(None)))), keys):
            return None  # some parameters with a gradient were left out (empty, sparse, ...): the general path's case
        vs = form[0]
        v_key = next((k for k, x in states[0].items() if x is vs[0]), None) if states else None
        if v_key is None or not all(st.get(v_key) is v for st, v in zip(states, vs)):
            return None
        if not all(st.get("step") is not None for st in states):
            return None
        try:
            return cls(group, opt_state, adapter, params, keys, states, v_key, launch, eta, accumulators, weight,
                       shares, coordinates, observation)
        except ValueError:
            return None

    def run(self, group: dict[str, Any], opt_state: dict, observation: int) -> Tensor | None:
        """Take the group's step (add it to the accumulators and the shares, η_t over η_{t−1}); the launch's
        finite flag (a bool tensor), or None when something checked has changed (nothing was computed)."""
        if observation != self.last + 1 or group is not self.group or opt_state is not self.opt_state:
            return None
        call, checks, answer = self.call, None, 0
        grads: list[Tensor] | None
        if isinstance(call, _NativeCall) and (checks := steady_checks.compiled()) is not None:
            # the checks and reads of _gradients, _state_holds and _step_values in one C++ call; what it does not
            # take (a change, or tensors it does not read, such as a Parameter subclass) goes to the Python checks
            answer = checks.gather(group["params"], self.params, self.mask_bytes, opt_state, self.state_values,
                                   self.states, self.v_key, self.vs, *call.gather_arguments)
        if answer:
            grads, values = None, None if answer == 1 else list(call.steps)  # type: ignore[union-attr]
        else:
            checks = None
            grads = self._gradients(group)
            if grads is None or not self._state_holds(opt_state):
                return None
            values = self._step_values()
        scalars = self._scalars(group, values)
        if scalars is None:
            return None
        finite = call.step(grads, scalars, checks)
        if finite is not None:
            self.last = observation
        return finite

    def _gradients(self, group: dict[str, Any]) -> list[Tensor] | None:
        params = group["params"]
        if not same_objects(params, self.params):
            return None
        grads = list(map(_grad, params))
        if self.everyone:
            try:
                nbytes = list(map(_nbytes, grads))  # (None.nbytes raises: a missing gradient)
            except AttributeError:
                return None
        else:
            if list(map(operator.is_not, grads, repeat(None))) != self.mask:
                return None
            grads = list(compress(grads, self.mask))
            nbytes = list(map(_nbytes, grads))
        if nbytes != self.nbytes or not all(map(Tensor.is_contiguous, grads)):
            return None
        return grads

    def _state_holds(self, opt_state: dict) -> bool:
        values = self.state_values
        if len(opt_state) != len(values) or not all(map(operator.is_, opt_state.values(), values)):
            return False
        if list(map(Tensor.data_ptr, map(operator.itemgetter(self.v_key), self.states))) != self.v_ptrs:
            return False
        # (host-number counters are read afresh each step; tensor counters through their cells, so they must be the same)
        return self.step_cells is None or same_objects(list(map(_step, self.states)), self.steps)

    def _step_values(self) -> list[float] | None:
        """The step counts read in Python; None when they are all equal."""
        cells = self.step_cells
        values = list(map(_value, cells)) if cells is not None else list(map(float, map(_step, self.states)))
        return None if values.count(values[0]) == len(values) else values

    def _scalars(self, group: dict[str, Any], values: list[float] | None) -> tuple[float, float] | list[float] | None:
        """(s, e) of the group's one step count (``values`` None), or the flat (s, e) table of the counts
        ``values`` ([s_0, e_0, s_1, ...]); None when the form no longer applies."""
        if self.adapter.coupled_weight_decay(group) != 0.0:
            return None
        if values is None:  # the common case: one step count in the group
            vs, pairs = self.adapter.sqrt_form(group, self.states[:1])
            s, e = pairs[0]
            if vs[0] is not self.vs[0] or type(s) is not float or type(e) is not float:
                return None  # the form reads another v now (an AMSGrad switch), or gives tensors
            return s, e
        distinct = list(dict.fromkeys(values))
        first = [values.index(t) for t in distinct]
        vs, pairs = self.adapter.sqrt_form(group, [self.states[i] for i in first])
        pairs = list(pairs)
        if not all(v is self.vs[i] for v, i in zip(vs, first)) or set(map(type, chain.from_iterable(pairs))) != {float}:
            return None
        by_step = dict(zip(distinct, pairs))
        return list(chain.from_iterable(map(by_step.__getitem__, values)))
