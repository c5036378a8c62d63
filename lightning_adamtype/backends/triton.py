"""The CUDA one-pass backend (``kernel="triton"``, the CUDA default): two Triton launches per group and step.

For a group of n tensors with η_i = s_i / (sqrt(v_i) + e_i) (see :mod:`.one_pass`), one launch
of :func:`_group_terms_kernel` reads every v and g once (and the stored η_{t−1} once, writing η_t over it), and
each program writes the partial sums of one block of one tensor; :func:`_reduce_kernel` folds those into the
group's five terms

    [min_j η_j,  Σ_j (η_j g_j)²,  Σ_j |η_j − η_{t−1,j}|,  Σ_j (η_j − η_{t−1,j})²,  Σ_j η_j].

Two launches per group per step, whatever the number of tensors, and four passes over memory (v, g, η_{t−1}
read, η_t written; two with ``recomputed``: v and g only), against ≈ 25 launches and ≈ 15 passes for the same
terms as multi-tensor torch operations. On a GPU both matter: the launches are host time (≈ 5 µs each), the
passes device time.

The tensors are found through a device table of their addresses (v's are the optimizer's state, stable from step
to step; g's may move when gradients are set to None between steps): the table is rebuilt, with one asynchronous
host-to-device copy, only when an address changed. Modes (``MODE``):

- ``FIRST``: no η_{t−1}; η_t is written into the group's flat η buffer;
- ``STORED``: η_{t−1} read from the flat buffer, η_t written over it;
- ``CURRENT``: no η_{t−1} and nothing written (``previous_stepsize="recomputed"``, first step);
- ``RECOMPUTED``: η_{t−1} rebuilt from v_t and g_t as in :mod:`.one_pass`
  (v_{t−1} = max((v_t − w·g_t²)·(1/k), 0)); the table then holds (s, e, s', e') per tensor.

Float32 state and gradients only (the tracker takes another path otherwise); partial sums in float32 over
blocks of :data:`BLOCK` coordinates, folded in float64 (exact enough at any size).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..adapters import Scalar, scalar_table, to_device
from .one_pass import FlatEtaLayout, OnePassBackend, addresses

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
        inverse_keep, weight, TABLE_STRIDE: tl.constexpr, MODE: tl.constexpr, ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr, SUB: tl.constexpr,
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
        for k in range(0, BLOCK, SUB):
            offs = first + k + tl.arange(0, SUB)
            if ALIGNED:
                offs = tl.max_contiguous(tl.multiple_of(offs, SUB), SUB)
            mask = offs < n
            v = tl.load(v_base + offs, mask=mask, other=0.0)
            g = tl.load(g_base + offs, mask=mask, other=0.0)
            a = tl.sqrt(v) + e
            if MODE == 3:
                a_previous = tl.sqrt(tl.maximum((v - weight * (g * g)) * inverse_keep, 0.0)) + e_previous
                r = 1.0 / (a * a_previous)
                eta = s * a_previous * r
                diff = tl.where(mask, (s * a_previous - s_previous * a) * r, 0.0)
            else:
                eta = s / a
                eta_at = eta_ptr + eta_offset + offs
                if MODE == 1:  # STORED
                    diff = tl.where(mask, eta - tl.load(eta_at, mask=mask, other=0.0), 0.0)
                if MODE != 2:  # FIRST, STORED: η_t becomes the next step's η_{t−1}
                    tl.store(eta_at, eta, mask=mask)
            step = eta * g  # g is 0 on masked lanes
            low = tl.minimum(low, tl.where(mask, eta, float("inf")))
            b += step * step
            total += tl.where(mask, eta, 0.0)
            if MODE == 1 or MODE == 3:
                c += tl.abs(diff)
                c2 += diff * diff
        row = partials + pid * 5
        tl.store(row, tl.min(low, axis=0))
        tl.store(row + 1, tl.sum(b, axis=0))
        tl.store(row + 2, tl.sum(c, axis=0))
        tl.store(row + 3, tl.sum(c2, axis=0))
        tl.store(row + 4, tl.sum(total, axis=0))

    @triton.jit
    def _reduce_kernel(
        partials, rows, out, accumulators, finite, inverse_total, weight,
        ROWS_CEILING: tl.constexpr, BLOCK: tl.constexpr, ACCUMULATE: tl.constexpr,
    ):
        offs = tl.arange(0, BLOCK)
        low = tl.full([BLOCK], float("inf"), tl.float64)
        b = tl.zeros([BLOCK], tl.float64)
        c = tl.zeros([BLOCK], tl.float64)
        c2 = tl.zeros([BLOCK], tl.float64)
        total = tl.zeros([BLOCK], tl.float64)
        for start in range(0, ROWS_CEILING, BLOCK):  # a compile-time bound (a power of two ≥ rows)
            r = start + offs
            mask = r < rows
            at = partials + r * 5
            low = tl.minimum(low, tl.load(at, mask=mask, other=float("inf")).to(tl.float64))
            b += tl.load(at + 1, mask=mask, other=0.0).to(tl.float64)
            c += tl.load(at + 2, mask=mask, other=0.0).to(tl.float64)
            c2 += tl.load(at + 3, mask=mask, other=0.0).to(tl.float64)
            total += tl.load(at + 4, mask=mask, other=0.0).to(tl.float64)
        terms_min = tl.min(low, axis=0)
        terms_b = tl.sum(b, axis=0)
        terms_c = tl.sum(c, axis=0)
        terms_c2 = tl.sum(c2, axis=0)
        terms_sum = tl.sum(total, axis=0)
        tl.store(out, terms_min)
        tl.store(out + 1, terms_b)
        tl.store(out + 2, terms_c)
        tl.store(out + 3, terms_c2)
        tl.store(out + 4, terms_sum)
        if ACCUMULATE:
            # lightning_adamtype.row.add_step, in the accumulators' dtype: a finite step adds weight·[1, min η, Σ(ηg)²,
            # Σ|Δη|, Σ(Δη)², Ση/n, Σ|Δη|/n, 0]; a non-finite one adds only 1 to the last slot
            dtype = accumulators.dtype.element_ty
            row_min = terms_min.to(dtype)
            row_b = terms_b.to(dtype)
            row_c = terms_c.to(dtype)
            row_c2 = terms_c2.to(dtype)
            row_mean = terms_sum.to(dtype) * inverse_total
            row_c_mean = row_c * inverse_total
            ok = (row_min * 0 == 0) & (row_b * 0 == 0) & (row_c * 0 == 0) & (row_c2 * 0 == 0) & (row_mean * 0 == 0)
            k = tl.where(ok, weight, 0.0).to(dtype)
            tl.store(accumulators, tl.load(accumulators) + k)
            tl.store(accumulators + 1, tl.load(accumulators + 1) + tl.where(ok, row_min * k, 0.0))
            tl.store(accumulators + 2, tl.load(accumulators + 2) + tl.where(ok, row_b * k, 0.0))
            tl.store(accumulators + 3, tl.load(accumulators + 3) + tl.where(ok, row_c * k, 0.0))
            tl.store(accumulators + 4, tl.load(accumulators + 4) + tl.where(ok, row_c2 * k, 0.0))
            tl.store(accumulators + 5, tl.load(accumulators + 5) + tl.where(ok, row_mean * k, 0.0))
            tl.store(accumulators + 6, tl.load(accumulators + 6) + tl.where(ok, row_c_mean * k, 0.0))
            tl.store(accumulators + 7, tl.load(accumulators + 7) + tl.where(ok, 0.0, 1.0).to(dtype))
            tl.store(finite, ok.to(tl.uint8))


@dataclass
class GroupLaunch(FlatEtaLayout):
    """The launch geometry of one group (built once per list of sizes) and its address tables (rebuilt only when
    an address changes); η lives in the group's flat buffer as :class:`.one_pass.FlatEtaLayout`
    places it."""

    device: torch.device
    block_tensor: Tensor = field(init=False)
    block_start: Tensor = field(init=False)
    sizes_table: Tensor = field(init=False)
    eta_offsets: Tensor = field(init=False)
    partials: Tensor = field(init=False)  # one row of partial sums per program (written by the first launch)
    out: Tensor = field(init=False)  # the five terms (written by the second)
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
        for i, n in enumerate(self.sizes):
            blocks = -(-n // BLOCK)
            tensor_of_block += [i] * blocks
            start_of_block += range(0, blocks * BLOCK, BLOCK)
        self.block_tensor = to_device(tensor_of_block, torch.int32, self.device)
        self.block_start = to_device(start_of_block, torch.int64, self.device)
        self.sizes_table = to_device(list(self.sizes), torch.int64, self.device)
        self.eta_offsets = to_device(self.offsets, torch.int64, self.device)
        # the launches' outputs are reused every step (stream-ordered: a step's launches run after the last one's)
        self.partials = torch.empty(self.blocks, 5, dtype=torch.float32, device=self.device)
        self.out = torch.empty(5, dtype=torch.float64, device=self.device)
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
        accumulate: tuple[Tensor, float, float] | None = None,
    ) -> Tensor:
        """The group's five terms (float64 ``[5]``) in two launches; ``vs``, ``gs`` contiguous float32 on the
        device, ``eta`` the flat float32 η buffer of ``eta_numel`` elements (read and/or written per ``mode``;
        16-byte aligned, as any fresh allocation is), ``table`` the float32
        ``[n, 2]`` (s, e) or, for ``RECOMPUTED``, ``[n, 4]`` (s, e, s', e') table. ``accumulate`` =
        (accumulators ``[8]``, 1/n, k): the second launch also adds the step's row, weighted by k, to the
        accumulators (as :func:`lightning_adamtype.row.add_step` does) and writes whether the step was finite into
        :attr:`finite`. The returned tensor is :attr:`out`, overwritten by the next call."""
        self.check_launch(vs, gs, eta, table, mode)
        v_ptrs, g_ptrs = self.address_tables(vs, gs)
        partials, out = self.partials, self.out
        eta_arg = eta if eta is not None else partials  # never touched in CURRENT / RECOMPUTED
        aligned = self._aligned and (eta is None or eta.data_ptr() % 16 == 0)
        _group_terms_kernel[(self.blocks,)](
            v_ptrs, g_ptrs, eta_arg, self.eta_offsets, self.sizes_table, table, self.block_tensor, self.block_start,
            partials, float(inverse_keep), float(weight), TABLE_STRIDE=table.shape[1], MODE=mode, ALIGNED=aligned,
            BLOCK=BLOCK, SUB=SUB, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        )
        accumulators, inverse_total, observe_weight = accumulate if accumulate is not None else (out, 1.0, 1.0)
        _reduce_kernel[(1,)](
            partials, self.blocks, out, accumulators, self.finite, float(inverse_total), float(observe_weight),
            ROWS_CEILING=self._rows_ceiling, BLOCK=_REDUCE_BLOCK, ACCUMULATE=accumulate is not None,
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
