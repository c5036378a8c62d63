"""The CPU one-pass backend (``kernel="native"``, the CPU default): one C call per group and step.

For a group of n float32 tensors with η_i = s_i / (sqrt(v_i) + e_i), one call of ``adamtype_group_terms`` (the C
source and its trusted build: :mod:`.native_build`) reads every v and g once (and the stored, signed η_{t−1} once,
writing the signed η_t over it) in pieces of :data:`PIECE` coordinates shared among OpenMP threads. Each piece
writes its own row of the nine terms (:mod:`lightning_adamtype.row`, over the counted coordinates and pairs); the
rows are folded, in float64 and in piece order (so the result does not depend on the number of threads), into the
group's terms and each tensor's share (b_i, c_i, activations_i, inactive_i), and, when asked, the step is added to
the float64 accumulators as :func:`lightning_adamtype.row.add_step` does (levels included). η in float32 with the
optimizer's roundings, sums in float32 within a block of 64 coordinates (256 when vectorised with OpenMP), blocks
folded in float64 (2e-7 relative or better at any size); counts exact. A group of float64 tensors goes through
the float64 twin of the loop (``adamtype_group_terms_f64``: η, the table and every sum in float64; 1e-12 relative
of a float64 computation, ``tests/test_backends.py``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain

import torch
from torch import Tensor

from ..adapter_kit import Scalar, scalar_table
from ..row import ACCUMULATOR_KEYS, TERM_KEYS
from . import native_build
from .one_pass import RECOMPUTED_ZERO, SHARES, FlatEtaLayout, OnePassBackend, addresses

__all__ = ["PIECE", "GroupLaunch", "NativeBackend"]

#: coordinates per piece (one row of partial sums each, one unit of OpenMP work)
PIECE = 16384
#: groups with fewer coordinates run on one thread (an OpenMP fork and join costs more than it saves there)
PARALLEL_MIN_NUMEL = 2 * PIECE


#: the C type of the kernel's reals (and of CPU scalar tensors read through ctypes), by dtype
C_REAL = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}


def _table(values: list[int]) -> Tensor:
    return torch.tensor(values, dtype=torch.int64)


@dataclass
class GroupLaunch(FlatEtaLayout):
    """One group's pieces (built once per list of sizes), address arrays (rewritten at each call) and reused
    outputs; η lives in the group's flat buffer as :class:`FlatEtaLayout` places it."""

    device: torch.device
    dtype: torch.dtype = torch.float32  # of v, g, η and the (s, e) table: float32 or float64
    out: Tensor = field(init=False)  # float64 [9]: the terms of the latest call
    per_tensor: Tensor = field(init=False)  # float64 [n, 4]: each tensor's (b_i, c_i, activations_i, inactive_i)
    finite: Tensor = field(init=False)  # uint8: was the latest accumulated step finite
    finite_flag: Tensor = field(init=False)  # the same byte as a bool tensor (made once)
    _first_piece: Tensor = field(init=False)
    _partials: Tensor = field(init=False)  # float64 [pieces, 9]: one row of terms per piece
    _eta_offsets: Tensor = field(init=False)
    _sizes: Tensor = field(init=False)
    _tables: tuple[ctypes.Array, ctypes.Array] = field(init=False)
    _threads: int = field(init=False)
    _host_table: Tensor = field(init=False)
    _host_table_type: type = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        first_piece = [0]
        for n in self.sizes:
            first_piece.append(first_piece[-1] + -(-n // PIECE))
        self._first_piece = _table(first_piece)
        self._eta_offsets = _table(self.offsets)
        self._sizes = _table(list(self.sizes))
        self.out = torch.empty(len(TERM_KEYS), dtype=torch.float64)
        self.per_tensor = torch.empty(len(self.sizes), SHARES, dtype=torch.float64)
        self._partials = torch.empty(first_piece[-1], len(TERM_KEYS), dtype=torch.float64)
        self.finite = torch.empty((), dtype=torch.uint8)
        self.finite_flag = self.finite.view(torch.bool)
        self._tables = ((ctypes.c_int64 * len(self.sizes))(), (ctypes.c_int64 * len(self.sizes))())
        if self.dtype not in C_REAL:
            raise ValueError(f"the native kernel takes float32 or float64 tensors, not {self.dtype}")
        self._host_table = torch.empty(len(self.sizes), 2, dtype=self.dtype)
        self._host_table_type = C_REAL[self.dtype] * (2 * len(self.sizes))
        self._function = "adamtype_group_terms" if self.dtype == torch.float32 else "adamtype_group_terms_f64"
        self._threads = 1 if sum(self.sizes) < PARALLEL_MIN_NUMEL else 0

    def scalar_table(self, scalars: Sequence[tuple[Scalar, Scalar]]) -> Tensor:
        """The [n, 2] (s, e) table of the launch's dtype that :meth:`terms` takes; host floats are written into a
        table the launch keeps (overwritten by the next call), other scalars go through :func:`adapters.scalar_table`."""
        flat = list(chain.from_iterable(scalars))
        if len(flat) == 2 * len(self.sizes) and set(map(type, flat)) == {float}:
            self.host_table()[:] = flat
            return self._host_table
        return scalar_table(scalars, self.dtype, self.device)

    def terms(
        self,
        vs: list[Tensor],
        gs: list[Tensor],
        eta: Tensor | None,
        table: Tensor,
        mode: int,
        inverse_keep: float = 1.0,
        weight: float = 0.0,
        accumulate: tuple[Tensor, float] | None = None,
        coordinates: str = "active",
        shares: Tensor | None = None,
    ) -> Tensor:
        """The group's nine terms (float64 [9], :attr:`out`) and each tensor's share (:attr:`per_tensor`), both
        overwritten by the next call, in one call over the ``coordinates`` ("active" or "all") that
        :mod:`lightning_adamtype.row` counts. ``accumulate`` = (float64 accumulators [11], k): also add k·row and set
        the levels (:func:`lightning_adamtype.row.add_step`), and write whether the step was finite into
        :attr:`finite`; with ``shares`` (float64 [n, 4], contiguous) also add k·(b_i, c_i, activations_i) to it and set
        inactive_i when the step is finite (:class:`lightning_adamtype.tensor_shares.TensorShares`)."""
        self.check_launch(vs, gs, eta, table, mode, self.dtype)
        if coordinates not in ("active", "all"):
            raise ValueError(f"coordinates={coordinates!r}: expected 'active' or 'all'")
        v_ptrs, g_ptrs = self._tables
        v_ptrs[:] = list(addresses(vs))
        g_ptrs[:] = list(addresses(gs))
        if accumulate is not None:
            accumulators, observe_weight = accumulate
            if (
                accumulators.dtype != torch.float64 or not accumulators.is_contiguous()
                or accumulators.device.type != "cpu" or accumulators.numel() < len(ACCUMULATOR_KEYS)
            ):
                raise ValueError(
                    f"the native kernel accumulates into contiguous float64 CPU accumulators of {len(ACCUMULATOR_KEYS)} "
                    f"(got {accumulators.dtype}, {tuple(accumulators.shape)} on {accumulators.device})"
                )
            acc_ptr = accumulators.data_ptr()
        else:
            acc_ptr, observe_weight = None, 1.0
        if shares is not None and (
            accumulate is None or shares.dtype != torch.float64 or not shares.is_contiguous()
            or shares.device.type != "cpu" or tuple(shares.shape) != (len(self.sizes), SHARES)
        ):
            raise ValueError(
                f"shares are accumulated with the step into a contiguous float64 CPU table of {len(self.sizes)} × "
                f"{SHARES} (got {shares.dtype}, {tuple(shares.shape)} on {shares.device}, accumulate={accumulate is not None})"
            )
        self.call(*self.arguments(
            mode, coordinates, v_ptrs, g_ptrs, eta, table, inverse_keep, weight, acc_ptr, observe_weight,
            shares.data_ptr() if shares is not None else None,
        ))
        return self.out

    def arguments(
        self, mode: int, coordinates: str, v_ptrs: ctypes.Array, g_ptrs: ctypes.Array, eta: Tensor | None,
        table: Tensor, inverse_keep: float, weight: float, acc_ptr: int | None, observe_weight: float,
        shares_ptr: int | None,
    ) -> list:
        """``adamtype_group_terms``'s arguments, in its order, for this launch's outputs and the given inputs (the
        address arrays are read at the call: refill them and call again with the same list)."""
        return [
            mode, coordinates == "all", len(self.sizes), ctypes.addressof(v_ptrs), ctypes.addressof(g_ptrs),
            eta.data_ptr() if eta is not None else None, self._eta_offsets.data_ptr(), self._sizes.data_ptr(),
            self._first_piece.data_ptr(), PIECE, table.data_ptr(), table.shape[1], float(inverse_keep), float(weight),
            RECOMPUTED_ZERO, self._partials.data_ptr(), self.out.data_ptr(), self.per_tensor.data_ptr(),
            acc_ptr is not None, acc_ptr, float(observe_weight), self.finite.data_ptr(), shares_ptr, self.threads(),
        ]

    def host_table(self) -> ctypes.Array:
        """The launch's [n, 2] (s, e) host table (:meth:`scalar_table`) as a ctypes array over its memory."""
        return self._host_table_type.from_address(self._host_table.data_ptr())  # type: ignore[attr-defined]

    def threads(self) -> int:
        """OpenMP threads of a call: 1 for a small group, else torch's intra-op thread count."""
        return self._threads or max(1, torch.get_num_threads())

    def call(self, *args: object) -> None:
        """``adamtype_group_terms(*args)`` (``_f64`` for float64): the one place the C function is called (benchmarks/host_time.py stubs
        it to time what the host does around it)."""
        getattr(native_build.library(), self._function)(*args)


class NativeBackend(OnePassBackend):
    """One C call per group on the CPU."""

    name = "native"
    device_type = "cpu"
    dtypes = (torch.float32, torch.float64)
    launch_class = GroupLaunch

    def unavailable(self, device: torch.device) -> str | None:
        if device.type != "cpu":
            return f"the native kernel runs on the CPU (this group is on {device})"
        library, reason = native_build.availability()
        return None if library is not None else reason
