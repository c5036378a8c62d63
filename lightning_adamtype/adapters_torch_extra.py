"""Adapters for torch's Adadelta, Adafactor and SparseAdam, whose effective stepsizes (or activity) need the step's
gradient.

Both η's depend on the gradient g_t of the step itself, not only on the state the optimizer keeps: Adadelta's
through Δ_{t−1} (the state holds Δ_t), Adafactor's through its update clipping and the parameter norm ‖x_t‖ its
relative step size reads before the update. The adapters take g_t (and the parameter) from the tracker's call to
``consumed_gradients`` for the same step and keep only weak references to them, so no tensor outlives the step.
SparseAdam's coordinates that count at a step are those its sparse gradient touched: its adapter reads them from the
gradient's indices in the same call (and hands them to ``activity``, which releases them).
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Sequence

import torch
from torch import Tensor

from .adapter_kit import NotMapped, from_sqrt_form, group_lr, step_value, work_dtype

__all__ = ["AdadeltaAdapter", "AdafactorAdapter", "SparseAdamAdapter"]

#: fixed-point iterations allowed for Adadelta's x_t under coupled weight decay, and the relative tolerance
_ITERATIONS, _TOLERANCE = 60, 1e-12


class StepGradients:
    """The step's gradient and parameter per state dict, as weak references, set by ``consumed_gradients``."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[weakref.ref, weakref.ref | None]] = {}

    def consumed_gradients(self, group: dict[str, Any], states: Sequence[dict[str, Any]], grads: list[Tensor]) -> list[Tensor]:
        """g_t is ``p.grad`` itself (returned unchanged); it and its parameter are remembered for this step's η."""
        by_grad = {id(p.grad): p for p in group["params"] if p.grad is not None}
        seen = {}
        for st, g in zip(states, grads):
            p = by_grad.get(id(g))
            seen[id(st)] = (weakref.ref(g), weakref.ref(p) if p is not None else None)
        self._seen = seen
        return grads

    def _grad_of(self, state: dict[str, Any], name: str) -> tuple[Tensor, Tensor | None]:
        entry = self._seen.get(id(state))
        grad = entry[0]() if entry is not None else None
        if grad is None or entry is None:
            raise RuntimeError(
                f"{name}'s effective stepsize needs the step's gradient, which the tracker hands over in "
                "consumed_gradients(); it was not seen for this parameter (call effective_stepsizes only from the tracker)"
            )
        return grad, (entry[1]() if entry[1] is not None else None)

    def _param_of(self, state: dict[str, Any], name: str, why: str) -> Tensor:
        param = self._grad_of(state, name)[1]
        if param is None:
            raise RuntimeError(f"{name}: {why} needs the parameter x_{{t+1}}, and its gradient is not p.grad (sharded?)")
        return param


class AdadeltaAdapter(StepGradients):
    """Adadelta (Zeiler 2012; torch's for-loop and foreach implementations).

    torch steps v_t = ρ·v_{t−1} + (1 − ρ)·g_t², u_t = sqrt(Δ_{t−1} + ε)/sqrt(v_t + ε)·g_t,
    Δ_t = ρ·Δ_{t−1} + (1 − ρ)·u_t², x_{t+1} = x_t − lr·u_t, so

        η_t = lr·sqrt(Δ_{t−1} + ε)/sqrt(v_t + ε) = lr·sqrt((Δ_t + ρε) / (ρ(v_t + ε) + (1 − ρ)·g_t²)),

    the second form from the state after the step (Δ = ``acc_delta``, v = ``square_avg``): solving
    Δ_t = ρΔ_{t−1} + (1 − ρ)(Δ_{t−1} + ε)·g²/(v_t + ε) for Δ_{t−1} gives Δ_{t−1} + ε = (Δ_t + ρε)/(ρ + (1 − ρ)g²/(v_t + ε)).
    g_t includes the coupled weight decay λ·x_t (and maximize's sign, which the square drops); with λ ≠ 0 the
    unknown x_t = x_{t+1} + lr·u_t is found by the fixed point g ← q + λ·lr·D(g)·g, q = ±∇ + λ·x_{t+1},
    D(g) = η(g)/lr (in float64; a contraction when λ·lr·D < 1, checked). Not defined for ρ = 0 where g = 0.
    """

    def effective_stepsizes(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[Tensor]:
        lr, rho, eps = group_lr(group), float(group["rho"]), float(group["eps"])
        wd = float(group.get("weight_decay", 0.0))
        out = []
        for st in states:
            delta, v = st["acc_delta"], st["square_avg"]
            grad = self._grad_of(st, "Adadelta")[0]
            if wd == 0.0:
                dtype = work_dtype(v)
                g2 = grad.to(dtype).square()
                numerator = delta.to(dtype).add(rho * eps)
                out.append(numerator.div_(v.to(dtype).add(eps).mul_(rho).add_(g2, alpha=1 - rho)).sqrt_().mul_(lr))
            else:
                param = self._param_of(st, "Adadelta", "coupled weight decay")
                out.append(self._with_decay(group, delta, v, grad, param).to(work_dtype(v)))
        return out

    @staticmethod
    def _with_decay(group: dict[str, Any], delta: Tensor, v: Tensor, grad: Tensor, param: Tensor) -> Tensor:
        """η_t with g_t = ±∇ + λ·x_t, x_t unknown: the fixed point of g = q + λ·lr·D(g)·g (float64)."""
        lr, rho, eps, wd = float(group["lr"]), float(group["rho"]), float(group["eps"]), float(group["weight_decay"])
        sign = -1.0 if group.get("maximize", False) else 1.0
        numerator = delta.double() + rho * eps
        base = (v.double() + eps) * rho
        q = grad.double() * sign + wd * param.detach().double()

        def factor(g: Tensor) -> Tensor:  # D(g) = sqrt((Δ_t + ρε)/(ρ(v_t + ε) + (1 − ρ)g²))
            return (numerator / (base + (1 - rho) * g * g)).sqrt()

        g = q
        for _ in range(_ITERATIONS):
            nxt = q + (wd * lr) * factor(g) * g
            change = (nxt - g).abs().max() if g.numel() else torch.zeros((), dtype=g.dtype)
            g = nxt
            if float(change) <= _TOLERANCE * max(float(g.abs().max()) if g.numel() else 0.0, 1e-30):
                return factor(g) * lr
        raise NotMapped(
            f"Adadelta with weight_decay={wd}: g_t = ∇ + λ·x_t could not be rebuilt from the state after the step "
            f"(the fixed point did not converge in {_ITERATIONS} iterations, λ·lr·D ≥ 1?)"
        )

    def activity(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[Tensor]:
        """v = ``square_avg``: > 0 exactly where a coordinate has had a non-zero gradient."""
        return [s["square_avg"] for s in states]

    def coupled_weight_decay(self, group: dict[str, Any]) -> float:
        return float(group.get("weight_decay", 0.0))


class AdafactorAdapter(StepGradients):
    """Adafactor as torch implements it (Shazeer & Stern 2018; torch ≥ 2.5, for-loop and foreach; no momentum).

    torch steps (t = ``step``, ρ_t = min(lr, 1/√t), n = the parameter's size, ε1 = eps[0] or the dtype's eps)

        V̂_t = R_t C_t / max(mean(R_t), ε1) for ≥ 2-D parameters (``row_var`` R, ``col_var`` C, factored over the last
              two dimensions), V̂_t = ``variance`` otherwise (both EMAs of g² with weight t^beta2_decay),
        U_t = g_t / sqrt(max(V̂_t, ε1²)),  α_t = ρ_t·max(ε2, RMS(x_t)),  d_t = max(1, RMS(U_t)/d),
        x_{t+1} = (1 − lr·λ)·x_t − (α_t/d_t)·U_t,

    so the per-coordinate multiplier of g_t is η_t = (α_t/d_t) / sqrt(max(V̂_t, ε1²)). Its weight decay is
    decoupled (not part of g). RMS(x_t), read before the update, comes back from x_{t+1}: with k = 1 − lr·λ and
    c = ρ_t/(√n·d_t), r = ‖x_t‖ solves k²r² = ‖x_{t+1}‖² + 2cr·(x_{t+1}·U) + c²r²‖U‖² (its positive root; α_t =
    ρ_t·ε2 when that r has RMS < ε2). Coordinates count as active where V̂_t > 0.
    """

    def effective_stepsizes(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[Tensor]:
        out = []
        for st in states:
            grad = self._grad_of(st, "Adafactor")[0]
            eps1 = self._eps1(group, grad)
            inverse_root = self._estimate(st, grad, eps1).clamp_min(eps1 * eps1).rsqrt_()
            out.append(inverse_root.mul_(self._scale(group, st, grad, inverse_root)))
        return out

    @staticmethod
    def _eps1(group: dict[str, Any], grad: Tensor) -> float:
        eps1 = group["eps"][0]
        return float(torch.finfo(grad.dtype).eps) if eps1 is None else float(eps1)

    @staticmethod
    def _estimate(state: dict[str, Any], grad: Tensor, eps1: float) -> Tensor:
        """V̂_t = R C / max(mean(R), ε1) (≥ 2-D, torch's operations), else ``variance`` (a fresh tensor)."""
        if grad.dim() > 1:
            row, col = state["row_var"], state["col_var"]
            return (row @ col).div_(row.mean(dim=-2, keepdim=True).clamp_(min=eps1)).to(work_dtype(row))
        return state["variance"].to(work_dtype(state["variance"]), copy=True)

    def _scale(self, group: dict[str, Any], state: dict[str, Any], grad: Tensor, inverse_root: Tensor) -> Tensor:
        """α_t/d_t as a 0-dim float64 tensor on the parameter's device (no host read): d_t = max(1, RMS(U)/d) with
        U = g·inverse_root, α_t = ρ_t·max(ε2, RMS(x_t)), RMS(x_t) = r/√n from x_t = x_{t+1}/k + (c/k)·U, i.e. the
        positive root r of (k² − c²ΣU²)·r² − 2c(x_{t+1}·U)·r − Σx_{t+1}² = 0 (c = ρ_t/(√n·d_t), k = 1 − lr·λ);
        ρ_t·ε2/d_t where that root is not positive or below ε2."""
        lr = float(group["lr"])
        t = float(step_value(state))
        rho = min(lr, 1 / (t**0.5))
        sign = -1.0 if group.get("maximize", False) else 1.0
        update = inverse_root.double() * grad.double() * sign
        root_n = math.sqrt(max(update.numel(), 1))
        denom = (update.norm() / (root_n * float(group["d"]))).clamp_min(1.0)
        eps2, k = float(group["eps"][1]), 1.0 - lr * float(group.get("weight_decay", 0.0))
        x_next = self._param_of(state, "Adafactor", "its relative step size").detach().double()
        c = rho / (root_n * denom)
        quad = k * k - c * c * update.square().sum()
        dot, norm2 = (x_next * update).sum(), x_next.square().sum()
        rms = (c * dot + (c * c * dot * dot + quad * norm2).clamp_min(0.0).sqrt()) / quad / root_n
        return torch.where((quad > 0) & (rms >= eps2), rho * rms / denom, rho * eps2 / denom)

    def activity(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[Tensor]:
        """V̂_t (unclamped): > 0 where the coordinate's row and column (or itself, 1-D) have had a gradient."""
        out = []
        for st in states:
            grad = self._grad_of(st, "Adafactor")[0]
            out.append(self._estimate(st, grad, self._eps1(group, grad)))
        return out

    def coupled_weight_decay(self, group: dict[str, Any]) -> float:
        return 0.0


class SparseAdamAdapter:
    """SparseAdam (torch's lazy Adam for sparse gradients, e.g. ``nn.Embedding(sparse=True)``).

    At a step torch coalesces the sparse gradient (negated under ``maximize``) and, at the coordinates J_t in its
    indices only, updates m ← β1·m + (1 − β1)·g, v ← β2·v + (1 − β2)·g² (``exp_avg``, ``exp_avg_sq``) and
    x ← x − s_t·m/(sqrt(v) + eps), s_t = lr·sqrt(1 − β2^t)/(1 − β1^t) (eps is *not* scaled by the bias correction,
    unlike Adam's; t = the parameter's ``step``, which counts the steps it had a gradient). Every other coordinate
    keeps x, m and v. So, at j ∈ J_t,

        η_{t,j} = lr·sqrt(1 − β2^t)/(1 − β1^t) / (sqrt(v_{t,j}) + eps),

    and the coordinates off J_t do not step at t. The mapping: the coordinates counted at t are exactly J_t
    (``activity`` = 1 on J_t, 0 elsewhere, from the coalesced *indices*, not the values: a touched coordinate whose
    gradient value is 0 still stepped, with its moments decayed; as for every optimizer, a coordinate with v_t = 0,
    one whose gradients were all 0, is not counted), g_t is the gradient densified
    (``grad.coalesce().to_dense()``, 0 off J_t; maximize's sign is dropped, b squares it), so a and b run over the
    touched coordinates and c, c2 over those touched at t and at t − 1; ``activations`` counts the coordinates touched
    at t but not at t − 1 (a first touch, or a return after a gap) and ``inactive`` those untouched at t. η is given
    for every coordinate by the formula above (what an untouched coordinate would step with; only
    ``coordinates="all"`` counts it). No weight decay. The tracker lets this adapter's sparse gradients through
    (``sparse_gradients = True``); ``consumed_gradients`` densifies them before any backend sees them.
    """

    #: the tracker measures parameters with sparse gradients for this adapter (``consumed_gradients`` densifies them)
    sparse_gradients = True

    def __init__(self) -> None:
        self._touched: dict[int, Tensor] = {}  # per state dict: 1 at the coordinates this step's gradient touched

    def consumed_gradients(self, group: dict[str, Any], states: Sequence[dict[str, Any]], grads: list[Tensor]) -> list[Tensor]:
        """g_t = ``grad.coalesce().to_dense()`` per parameter; J_t (1 at the coalesced indices) is kept for
        :meth:`activity` of the same step. A dense gradient (SparseAdam itself rejects one) is taken as it is, every
        coordinate touched."""
        touched: dict[int, Tensor] = {}
        dense = []
        for st, grad in zip(states, grads):
            if grad.is_sparse:
                grad = grad.coalesce()
                touched[id(st)] = self._indicator(grad)
                dense.append(grad.to_dense())
            else:
                touched[id(st)] = torch.ones_like(grad, dtype=work_dtype(grad))
                dense.append(grad)
        self._touched = touched
        return dense

    @staticmethod
    def _indicator(grad: Tensor) -> Tensor:
        """1 at the coordinates of a coalesced sparse gradient's indices (a hybrid one's dense dimensions included), 0
        elsewhere, shaped like the gradient (the value of the gradient there does not matter)."""
        sparse_dims = grad.sparse_dim()
        mask = torch.zeros(grad.shape[:sparse_dims], dtype=work_dtype(grad), device=grad.device)
        mask[tuple(grad.indices())] = 1.0
        return mask.reshape(*mask.shape, *([1] * grad.dense_dim())).expand(grad.shape)

    def activity(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[Tensor]:
        """1 on J_t ∩ {v_t > 0} (the coordinates the step's sparse gradient touched, as found by this step's
        :meth:`consumed_gradients`, then released; a touched coordinate whose gradients were all 0 has v = 0 and
        η = s/eps, outside the theory as Adam's never-active coordinates are), 0 elsewhere."""
        touched, self._touched = self._touched, {}
        missing = [i for i, st in enumerate(states) if id(st) not in touched]
        if missing:
            raise RuntimeError(
                "SparseAdam's touched coordinates come from the step's sparse gradient, which the tracker hands over in "
                f"consumed_gradients(); it was not seen for parameter(s) {missing} (call activity only from the tracker)"
            )
        return [touched[id(st)] * (st["exp_avg_sq"] > 0) for st in states]

    def effective_stepsizes(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[Tensor]:
        """η_t = s_t / (sqrt(v_t) + eps), s_t = lr·sqrt(1 − β2^t)/(1 − β1^t), v = ``exp_avg_sq`` (every coordinate)."""
        beta1, beta2 = float(group["betas"][0]), float(group["betas"][1])
        lr, eps = group_lr(group), float(group["eps"])
        scalars = []
        for st in states:
            t = step_value(st)
            scalars.append((lr * math.sqrt(1 - beta2**t) / (1 - beta1**t), eps))  # type: ignore[operator,arg-type]
        return from_sqrt_form([st["exp_avg_sq"] for st in states], scalars)

    def coupled_weight_decay(self, group: dict[str, Any]) -> float:
        """0.0: SparseAdam has no weight decay."""
        return 0.0
