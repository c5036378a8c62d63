"""The reference backend: multi-tensor ``torch._foreach_*`` operations, for every optimizer, dtype and device.

For one group step, with η_t from the adapter (fresh tensors in at least float32):

    min_eta = min_j η_j      b = Σ_j (η_j g_j)²      eta_sum = Σ_j η_j
    c = Σ_j |η_j − η_{t−1,j}|      c2 = Σ_j (η_j − η_{t−1,j})²     (parameters with an η_{t−1})

over the coordinates :mod:`lightning_adamtype.row` counts (``coordinates="active"``: active ones, pairs active at
t − 1), with the counts, activations, inactive coordinates and each parameter's (b_i, c_i) (float32 norms).

Accuracy: torch's float32 norms accumulate in float32, which is 0.3 % off at 40M coordinates. On accelerators every
sum here is taken over pieces of at most :data:`PIECE` coordinates (norms of views, no copy), the pieces added in
float64. On the CPU torch's norm kernel adds a piece's values one after another in a few float32 lanes, which drifts
when the values have one magnitude (Adam's first steps: |η g| ≈ lr on every coordinate): 2.6e-4 relative for Σ|x|
and 8e-6 for Σx² at 40M even in pieces of 2^16. CPU sums therefore write |x| or x² of pieces of at most
:data:`CPU_PIECE` coordinates (small tensors gathered into one piece) into one work buffer and sum it with
``torch.sum`` (a cascade summation), the pieces added in float64: 1e-7 relative or better at any size, for any
values. In recomputed mode η_{t−1} is rebuilt from the state, v_{t−1} = max((v_t − w·g_t²)/k, 0), taken as 0
(inactive at t − 1) unless > :data:`RECOMPUTED_ZERO` · v_t, η_{t−1} = s' / (sqrt(v_{t−1}) + e').
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from ..adapter_kit import from_sqrt_form, min_from_sqrt_form, scalar_table, to_device
from . import GroupStep, StepResult
from .one_pass import RECOMPUTED_ZERO  # (one definition for every backend)

__all__ = ["CPU_PIECE", "PIECE", "RECOMPUTED_ZERO", "ForeachBackend", "abs_sum", "square_sum"]

#: coordinates per piece of a float32 norm on accelerators (measured at 40M: 1.7e-7 relative for Σ|x|, 2e-9 for Σx²)
PIECE = 1 << 16
#: coordinates per piece of a CPU sum: |x| or x² of a piece is written into one work buffer (16 MB in float32) and
#: summed by ``torch.sum`` (few, large operations: a small one costs an OpenMP fork and join on a busy machine)
CPU_PIECE = 1 << 22


def _pieces(tensors: Sequence[Tensor], piece: int = PIECE) -> list[Tensor]:
    out: list[Tensor] = []
    for t in tensors:
        flat = t.reshape(-1)
        if flat.numel() > piece:
            out.extend(flat.split(piece))
        else:
            out.append(flat)
    return out


@torch.no_grad()  # (a measurement; the work buffer is written with out=)
def _cpu_sum(tensors: Sequence[Tensor], square: bool, dtype: torch.dtype) -> Tensor:
    """Σ|x| (or Σx²) of CPU tensors: pieces of at most :data:`CPU_PIECE` coordinates (consecutive small tensors
    gathered into one), |x| (or x²) of each, in at least float32, written into one work buffer and summed by
    ``torch.sum``; the pieces' sums added in ``dtype``."""
    work_dtype = torch.float32
    for t in tensors:
        work_dtype = torch.promote_types(work_dtype, t.dtype)
    pieces = _pieces(tensors, CPU_PIECE)
    buffer = torch.empty(min(CPU_PIECE, sum(p.numel() for p in pieces)), dtype=work_dtype)
    sums: list[Tensor] = []

    def flush(batch: list[Tensor], size: int) -> None:
        out = buffer[:size]
        if len(batch) == 1 and batch[0].dtype == work_dtype:
            torch.mul(batch[0], batch[0], out=out) if square else torch.abs(batch[0], out=out)
        else:
            if all(t.dtype == work_dtype for t in batch):
                torch.cat(batch, out=out)
            else:
                offset = 0
                for t in batch:
                    out[offset : offset + t.numel()].copy_(t)
                    offset += t.numel()
            out.mul_(out) if square else out.abs_()
        sums.append(out.sum(dtype=work_dtype))

    batch: list[Tensor] = []
    size = 0
    for piece in pieces:
        if batch and size + piece.numel() > CPU_PIECE:
            flush(batch, size)
            batch, size = [], 0
        batch.append(piece)
        size += piece.numel()
    if batch:
        flush(batch, size)
    return torch.stack(sums).to(dtype).sum()


def abs_sum(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """Σ_i Σ_j |x_ij|, pieces (:data:`PIECE`; on the CPU :data:`CPU_PIECE`) added in ``dtype``."""
    if not tensors:
        return torch.zeros((), dtype=dtype)
    if all(t.device.type == "cpu" for t in tensors):
        return _cpu_sum(tensors, False, dtype)
    return torch.stack(torch._foreach_norm(_pieces(tensors), 1)).to(dtype).sum()


def square_sum(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """Σ_i Σ_j x_ij², pieces (:data:`PIECE`: their 2-norms squared in ``dtype``; on the CPU :data:`CPU_PIECE`)
    added in ``dtype``."""
    if not tensors:
        return torch.zeros((), dtype=dtype)
    if all(t.device.type == "cpu" for t in tensors):
        return _cpu_sum(tensors, True, dtype)
    return torch.stack(torch._foreach_norm(_pieces(tensors), 2)).to(dtype).square().sum()


def _minimum(etas: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.stack(torch._foreach_max(torch._foreach_neg(list(etas)))).max().neg().to(dtype)


def _per_tensor_sum(tensors: Sequence[Tensor], p: int, dtype: torch.dtype) -> Tensor:
    """Σ_j |x_ij| (p = 1) or Σ_j x_ij² (p = 2) of each tensor i: float32 norms of pieces of :data:`PIECE`
    coordinates, added per tensor in ``dtype`` (shares, not totals: on the CPU a piece's norm drifts for values of
    one magnitude, 3e-4 relative or better; one norm of a whole tensor of 30M was 2 % off)."""
    pieces = _pieces(tensors)
    norms = torch.stack(torch._foreach_norm(pieces, p)).to(dtype)
    if p == 2:
        norms = norms.square()
    if len(pieces) == len(tensors):
        return norms
    counts = [max(1, -(-t.numel() // PIECE)) for t in tensors]  # (as _pieces splits them)
    index = to_device([i for i, k in enumerate(counts) for _ in range(k)], torch.int64, norms.device)
    return torch.zeros(len(tensors), dtype=dtype, device=norms.device).index_add_(0, index, norms)


def _counts(masks: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.stack([m.sum(dtype=dtype) for m in masks])


class ForeachBackend:
    """Multi-tensor operations; takes every step (the fallback of the one-pass backends)."""

    name = "foreach"

    def unavailable(self, device: torch.device) -> str | None:
        return None

    def decline(self, step: GroupStep) -> str | None:
        return None

    def run(self, step: GroupStep) -> StepResult:
        if step.uniform is not None:
            return self._uniform(step)
        dtype, device = step.dtype, step.device
        if step.form is not None:
            etas = from_sqrt_form(*step.form)
            eta_min: Tensor | None = min_from_sqrt_form(*step.form, dtype)  # (the largest v is active when any is)
        else:
            etas = list(step.effective_stepsizes())
            eta_min = step.min_stepsize(dtype) if step.min_stepsize is not None else None
        grads = [g if g.dtype == e.dtype else g.to(e.dtype) for g, e in zip(step.grads, etas)]
        active = [a > 0 for a in step.activity] if step.activity is not None else None
        counted = active if active is not None and step.coordinates == "active" else None
        if counted is not None and step.form is None:
            inf = torch.tensor(float("inf"), dtype=etas[0].dtype, device=device)
            eta_min = _minimum([torch.where(m, e, inf) for m, e in zip(counted, etas)], dtype)
        elif eta_min is None:
            eta_min = _minimum(etas, dtype)
        counted_etas = etas if counted is None else torch._foreach_mul(etas, counted)
        products = torch._foreach_mul(counted_etas, grads)
        b, eta_sum = square_sum(products, dtype), abs_sum(counted_etas, dtype)
        sizes = [e.numel() for e in etas]
        n = sum(sizes)
        per_active = _counts(active, dtype).to(device) if active is not None else torch.tensor(sizes, dtype=dtype, device=device)
        n_counted = per_active.sum() if counted is not None else torch.tensor(float(n), dtype=dtype, device=device)
        olds, scales = self._previous(step, etas, grads)
        index = [i for i, old in enumerate(olds) if old is not None]
        zero = torch.zeros((), dtype=dtype, device=device)
        per_c = torch.zeros(len(etas), dtype=dtype, device=device)
        per_activations = torch.zeros(len(etas), dtype=dtype, device=device)
        c = c2 = n_pairs = activations = zero
        if index:
            previous_active = [~torch.signbit(olds[i]) for i in index]  # (−η, −0 too: inactive at t − 1)
            diffs = torch._foreach_sub([etas[i] for i in index], torch._foreach_abs([olds[i] for i in index]))
            if counted is not None:
                pairs = [w & counted[i] for w, i in zip(previous_active, index)]
                diffs = torch._foreach_mul(diffs, pairs)
                n_pairs = _counts(pairs, dtype).sum()
            else:
                n_pairs = torch.tensor(float(sum(sizes[i] for i in index)), dtype=dtype, device=device)
            c, c2 = abs_sum(diffs, dtype), square_sum(diffs, dtype)
            per_c[index] = _per_tensor_sum(diffs, 1, dtype)
            if active is not None:
                started = _counts([active[i] & ~w for w, i in zip(previous_active, index)], dtype)
                per_activations[index] = started
                activations = started.sum()
        per_inactive = torch.tensor(sizes, dtype=dtype, device=device) - per_active
        terms = torch.stack([
            eta_min.to(device=device, dtype=dtype), b.to(device), c, c2, eta_sum.to(device), n_counted, n_pairs,
            activations, per_inactive.sum(),
        ])
        per_tensor = torch.stack([_per_tensor_sum(products, 2, dtype), per_c, per_activations, per_inactive], dim=1)
        signed = etas if active is None else [torch.where(m, e, -e) for m, e in zip(active, etas)]
        if step.update is not None:
            return StepResult(terms, n, scales=scales, per_tensor=per_tensor)
        return StepResult(terms, n, etas=self._kept(step, signed), per_tensor=per_tensor)

    @staticmethod
    def _previous(step: GroupStep, etas: list[Tensor], grads: list[Tensor]) -> tuple[list[Any], Tensor | None]:
        """η_{t−1} per parameter (None when absent; −η_{t−1} where the coordinate was inactive at t − 1), and in
        recomputed mode this step's (s, e) table."""
        if step.update is None:
            return step.previous, None
        assert step.form is not None
        vs, scalars = step.form
        table = scalar_table(scalars, step.dtype, step.device)
        keep, weight = step.update
        olds: list[Any] = []
        for v, g, e, sc in zip(vs, grads, etas, step.previous_scales):
            if sc is None:
                olds.append(None)
                continue
            work = v.to(e.dtype)
            before = (work - (g * g).mul_(weight)).mul_(1.0 / keep).clamp_min_(0)  # (the roundings of the kernels)
            was_active = before > RECOMPUTED_ZERO * work
            before.masked_fill_(~was_active, 0.0)  # inactive at t − 1: its v_{t−1} was 0 (the rest is roundings)
            old = sc[0].to(e.dtype) / (before.sqrt_() + sc[1].to(e.dtype))
            olds.append(torch.where(was_active, old, -old))
        if step.found_inf is not None:  # a skipped step keeps the previous (s', e')
            skipped = step.found_inf.to(step.device).reshape(()) > 0
            olds_table = [sc if sc is not None else row for sc, row in zip(step.previous_scales, table.unbind(0))]
            table = torch.where(skipped, torch.stack(olds_table).to(table.dtype), table)
        return olds, table

    @staticmethod
    def _kept(step: GroupStep, etas: list[Tensor]) -> list[Any]:
        """η_t to keep; a step a GradScaler skipped (found_inf) keeps η_{t−1} where there was one."""
        if step.found_inf is None:
            return list(etas)
        keep = 1 - step.found_inf.to(device=step.device, dtype=etas[0].dtype).reshape(())
        return [e if old is None else old + keep * (e - old) for e, old in zip(etas, step.previous)]

    @staticmethod
    def _uniform(step: GroupStep) -> StepResult:
        """One η for every coordinate (SGD): nothing per coordinate is built or kept; every coordinate is active."""
        dtype, device = step.dtype, step.device
        eta = step.uniform
        eta_t = eta.to(device=device, dtype=dtype) if isinstance(eta, Tensor) else to_device(eta, dtype, device)
        grads = [g if g.is_floating_point() and g.dtype != torch.bfloat16 and g.dtype != torch.float16 else g.float() for g in step.grads]
        grad_sq = square_sum(grads, dtype)
        sizes = [p.numel() for p in step.params]
        index = [i for i, old in enumerate(step.previous) if old is not None]
        zero = torch.zeros((), dtype=dtype, device=device)
        c = c2 = zero
        n_previous = sum(sizes[i] for i in index)
        per_c = torch.zeros(len(sizes), dtype=dtype, device=device)
        if index:
            olds = torch.stack([torch.as_tensor(step.previous[i], dtype=dtype, device=device).reshape(()) for i in index])
            counts = to_device([float(sizes[i]) for i in index], dtype, device)
            diff = (eta_t - olds).abs()
            c, c2 = (diff * counts).sum(), (diff.square() * counts).sum()
            per_c[index] = diff * counts
        n = sum(sizes)
        terms = torch.stack([
            eta_t, eta_t.square() * grad_sq, c, c2, eta_t * n, torch.full_like(zero, float(n)),
            torch.full_like(zero, float(n_previous)), zero, zero,
        ])
        per_b = _per_tensor_sum(grads, 2, dtype).to(device) * eta_t.square()
        per_tensor = torch.stack([per_b, per_c, torch.zeros_like(per_c), torch.zeros_like(per_c)], dim=1)
        return StepResult(terms, n, etas=[eta] * len(step.params), per_tensor=per_tensor)
