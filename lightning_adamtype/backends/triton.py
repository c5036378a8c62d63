"""The CUDA one-pass backend (``kernel="triton"``, the CUDA default): two Triton launches per group and step.

For a group of n tensors with η_i = s_i / (sqrt(v_i) + e_i) (see :mod:`.one_pass` for the active coordinates, the
signed η and the modes), one launch of :func:`_group_terms_kernel` reads every v and g once (and the stored, signed
η_{t−1} once, writing the signed η_t over it), and each program writes the nine partial terms of
:mod:`lightning_adamtype.row` of one block of one tensor

    [min η, Σ (η g)², Σ |Δη|, Σ (Δη)², Σ η  (over the counted coordinates and pairs), counted, pairs, activations, inactive];

one launch of :func:`_reduce_kernel` folds them: its program 0 into the group's nine terms (and, when accumulating,
the row and the levels of :func:`lightning_adamtype.row.add_step`), its program 1 + i into tensor i's share
(b_i, c_i, activations_i, inactive_i).

Two launches per group per step, whatever the number of tensors, and four passes over memory (v, g, η_{t−1}
read, η_t written; two with ``recomputed``: v and g only), against ≈ 25 launches and ≈ 15 passes for the same
terms as multi-tensor torch operations. On a GPU both matter: the launches are host time (≈ 5 µs each), the
passes device time.

The tensors are found through a device table of their addresses (v's are the optimizer's state, stable from step
to step; g's may move when gradients are set to None between steps): the table is rebuilt, with one asynchronous
host-to-device copy, only when an address changed. Modes (``MODE``): ``FIRST``, ``STORED``, ``CURRENT``,
``RECOMPUTED`` as in :mod:`.one_pass` (v_{t−1} = (v_t − w·g_t²)·(1/k), 0 unless > RECOMPUTED_ZERO·v_t; the table then holds (s, e, s', e')
per tensor); ``ALL``: ``coordinates="all"``.

Float32 state and gradients only (the tracker takes another path otherwise); partial sums in float32 over
blocks of :data:`BLOCK` coordinates (counts exact), folded in float64 (exact enough at any size).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..adapter_kit import Scalar, scalar_table, to_device
from ..row import ACCUMULATOR_KEYS, TERM_KEYS
from .one_pass import RECOMPUTED_ZERO, SHARES, FlatEtaLayout, OnePassBackend, addresses

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the CPU-only CI has no Triton
    triton = None
    tl = None

__all__ = ["BLOCK", "GroupLaunch", "TritonBackend", "available"]

#: coordinates per program (the partial-sum table has one row per program: 6k rows at 100M), taken SUB at a time by
#: NUM_WARPS warps. Measured on an H100 at 100M coordinates (benchmarks/triton_variants.py, benchmarks/README.md):
#: the stored mode (η_{t−1} read and η_t written in place) ran at 0.7 TB/s with SUB = 1024 and 4 warps, 1.8 TB/s with
#: SUB = 4096 and 8 warps; the other modes at 1.7–2.8 TB/s either way.
BLOCK = 16384
SUB = 4096
NUM_WARPS = 8
NUM_STAGES = 3
_REDUCE_BLOCK = 1024


def available(device: torch.device) -> bool:
    """Triton is importable and can run on ``device``: CUDA, or the CPU through Triton's interpreter when
    ``TRITON_INTERPRET=1`` was set before Triton was imported (slow: for tests on machines without a GPU; it
    replaces the GPU compiler for the whole process)."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _group_terms_kernel(
        v_ptrs, g_ptrs, eta_ptr, eta_offsets, sizes, table, block_tensor, block_start, partials,
        inverse_keep, weight, zero, TABLE_STRIDE: tl.constexpr, MODE: tl.constexpr, ALL: tl.constexpr,
        ALIGNED: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr,
    ):
        # one program: BLOCK coordinates of one tensor, SUB at a time (few registers per thread, so many programs
        # stay resident per SM to keep loads in flight), partial sums kept per lane and reduced once at the end
        pid = tl.program_id(0)
        i = tl.load(block_tensor + pid)
        first = tl.load(block_start + pid)
        n = tl.load(sizes + i)
        v_address = tl.load(v_ptrs + i)
        g_address = tl.load(g_ptrs + i)
        eta_offset = tl.load(eta_offsets + i)
        if ALIGNED:  # every address a multiple of 16 bytes (checked on the host): 16-byte vector loads
            v_address = tl.multiple_of(v_address, 16)
            g_address = tl.multiple_of(g_address, 16)
            eta_offset = tl.multiple_of(eta_offset, 4)
            first = tl.multiple_of(first, BLOCK)
        v_base = v_address.to(tl.pointer_type(tl.float32))
        g_base = g_address.to(tl.pointer_type(tl.float32))
        s = tl.load(table + i * TABLE_STRIDE)
        e = tl.load(table + i * TABLE_STRIDE + 1)
        if MODE == 3:  # RECOMPUTED
            s_previous = tl.load(table + i * TABLE_STRIDE + 2)
            e_previous = tl.load(table + i * TABLE_STRIDE + 3)
        low = tl.full([SUB], float("inf"), tl.float32)
        b = tl.zeros([SUB], tl.float32)
        c = tl.zeros([SUB], tl.float32)
        c2 = tl.zeros([SUB], tl.float32)
        total = tl.zeros([SUB], tl.float32)
        counted = tl.zeros([SUB], tl.float32)  # counts: sums of 0/1 in float32, exact (BLOCK < 2^24)
        pairs = tl.zeros([SUB], tl.float32)
        started = tl.zeros([SUB], tl.float32)
        idle = tl.zeros([SUB], tl.float32)
        for k in range(0, BLOCK, SUB):
            offs = first + k + tl.arange(0, SUB)
            if ALIGNED:
                offs = tl.max_contiguous(tl.multiple_of(offs, SUB), SUB)
            mask = offs < n
            v = tl.load(v_base + offs, mask=mask, other=0.0)
            g = tl.load(g_base + offs, mask=mask, other=0.0)
            active = v != 0.0  # (a NaN is active: it reaches the sums); masked lanes read v = 0
            a = tl.sqrt(v) + e
            if MODE == 3:
                previous = (v - weight * (g * g)) * inverse_keep
                was = previous > zero * v
                previous = tl.where(was, previous, 0.0)  # inactive at t − 1: its v_{t−1} was 0 (and ≥ 0 always)
                a_previous = tl.sqrt(previous) + e_previous
                r = 1.0 / (a * a_previous)
                eta = s * a_previous * r
                diff = (s * a_previous - s_previous * a) * r
            else:
                eta = s / a
                eta_at = eta_ptr + eta_offset + offs
                if MODE == 1:  # STORED: the signed η_{t−1}, sign bit set where it was inactive
                    old = tl.load(eta_at, mask=mask, other=0.0)
                    diff = eta - tl.abs(old)
                    was = old.to(tl.int32, bitcast=True) >= 0
                if MODE != 2:  # FIRST, STORED: the signed η_t becomes the next step's η_{t−1}
                    tl.store(eta_at, tl.where(active, eta, -eta), mask=mask)
            if ALL:
                count = mask
            else:
                count = active
            step = eta * g
            low = tl.minimum(low, tl.where(count, eta, float("inf")))
            b += tl.where(count, step * step, 0.0)
            total += tl.where(count, eta, 0.0)
            counted += tl.where(count, 1.0, 0.0)
            idle += tl.where(mask & (v == 0.0), 1.0, 0.0)
            if MODE == 1 or MODE == 3:
                if ALL:
                    pair = mask
                else:
                    pair = active & was
                c += tl.where(pair, tl.abs(diff), 0.0)
                c2 += tl.where(pair, diff * diff, 0.0)
                pairs += tl.where(pair, 1.0, 0.0)
                started += tl.where(active & (was == 0), 1.0, 0.0)
        row = partials + pid * 9
        tl.store(row, tl.min(low, axis=0))
        tl.store(row + 1, tl.sum(b, axis=0))
        tl.store(row + 2, tl.sum(c, axis=0))
        tl.store(row + 3, tl.sum(c2, axis=0))
        tl.store(row + 4, tl.sum(total, axis=0))
        tl.store(row + 5, tl.sum(counted, axis=0))
        tl.store(row + 6, tl.sum(pairs, axis=0))
        tl.store(row + 7, tl.sum(started, axis=0))
        tl.store(row + 8, tl.sum(idle, axis=0))

    @triton.jit
    def _reduce_kernel(
        partials, rows, out, per_tensor, first_block, accumulators, finite, numel, weight,
        ROWS_CEILING: tl.constexpr, BLOCK: tl.constexpr, ACCUMULATE: tl.constexpr,
    ):
        # program 0: the group's nine terms (and the accumulators); program 1 + i: tensor i's share, from its blocks
        pid = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        if pid == 0:
            low = tl.full([BLOCK], float("inf"), tl.float64)
            b = tl.zeros([BLOCK], tl.float64)
            c = tl.zeros([BLOCK], tl.float64)
            c2 = tl.zeros([BLOCK], tl.float64)
            total = tl.zeros([BLOCK], tl.float64)
            counted = tl.zeros([BLOCK], tl.float64)
            pairs = tl.zeros([BLOCK], tl.float64)
            started = tl.zeros([BLOCK], tl.float64)
            idle = tl.zeros([BLOCK], tl.float64)
            for start in range(0, ROWS_CEILING, BLOCK):  # a compile-time bound (a power of two ≥ rows)
                r = start + offs
                mask = r < rows
                at = partials + r * 9
                low = tl.minimum(low, tl.load(at, mask=mask, other=float("inf")).to(tl.float64))
                b += tl.load(at + 1, mask=mask, other=0.0).to(tl.float64)
                c += tl.load(at + 2, mask=mask, other=0.0).to(tl.float64)
                c2 += tl.load(at + 3, mask=mask, other=0.0).to(tl.float64)
                total += tl.load(at + 4, mask=mask, other=0.0).to(tl.float64)
                counted += tl.load(at + 5, mask=mask, other=0.0).to(tl.float64)
                pairs += tl.load(at + 6, mask=mask, other=0.0).to(tl.float64)
                started += tl.load(at + 7, mask=mask, other=0.0).to(tl.float64)
                idle += tl.load(at + 8, mask=mask, other=0.0).to(tl.float64)
            terms_min = tl.min(low, axis=0)
            terms_b = tl.sum(b, axis=0)
            terms_c = tl.sum(c, axis=0)
            terms_c2 = tl.sum(c2, axis=0)
            terms_sum = tl.sum(total, axis=0)
            terms_counted = tl.sum(counted, axis=0)
            terms_pairs = tl.sum(pairs, axis=0)
            terms_started = tl.sum(started, axis=0)
            terms_idle = tl.sum(idle, axis=0)
            tl.store(out, terms_min)
            tl.store(out + 1, terms_b)
            tl.store(out + 2, terms_c)
            tl.store(out + 3, terms_c2)
            tl.store(out + 4, terms_sum)
            tl.store(out + 5, terms_counted)
            tl.store(out + 6, terms_pairs)
            tl.store(out + 7, terms_started)
            tl.store(out + 8, terms_idle)
            if ACCUMULATE:
                # lightning_adamtype.row.add_step, in the accumulators' dtype: with N counted and P pairs, a finite
                # step adds weight·[1, N > 0 ? min η : 0, Σ(ηg)², Σ|Δη|, Σ(Δη)², N > 0 ? Ση/N : 0,
                # P > 0 ? Σ|Δη|/P : 0, 0, activations] and sets the levels [inactive, coordinates]; a non-finite one
                # adds only 1 to nonfinite_steps and leaves the levels
                dtype = accumulators.dtype.element_ty
                n_counted = terms_counted.to(dtype)
                n_pairs = terms_pairs.to(dtype)
                row_min = tl.where(n_counted > 0, terms_min.to(dtype), 0.0)
                row_b = terms_b.to(dtype)
                row_c = terms_c.to(dtype)
                row_c2 = terms_c2.to(dtype)
                row_mean = tl.where(n_counted > 0, terms_sum.to(dtype) / tl.maximum(n_counted, 1.0), 0.0)
                row_c_mean = tl.where(n_pairs > 0, row_c / tl.maximum(n_pairs, 1.0), 0.0)
                row_started = terms_started.to(dtype)
                ok = (row_min * 0 == 0) & (row_b * 0 == 0) & (row_c * 0 == 0) & (row_c2 * 0 == 0)
                ok = ok & (row_mean * 0 == 0) & (row_c_mean * 0 == 0) & (row_started * 0 == 0)
                k = tl.where(ok, weight, 0.0).to(dtype)
                tl.store(accumulators, tl.load(accumulators) + k)
                tl.store(accumulators + 1, tl.load(accumulators + 1) + tl.where(ok, row_min * k, 0.0))
                tl.store(accumulators + 2, tl.load(accumulators + 2) + tl.where(ok, row_b * k, 0.0))
                tl.store(accumulators + 3, tl.load(accumulators + 3) + tl.where(ok, row_c * k, 0.0))
                tl.store(accumulators + 4, tl.load(accumulators + 4) + tl.where(ok, row_c2 * k, 0.0))
                tl.store(accumulators + 5, tl.load(accumulators + 5) + tl.where(ok, row_mean * k, 0.0))
                tl.store(accumulators + 6, tl.load(accumulators + 6) + tl.where(ok, row_c_mean * k, 0.0))
                tl.store(accumulators + 7, tl.load(accumulators + 7) + tl.where(ok, 0.0, 1.0).to(dtype))
                tl.store(accumulators + 8, tl.load(accumulators + 8) + tl.where(ok, row_started * k, 0.0))
                tl.store(accumulators + 9, tl.where(ok, terms_idle.to(dtype), tl.load(accumulators + 9)))
                tl.store(accumulators + 10, tl.where(ok, tl.load(numel).to(dtype), tl.load(accumulators + 10)))
                tl.store(finite, ok.to(tl.uint8))
        else:
            i = pid - 1
            lo = tl.load(first_block + i)
            hi = tl.load(first_block + i + 1)
            b = tl.zeros([BLOCK], tl.float64)
            c = tl.zeros([BLOCK], tl.float64)
            started = tl.zeros([BLOCK], tl.float64)
            idle = tl.zeros([BLOCK], tl.float64)
            for start in range(lo, hi, BLOCK):
                r = start + offs
                mask = r < hi
                at = partials + r * 9
                b += tl.load(at + 1, mask=mask, other=0.0).to(tl.float64)
                c += tl.load(at + 2, mask=mask, other=0.0).to(tl.float64)
                started += tl.load(at + 7, mask=mask, other=0.0).to(tl.float64)
                idle += tl.load(at + 8, mask=mask, other=0.0).to(tl.float64)
            share = per_tensor + i * 4
            tl.store(share, tl.sum(b, axis=0))
            tl.store(share + 1, tl.sum(c, axis=0))
            tl.store(share + 2, tl.sum(started, axis=0))
            tl.store(share + 3, tl.sum(idle, axis=0))


@dataclass
class GroupLaunch(FlatEtaLayout):
    """The launch geometry of one group (built once per list of sizes) and its address tables (rebuilt only when
    an address changes); η lives in the group's flat buffer as :class:`.one_pass.FlatEtaLayout`
    places it."""

    device: torch.device
    dtype: torch.dtype = torch.float32  # (the kernels take float32 only: TritonBackend.dtypes)
    block_tensor: Tensor = field(init=False)
    block_start: Tensor = field(init=False)
    sizes_table: Tensor = field(init=False)
    eta_offsets: Tensor = field(init=False)
    first_block: Tensor = field(init=False)  # tensor i's programs are first_block[i] .. first_block[i + 1] − 1
    partials: Tensor = field(init=False)  # one row of nine partial terms per program (written by the first launch)
    out: Tensor = field(init=False)  # the nine terms (written by the second)
    per_tensor: Tensor = field(init=False)  # float64 [n, 4]: (b_i, c_i, activations_i, inactive_i) (the second)
    numel: Tensor = field(init=False)  # float64 [1]: the group's coordinates (the "coordinates" level)
    finite: Tensor = field(init=False)  # uint8: was the latest step finite (written by the second when accumulating)
    finite_flag: Tensor = field(init=False)  # the same byte as a bool tensor (made once: a view per step costs)
    _rows_ceiling: int = field(init=False)
    _keys: tuple = field(default=(), init=False)
    _tables: tuple[Tensor, Tensor] | None = field(default=None, init=False)
    _aligned: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        tensor_of_block: list[int] = []
        start_of_block: list[int] = []
        first_block = [0]
        for i, n in enumerate(self.sizes):
            blocks = -(-n // BLOCK)
            tensor_of_block += [i] * blocks
            start_of_block += range(0, blocks * BLOCK, BLOCK)
            first_block.append(first_block[-1] + blocks)
        self.block_tensor = to_device(tensor_of_block, torch.int32, self.device)
        self.block_start = to_device(start_of_block, torch.int64, self.device)
        self.sizes_table = to_device(list(self.sizes), torch.int64, self.device)
        self.eta_offsets = to_device(self.offsets, torch.int64, self.device)
        self.first_block = to_device(first_block, torch.int64, self.device)
        self.numel = to_device([float(sum(self.sizes))], torch.float64, self.device)
        # the launches' outputs are reused every step (stream-ordered: a step's launches run after the last one's)
        self.partials = torch.empty(self.blocks, len(TERM_KEYS), dtype=torch.float32, device=self.device)
        self.out = torch.empty(len(TERM_KEYS), dtype=torch.float64, device=self.device)
        self.per_tensor = torch.empty(len(self.sizes), SHARES, dtype=torch.float64, device=self.device)
        self.finite = torch.empty((), dtype=torch.uint8, device=self.device)
        self.finite_flag = self.finite.view(torch.bool)
        self._rows_ceiling = max(_REDUCE_BLOCK, 1 << (self.blocks - 1).bit_length())

    @property
    def blocks(self) -> int:
        return self.block_tensor.numel()

    def scalar_table(self, scalars: Sequence[tuple[Scalar, Scalar]]) -> Tensor:
        """The float32 [n, 2] (s, e) table :meth:`terms` takes, on the device (:func:`adapters.scalar_table`: a
        fresh tensor per step, as an asynchronous copy may still be reading the last one)."""
        return scalar_table(scalars, torch.float32, self.device)

    def address_tables(self, vs: list[Tensor], gs: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Device int64 tables of the addresses of ``vs`` and ``gs`` (the last ones again when unchanged)."""
        keys = (addresses(vs), addresses(gs))
        if self._tables is None or keys != self._keys:
            self._tables = (to_device(list(keys[0]), torch.int64, self.device), to_device(list(keys[1]), torch.int64, self.device))
            self._keys = keys
            self._aligned = all(address % 16 == 0 for group in keys for address in group)
        return self._tables

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
    ) -> Tensor:
        """The group's nine terms (float64 ``[9]``, :attr:`out`) and each tensor's share (:attr:`per_tensor`) in two
        launches, over the ``coordinates`` ("active" or "all") :mod:`lightning_adamtype.row` counts; ``vs``, ``gs``
        contiguous float32 on the device, ``eta`` the flat float32 η buffer of ``eta_numel`` elements (the signed
        η_{t−1} read and/or the signed η_t written per ``mode``; 16-byte aligned, as any fresh allocation is),
        ``table`` the float32 ``[n, 2]`` (s, e) or, for ``RECOMPUTED``, ``[n, 4]`` (s, e, s', e') table.
        ``accumulate`` = (accumulators ``[11]``, k): the second launch also adds the step's row, weighted by k, to
        the accumulators and sets their levels (as :func:`lightning_adamtype.row.add_step` does) and writes whether
        the step was finite into :attr:`finite`. :attr:`out` and :attr:`per_tensor` are overwritten by the next
        call."""
        self.check_launch(vs, gs, eta, table, mode)
        if coordinates not in ("active", "all"):
            raise ValueError(f"coordinates={coordinates!r}: expected 'active' or 'all'")
        v_ptrs, g_ptrs = self.address_tables(vs, gs)
        partials, out = self.partials, self.out
        eta_arg = eta if eta is not None else partials  # never touched in CURRENT / RECOMPUTED
        aligned = self._aligned and (eta is None or eta.data_ptr() % 16 == 0)
        _group_terms_kernel[(self.blocks,)](
            v_ptrs, g_ptrs, eta_arg, self.eta_offsets, self.sizes_table, table, self.block_tensor, self.block_start,
            partials, float(inverse_keep), float(weight), RECOMPUTED_ZERO, TABLE_STRIDE=table.shape[1], MODE=mode,
            ALL=coordinates == "all", ALIGNED=aligned, BLOCK=BLOCK, SUB=SUB, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        )
        if accumulate is not None:
            accumulators, observe_weight = accumulate
            if accumulators.numel() < len(ACCUMULATOR_KEYS) or not accumulators.is_contiguous():
                raise ValueError(
                    f"the Triton kernel accumulates into contiguous accumulators of {len(ACCUMULATOR_KEYS)} "
                    f"(got shape {tuple(accumulators.shape)})"
                )
        else:
            accumulators, observe_weight = out, 1.0
        _reduce_kernel[(1 + len(self.sizes),)](
            partials, self.blocks, out, self.per_tensor, self.first_block, accumulators, self.finite, self.numel,
            float(observe_weight), ROWS_CEILING=self._rows_ceiling, BLOCK=_REDUCE_BLOCK,
            ACCUMULATE=accumulate is not None,
        )
        return out


class TritonBackend(OnePassBackend):
    """Two Triton launches per group on a CUDA device (or, for tests, the CPU under ``TRITON_INTERPRET=1``)."""

    name = "triton"
    launch_class = GroupLaunch

    @property
    def device_type(self) -> str:  # type: ignore[override]
        return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available() else "cuda"

    def unavailable(self, device: torch.device) -> str | None:
        if triton is None:
            return "Triton is not installed (it comes with CUDA builds of torch: pip install triton)"
        if not available(device):
            return f"Triton runs on CUDA devices (this group is on {device})"
        return None
