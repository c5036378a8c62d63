"""Fused per-group kernels of the condition math, for optimizers whose η has the "square-root form".

Adam, AdamW, Adagrad and RMSprop (not centered) all write their effective stepsize as

    η_t = s_t / (sqrt(v_t) + e_t)

with one second-moment tensor v_t and two scalars per parameter (Adam: s = lr·sqrt(1 − β2^t)/(1 − β1^t),
e = eps·sqrt(1 − β2^t); see each adapter's ``sqrt_form``). For each parameter tensor i of a list, the kernels
below return one row of the five per-step terms

    [min_j η_j,  Σ_j (η_j g_j)²,  Σ_j |η_j − η_{t−1,j}|,  Σ_j (η_j − η_{t−1,j})²,  Σ_j η_j]

reading each input once per loop, with no full-size temporaries when compiled. The scalars come as a table
``[n, 2]`` of (s_i, e_i). η_{t−1} comes either from a buffer the tracker keeps (``stored_terms``, which then
overwrites the buffer with η_t in place: no allocation, so no page faults on large tensors) or, when the
optimizer's update of v is linear, v_t = k·v_{t−1} + w·g_t², from the state itself (``recomputed_terms``):

    v_{t−1} = max((v_t − w·g_t²)·(1/k), 0),   a = sqrt(v_t) + e_t,   a' = sqrt(v_{t−1}) + e_{t−1},
    r = 1 / (a·a'),   η_t = s_t·a'·r,   η_t − η_{t−1} = (s_t·a' − s_{t−1}·a)·r      (one division, not two).

That is exact up to the rounding of v_t (a coordinate whose v grew by more than ~10⁷× in one step loses
η_{t−1}'s digits below float32's resolution of v_t) and needs no per-coordinate memory.

The same Python functions run eagerly (``compiled=False``) or through ``torch.compile(dynamic=True)``: one
graph per list length (the tracker passes chunks of 8, 4, 2 or 1 tensors), one fused loop per tensor; needs a
C++ compiler on CPU, Triton on GPU. Sums are taken in the working dtype (float32 for float32/bf16 state, float64
for float64 state); the tracker adds the rows in float64.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["CHUNK_LENGTHS", "CURRENT", "FIRST", "RECOMPUTED", "STORED", "FlatEtaLayout", "SquareRootKernels", "addresses", "chunks", "scratch_recomputed_terms", "scratch_terms", "sqrt_form_kernels"]

#: The list lengths the compiled kernels see (a group of n tensors is cut greedily into these): at most four
#: graphs per kernel, and one Python call per up to eight tensors.
CHUNK_LENGTHS = (8, 4, 2, 1)

# Inductor materialises a reused pointwise value that reads more than 4 inputs (here η_t − η_{t−1} of the
# recomputed kernel: v, g and six scalars) into a full-size buffer; that buffer costs a write, a read and, above
# glibc's mmap threshold, a page fault per 4 KiB on every call (3× slower at 10M coordinates on CPU).
_INDUCTOR_OPTIONS = {"realize_reads_threshold": 64}


def chunks(n: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` cutting ``range(n)`` into pieces of the lengths in :data:`CHUNK_LENGTHS`."""
    out, start = [], 0
    for length in CHUNK_LENGTHS:
        while n - start >= length:
            out.append((start, start + length))
            start += length
    return out


def _work(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _row(eta: Tensor, g: Tensor, diff: Tensor | None) -> Tensor:
    step = eta * g
    if diff is None:
        zero = torch.zeros((), dtype=eta.dtype, device=eta.device)
        c, c2 = zero, zero
    else:
        c, c2 = diff.abs().sum(), diff.square().sum()
    return torch.stack([eta.amin(), step.square().sum(), c, c2, eta.sum()])


def stepsize(v: Tensor, s: Tensor | float, e: Tensor | float) -> Tensor:
    """η = s / (sqrt(v) + e) in the working dtype."""
    return s / (_work(v).sqrt() + e)


def current_terms(vs: Sequence[Tensor], gs: Sequence[Tensor], table: Tensor) -> Tensor:
    """Rows ``[n, 5]`` with no η_{t−1} (the oscillation terms are 0)."""
    rows = []
    for i, (v, g) in enumerate(zip(vs, gs)):
        eta = stepsize(v, table[i, 0], table[i, 1])
        rows.append(_row(eta, _work(g).to(eta.dtype), None))
    return torch.stack(rows)


def first_terms(vs: Sequence[Tensor], gs: Sequence[Tensor], outs: Sequence[Tensor], table: Tensor) -> Tensor:
    """Like :func:`current_terms`, and writes η_t into ``outs`` (the η_{t−1} buffers of the next step)."""
    rows = []
    for i, (v, g, out) in enumerate(zip(vs, gs, outs)):
        eta = stepsize(v, table[i, 0], table[i, 1])
        rows.append(_row(eta, _work(g).to(eta.dtype), None))
        out.copy_(eta)
    return torch.stack(rows)


def stored_terms(vs: Sequence[Tensor], gs: Sequence[Tensor], previous: Sequence[Tensor], table: Tensor) -> Tensor:
    """Rows ``[n, 5]`` with η_{t−1} read from ``previous``, which is then overwritten with η_t in place."""
    rows = []
    for i, (v, g, prev) in enumerate(zip(vs, gs, previous)):
        eta = stepsize(v, table[i, 0], table[i, 1])
        rows.append(_row(eta, _work(g).to(eta.dtype), eta - prev))
        prev.copy_(eta)
    return torch.stack(rows)


def recomputed_terms(
    vs: Sequence[Tensor], gs: Sequence[Tensor], table: Tensor, previous_table: Tensor, update: Tensor
) -> Tensor:
    """Rows ``[n, 5]`` with η_{t−1} rebuilt from the state; ``update`` = (1/k, w) of v_t = k·v_{t−1} + w·g_t².

    v_t − w·(g·g) is rounded as the optimizer rounded its own update, so a coordinate with v_{t−1} = 0 gives 0."""
    rows = []
    for i, (v, g) in enumerate(zip(vs, gs)):
        v = _work(v)
        g = _work(g).to(v.dtype)
        a = v.sqrt() + table[i, 1]
        a_previous = ((v - update[1] * (g * g)) * update[0]).clamp_min(0).sqrt() + previous_table[i, 1]
        r = 1 / (a * a_previous)
        eta = table[i, 0] * a_previous * r
        diff = (table[i, 0] * a_previous - previous_table[i, 0] * a) * r
        rows.append(_row(eta, g, diff))
    return torch.stack(rows)


def scratch_terms(
    v: Tensor, g: Tensor, previous: Tensor | None, s: Tensor | float, e: Tensor | float
) -> tuple[Tensor, Tensor]:
    """Eager one-tensor form for small groups, where ``v`` and ``g`` are scratch copies (a concatenation) that are
    overwritten: (the row of five terms, η_t held in ``v``'s memory). ``previous`` (η_{t−1}, or None) is
    overwritten too. About a dozen operations and no full-size temporary, against ~25 for the functions above."""
    eta = v.sqrt_().add_(e).reciprocal_().mul_(s)  # s·(1/(sqrt(v)+e)): one rounding more than s/(...)
    step = g.mul_(eta)
    if previous is None:
        c = c2 = torch.zeros((), dtype=eta.dtype, device=eta.device)
    else:
        minus_diff = previous.sub_(eta)
        c2 = torch.dot(minus_diff, minus_diff)
        c = minus_diff.abs_().sum()
    return torch.stack([eta.amin(), torch.dot(step, step), c, c2, eta.sum()]), eta


def scratch_recomputed_terms(
    v: Tensor,
    g: Tensor,
    s: Tensor | float,
    e: Tensor | float,
    previous_s: Tensor | float,
    previous_e: Tensor | float,
    inverse_keep: float,
    weight: float,
) -> Tensor:
    """Eager one-tensor form of :func:`recomputed_terms` for small groups (``v``, ``g`` scratch copies, overwritten):

        a' = sqrt(max((v − w·g²)·(1/k), 0)) + e',   η_t = s / (sqrt(v) + e),   η_{t−1} = s' / a'.
    """
    a_previous = torch.sub(v, g.square().mul_(weight)).mul_(inverse_keep).clamp_min_(0).sqrt_().add_(previous_e)
    eta = v.sqrt_().add_(e).reciprocal_().mul_(s)
    minus_diff = a_previous.reciprocal_().mul_(previous_s).sub_(eta)
    c2 = torch.dot(minus_diff, minus_diff)
    c = minus_diff.abs_().sum()
    step = g.mul_(eta)
    return torch.stack([eta.amin(), torch.dot(step, step), c, c2, eta.sum()])


#: the modes of the one-call-per-group kernels (:mod:`~lightning_adamtype.triton_kernels`,
#: :mod:`~lightning_adamtype.native_kernels`, whose C source repeats them): η_{t−1} absent and η_t stored; read and
#: overwritten; absent and not stored; rebuilt from v_t and g_t (the table then has 4 columns: s, e, s', e')
FIRST, STORED, CURRENT, RECOMPUTED = 0, 1, 2, 3


@dataclass
class FlatEtaLayout:
    """Where a group's tensors keep η in one flat buffer (the layout of the one-call-per-group kernels,
    :mod:`~lightning_adamtype.triton_kernels` and :mod:`~lightning_adamtype.native_kernels`): tensor i at
    ``offsets[i]``, each start rounded up to 4 elements so every η address is 16-byte aligned like the tensors'."""

    sizes: tuple[int, ...]
    offsets: list[int] = field(init=False)
    eta_numel: int = field(init=False)  # the buffer's length

    def __post_init__(self) -> None:
        self.offsets, offset = [], 0
        for n in self.sizes:
            self.offsets.append(offset)
            offset += -(-n // 4) * 4
        self.eta_numel = offset

    def check_launch(self, vs: Sequence[Tensor], gs: Sequence[Tensor], eta: Tensor | None, table: Tensor, mode: int) -> None:
        """The kernels read raw addresses: one v and one g per tensor, a contiguous float32 table of n rows and at least 2 columns
        (s, e; 4 for ``RECOMPUTED``: s', e' too; the row stride is the column count) and, in ``FIRST`` / ``STORED``,
        an η buffer of :attr:`eta_numel` elements; ValueError else."""
        n, columns = len(self.sizes), 4 if mode == RECOMPUTED else 2
        needs_eta = mode in (FIRST, STORED)
        bad_table = (
            table.dim() != 2 or table.shape[0] != n or table.shape[1] < columns
            or table.dtype != torch.float32 or not table.is_contiguous()
        )
        if len(vs) != n or len(gs) != n or bad_table or (needs_eta and (eta is None or eta.numel() < self.eta_numel)):
            raise ValueError(
                f"a launch for {n} tensors (η buffer of {self.eta_numel}) got {len(vs)} v, {len(gs)} g, a "
                f"{'' if table.is_contiguous() else 'non-contiguous '}{table.dtype} table of shape {tuple(table.shape)} "
                f"(expected contiguous float32, {n} rows of at least {columns} in mode {mode}) and "
                f"{'no η buffer' if eta is None else f'an η buffer of {eta.numel()}'}"
            )

    def eta_views(self, buffer: Tensor, shapes: list[torch.Size]) -> list[Tensor]:
        """Each tensor's η as a view of the flat buffer, in its parameter's shape."""
        return [buffer.narrow(0, o, n).view(shape) for o, n, shape in zip(self.offsets, self.sizes, shapes)]


def addresses(tensors: Sequence[Tensor]) -> tuple[int, ...]:
    """The tensors' data pointers (what the group launches' address tables hold)."""
    return tuple(map(Tensor.data_ptr, tensors))


class SquareRootKernels:
    """The kernels, eager or compiled (one compiled graph per list length, rank/dtype/layout; sizes dynamic)."""

    def __init__(self, compiled: bool) -> None:
        self.compiled = compiled
        wrap: Callable[[Callable], Callable]
        if compiled:
            wrap = functools.partial(torch.compile, dynamic=True, fullgraph=True, options=_INDUCTOR_OPTIONS)
        else:
            wrap = lambda f: f  # noqa: E731
        self.current = wrap(current_terms)
        self.first = wrap(first_terms)
        self.stored = wrap(stored_terms)
        self.recomputed = wrap(recomputed_terms)


@functools.lru_cache(maxsize=2)
def sqrt_form_kernels(compiled: bool) -> SquareRootKernels:
    """Shared kernels (compiled graphs are cached by torch per function, so share the wrappers too)."""
    return SquareRootKernels(compiled)
