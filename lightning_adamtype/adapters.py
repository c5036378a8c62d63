"""Adapters: how each optimizer family maps onto the paper's template.

Chen, Liu, Sun & Hong (ICLR 2019) write every Adam-type method as

    m_t = β1,t m_{t-1} + (1 - β1,t) g_t,    x_{t+1} = x_t - α_t m_t / sqrt(v̂_t),

and call η_t = α_t / sqrt(v̂_t) the *effective stepsize*. An adapter reads an optimizer's state right after its
step and returns η_t for every parameter of a group, plus the facts needed to rebuild the gradient g_t that the
optimizer consumed (coupled weight decay, ``maximize``).

Adapters are looked up in a registry by the optimizer's class (walking its MRO), so a subclass of ``Adam`` is
mapped like ``Adam``. Third parties add theirs with :func:`register_adapter`.
"""

from __future__ import annotations

import inspect
import math
import operator
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from . import third_party
from .adapter_kit import (
    NotMapped, OptimizerAdapter, Scalar, ScalarTable, SqrtForm, device_steps, from_sqrt_form, group_lr,
    host_or_device_sqrt, host_steps, min_from_sqrt_form, scale_over_denominator, sqrt_plus_eps, step_value,
    upcast, work_dtype,
)
from .adapters_torch_extra import AdadeltaAdapter, AdafactorAdapter, SparseAdamAdapter

__all__ = [
    "NotMapped",
    "OptimizerAdapter",
    "register_adapter",
    "find_adapter",
    "registered_adapters",
    "unregister_adapter",
    "step_value",
]

class AdamAdapter:
    """Adam and AdamW (for-loop, foreach and fused implementations).

    η_t = (lr / (1 − β1^t)) / (sqrt(v_t) / sqrt(1 − β2^t) + eps),

    with v = ``exp_avg_sq``, or ``max_exp_avg_sq`` when the group has ``amsgrad=True``. As in torch, AMSGrad's
    maximum is taken over the *uncorrected* second moments, before the bias correction 1 − β2^t is applied.
    Adam's ``weight_decay`` is coupled (g = ∇f + λ·x); AdamW's (or ``decoupled_weight_decay=True``) is not part
    of g.
    """

    scalars_by_step = True

    def effective_stepsizes(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[Tensor]:
        vs, scalars = self.sqrt_form(group, states)
        return from_sqrt_form(vs, scalars)

    def min_effective_stepsize(self, group: dict[str, Any], states: Sequence[dict[str, Any]], dtype: torch.dtype) -> Tensor:
        """min_j η_j = min_i s_i / (sqrt(max_j v_ij) + e_i): η is decreasing in v, so one read-only max pass
        over v gives the same value as the min over η, without a full-size copy."""
        return min_from_sqrt_form(*self.sqrt_form(group, states), dtype)

    def sqrt_form(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> SqrtForm:
        """η = s / (sqrt(v) + e) with s = lr·sqrt(1 − β2^t)/(1 − β1^t), e = eps·sqrt(1 − β2^t) (same η as above)."""
        beta1, beta2 = float(group["betas"][0]), float(group["betas"][1])
        lr, eps = group_lr(group), float(group["eps"])
        key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
        steps = device_steps(states)
        if steps is not None:  # fused / capturable: all parameters at once, on the device
            root = (1 - torch.pow(beta2, steps)).sqrt()
            return [s[key] for s in states], ScalarTable(torch.stack([lr * root / (1 - torch.pow(beta1, steps)), eps * root], 1))
        values = host_steps(states)
        if values is not None and isinstance(lr, float):  # the common case: one computation per distinct t
            pairs: dict[float, tuple[Scalar, Scalar]] = {}
            for step in set(values):
                host_root = math.sqrt(1 - beta2**step)
                pairs[step] = (lr * host_root / (1 - beta1**step), eps * host_root)
            return list(map(operator.itemgetter(key), states)), list(map(pairs.__getitem__, values))
        scalars = []
        by_step: dict[float, tuple[Scalar, Scalar]] = {}  # host step counts: one computation per distinct t
        for s in states:
            t = step_value(s)
            pair = by_step.get(t) if isinstance(t, float) else None
            if pair is None:
                root = host_or_device_sqrt(1 - beta2**t)  # type: ignore[assignment]
                pair = (lr * root / (1 - beta1**t), eps * root)
                if isinstance(t, float):
                    by_step[t] = pair
            scalars.append(pair)
        return [s[key] for s in states], scalars

    def second_moment_update(self, group: dict[str, Any]) -> tuple[float, float] | None:
        """v_t = β2·v_{t−1} + (1 − β2)·g_t²; None for AMSGrad (a running max cannot be undone) or β2 = 0."""
        beta2 = float(group["betas"][1])
        if group.get("amsgrad", False) or beta2 == 0.0:
            return None
        return beta2, 1.0 - beta2

    def coupled_weight_decay(self, group: dict[str, Any]) -> float:
        if group.get("decoupled_weight_decay", False):
            return 0.0
        return float(group.get("weight_decay", 0.0))

    def enable_amsgrad(self, optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> None:
        """Switch ``group`` to AMSGrad in place: ``group["amsgrad"] = True`` and, for every parameter with state,
        ``max_exp_avg_sq = exp_avg_sq.clone()``.

        The next step is then exactly the step ``torch.optim.Adam(amsgrad=True)`` takes from this state:
        v̂_{t+1} = max(v_t, v_{t+1}). Seeding the maximum with the current v_t (rather than torch's zeros at
        initialisation) makes v̂ non-decreasing from the switch on, the property AMSGrad's guarantee rests on, and
        it costs nothing in the first step: the optimizer's own ``max`` takes over from there. Parameters without
        state yet get their zeros from torch at their first step, as in a fresh AMSGrad.
        """
        for p in group["params"]:
            st = optimizer.state.get(p)
            if st and "exp_avg_sq" in st and "max_exp_avg_sq" not in st:
                st["max_exp_avg_sq"] = st["exp_avg_sq"].clone(memory_format=torch.preserve_format)
        group["amsgrad"] = True


class AdamWAdapter(AdamAdapter):
    """AdamW: Adam's effective stepsize; its decoupled weight decay is not part of g."""

    def coupled_weight_decay(self, group: dict[str, Any]) -> float:
        return 0.0


class AdagradAdapter:
    """Adagrad: η_t = (lr / (1 + (t − 1)·lr_decay)) / (sqrt(sum_t) + eps), with ``sum_t`` = Σ_s g_s².

    In the template v̂_t = (1/t) Σ g_s² and α_t = lr/√t give the same η_t (for lr_decay = 0); weight decay is
    coupled (g = ∇f + λ·x).
    """

    scalars_by_step = True

    def effective_stepsizes(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[Tensor]:
        vs, scalars = self.sqrt_form(group, states)
        return from_sqrt_form(vs, scalars)

    def min_effective_stepsize(self, group: dict[str, Any], states: Sequence[dict[str, Any]], dtype: torch.dtype) -> Tensor:
        """min_j η_j = min_i s_i / (sqrt(max_j sum_ij) + eps): one read-only max pass over ``sum``, no copy."""
        return min_from_sqrt_form(*self.sqrt_form(group, states), dtype)

    def sqrt_form(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> SqrtForm:
        """η = s / (sqrt(sum) + e) with s = lr / (1 + (t − 1)·lr_decay), e = eps."""
        lr, lr_decay, eps = group_lr(group), float(group["lr_decay"]), float(group["eps"])
        return [s["sum"] for s in states], [(lr / (1 + (step_value(s) - 1) * lr_decay), eps) for s in states]

    def second_moment_update(self, group: dict[str, Any]) -> tuple[float, float] | None:
        """sum_t = sum_{t−1} + g_t²."""
        return 1.0, 1.0

    def coupled_weight_decay(self, group: dict[str, Any]) -> float:
        return float(group.get("weight_decay", 0.0))


class RMSpropAdapter:
    """RMSprop: η_t = lr / ((1 − μ) · (sqrt(v_t) + eps)), v = ``square_avg`` (centered: square_avg − grad_avg²).

    Without momentum (μ = 0) this is exactly torch's step x ← x − η ⊙ g. With momentum torch keeps a heavy-ball
    buffer of *normalised* gradients, buf_t = μ·buf_{t−1} + g_t / (sqrt(v_t) + eps), and steps x ← x − lr·buf.
    A gradient's total weight in the steps that follow is lr / (1 − μ), which is the template's α_t/sqrt(v̂_t)
    with m_t the EMA of g (weight 1 − μ) — hence the factor 1/(1 − μ).
    """

    scalars_by_step = True

    def effective_stepsizes(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[Tensor]:
        form = self.sqrt_form(group, states)
        if form is not None:
            return from_sqrt_form(*form)
        lr, momentum = group_lr(group), float(group.get("momentum", 0.0))
        if group.get("centered", False):
            second = [
                torch.addcmul(sa.to(work_dtype(sa)), ga.to(work_dtype(ga)), ga.to(work_dtype(ga)), value=-1)
                for sa, ga in ((s["square_avg"], s["grad_avg"]) for s in states)
            ]
        else:
            second = [s["square_avg"] for s in states]
        denominators = sqrt_plus_eps(second, group["eps"])
        return scale_over_denominator([lr / (1 - momentum)] * len(states), denominators)

    def min_effective_stepsize(
        self, group: dict[str, Any], states: Sequence[dict[str, Any]], dtype: torch.dtype
    ) -> Tensor | None:
        """min_j η_j from one max pass over ``square_avg`` (not centered); None when centered."""
        form = self.sqrt_form(group, states)
        return None if form is None else min_from_sqrt_form(*form, dtype)

    def sqrt_form(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> SqrtForm | None:
        """η = s / (sqrt(square_avg) + e) with s = lr / (1 − μ), e = eps; None when centered (v is a difference)."""
        if group.get("centered", False):
            return None
        scale = group_lr(group) / (1 - float(group.get("momentum", 0.0)))
        return [s["square_avg"] for s in states], [(scale, float(group["eps"]))] * len(states)

    def second_moment_update(self, group: dict[str, Any]) -> tuple[float, float] | None:
        """v_t = α·v_{t−1} + (1 − α)·g_t²; None for α = 0 or centered."""
        alpha = float(group["alpha"])
        if group.get("centered", False) or alpha == 0.0:
            return None
        return alpha, 1.0 - alpha

    def activity(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[Tensor]:
        """``square_avg`` (> 0 exactly where a coordinate has had a non-zero gradient; also when centered)."""
        return [s["square_avg"] for s in states]

    def coupled_weight_decay(self, group: dict[str, Any]) -> float:
        return float(group.get("weight_decay", 0.0))


class SGDAdapter:
    """SGD: v̂ = 1, so η_t = lr for every coordinate; with momentum η_t = lr·(1 − dampening) / (1 − μ).

    Heavy ball with dampening d keeps buf_t = μ·buf_{t−1} + (1 − d)·g_t = (1 − d)/(1 − μ) · m_t with m_t the
    EMA of g (β1 = μ; torch seeds buf_1 = g_1). Nesterov steps with g_t + μ·buf_t; a gradient's total weight
    over the following steps is again lr/(1 − μ) (Nesterov requires d = 0). Weight decay is coupled.
    """

    def effective_stepsizes(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[Tensor]:
        raise NotImplementedError  # SGD has no per-coordinate state: see ``uniform_stepsize``.

    def consumed_gradients(self, group: dict[str, Any], states: Sequence[dict[str, Any]], grads: list[Tensor]) -> list[Tensor]:
        """The gradients SGD consumed: its multi-tensor Nesterov step (no maximize, no weight decay) adds μ·buf_t
        into ``p.grad`` in place, so g_t = p.grad − μ·buf_t there; every other variant leaves ``p.grad`` alone."""
        momentum = float(group.get("momentum", 0.0))
        if not group.get("nesterov", False) or momentum == 0.0 or group.get("maximize", False) or group.get("fused"):
            return grads
        if float(group.get("weight_decay", 0.0)) != 0.0:
            return grads
        foreach = group.get("foreach")
        if foreach is None:
            from torch.optim.optimizer import _default_to_fused_or_foreach

            foreach = _default_to_fused_or_foreach(list(group["params"]), differentiable=False, use_fused=False)[1]
        if not foreach:
            return grads
        bufs = [s.get("momentum_buffer") for s in states]
        if any(b is None for b in bufs):
            return grads
        return list(torch._foreach_add(grads, bufs, alpha=-momentum))  # type: ignore[arg-type]

    def uniform_stepsize(self, group: dict[str, Any]) -> Scalar:
        """The single η_t shared by every coordinate of the group."""
        momentum = float(group.get("momentum", 0.0))
        lr = group_lr(group)
        if momentum == 0.0:
            return lr
        return lr * (1 - float(group.get("dampening", 0.0))) / (1 - momentum)

    def coupled_weight_decay(self, group: dict[str, Any]) -> float:
        return float(group.get("weight_decay", 0.0))


class AdamaxAdapter:
    """Adamax: η_t = (lr / (1 − β1^t)) / u_t with u_t = ``exp_inf`` = max(β2·u_{t−1}, |g_t| + eps).

    The infinity-norm moment replaces sqrt(v̂_t) (eps sits inside the max, as in torch). Weight decay is coupled.
    """

    def effective_stepsizes(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[Tensor]:
        beta1 = float(group["betas"][0])
        lr = group_lr(group)
        steps = [step_value(s) for s in states]
        denominators = [t.clone() for t in upcast([s["exp_inf"] for s in states])]
        return scale_over_denominator([lr / (1 - beta1**t) for t in steps], denominators)

    def activity(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[Tensor]:
        """u − eps (u = ``exp_inf`` = max(β2·u, |g| + eps) is eps exactly until a first non-zero gradient)."""
        eps = float(group["eps"])
        return [s["exp_inf"] - eps for s in states]

    def coupled_weight_decay(self, group: dict[str, Any]) -> float:
        return float(group.get("weight_decay", 0.0))


class NAdamAdapter:
    """NAdam: η_t = lr·w_t / (sqrt(v_t / (1 − β2^t)) + eps), with

        μ_t = β1 (1 − ½·0.96^(tψ)),   Π_t = Π_{s≤t} μ_s (``mu_product``),
        w_t = (1 − μ_t)/(1 − Π_t) + μ_{t+1}/(1 − Π_t μ_{t+1}).

    torch steps x ← x − lr/(…)·[(1 − μ_t)/(1 − Π_t)·g_t + μ_{t+1}/(1 − Π_t μ_{t+1})·m_t]; the bracket is the
    Nesterov-corrected momentum, a weighted mix of g_t and the EMA m_t with total weight w_t (→ 1 as t grows,
    larger early on, like Adam's bias correction). The template's m is that mix normalised to weight 1, so
    η_t carries w_t. Weight decay is coupled unless ``decoupled_weight_decay=True``.
    """

    def effective_stepsizes(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[Tensor]:
        return from_sqrt_form(*self.sqrt_form(group, states))

    def sqrt_form(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> SqrtForm:
        """η = s / (sqrt(v) + e) with s = lr·w_t·sqrt(1 − β2^t), e = eps·sqrt(1 − β2^t) (the same η as above; w_t
        depends on the parameter's own ``mu_product``, so the (s, e) are computed per parameter)."""
        beta1, beta2 = (float(b) for b in group["betas"])
        psi, eps = float(group["momentum_decay"]), float(group["eps"])
        lr = group_lr(group)
        scalars: list[tuple[Scalar, Scalar]] = []
        for s in states:
            t = step_value(s)
            prod = s["mu_product"]
            prod = float(prod) if not isinstance(prod, Tensor) or prod.device.type == "cpu" else prod
            mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * psi))
            mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi))
            root = host_or_device_sqrt(1 - beta2**t)
            scalars.append((lr * ((1 - mu) / (1 - prod) + mu_next / (1 - prod * mu_next)) * root, eps * root))
        return [s["exp_avg_sq"] for s in states], scalars

    def activity(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[Tensor]:
        """v = ``exp_avg_sq``: > 0 exactly where a coordinate has had a non-zero gradient."""
        return [s["exp_avg_sq"] for s in states]

    def coupled_weight_decay(self, group: dict[str, Any]) -> float:
        if group.get("decoupled_weight_decay", False):
            return 0.0
        return float(group.get("weight_decay", 0.0))


class RAdamAdapter:
    """RAdam: alternates between rectified adaptive steps and un-adapted (SGD-with-momentum) steps.

        ρ_∞ = 2/(1 − β2) − 1,   ρ_t = ρ_∞ − 2tβ2^t/(1 − β2^t),
        ρ_t > 5:  η_t = (lr/(1 − β1^t)) · r_t · sqrt(1 − β2^t) / (sqrt(v_t) + eps),
                  r_t = sqrt((ρ_t − 4)(ρ_t − 2)ρ_∞ / ((ρ_∞ − 4)(ρ_∞ − 2)ρ_t)),
        else:     η_t = lr/(1 − β1^t)  (every coordinate; v̂ = 1).

    Note torch's eps placement: outside the square root of the *uncorrected* v. Weight decay is coupled unless
    ``decoupled_weight_decay=True``. On CPU-stepped optimizers the branch is taken on the host; for device step
    counters both branches are computed and selected with ``torch.where`` (no synchronisation).
    """

    def effective_stepsizes(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[Tensor]:
        beta1, beta2 = (float(b) for b in group["betas"])
        lr = group_lr(group)
        rho_inf = 2 / (1 - beta2) - 1
        out: list[Tensor] = []
        for s in states:
            t = step_value(s)
            v = s["exp_avg_sq"]
            bc1, bc2 = 1 - beta1**t, 1 - beta2**t
            rho_t = rho_inf - 2 * t * beta2**t / bc2
            plain = lr / bc1
            if isinstance(rho_t, float):
                if rho_t > 5.0:
                    rect = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
                    eta = v.to(work_dtype(v)).sqrt().add_(group["eps"]).reciprocal_().mul_(plain * rect * math.sqrt(bc2))
                else:
                    eta = torch.full_like(v, plain, dtype=work_dtype(v))  # type: ignore[arg-type]
            else:
                rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)).clamp_min(0).sqrt()  # type: ignore[assignment]
                adaptive = v.to(work_dtype(v)).sqrt().add_(group["eps"]).reciprocal_().mul_(plain * rect * bc2.sqrt())
                eta = torch.where(rho_t > 5.0, adaptive, plain.to(adaptive.dtype).expand_as(adaptive))
            out.append(eta)
        return out

    def activity(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[Tensor]:
        """v = ``exp_avg_sq``: > 0 exactly where a coordinate has had a non-zero gradient."""
        return [s["exp_avg_sq"] for s in states]

    def coupled_weight_decay(self, group: dict[str, Any]) -> float:
        if group.get("decoupled_weight_decay", False):
            return 0.0
        return float(group.get("weight_decay", 0.0))


_REGISTRY: dict[type, OptimizerAdapter] = {}



def register_adapter(optimizer_cls: type, adapter: OptimizerAdapter) -> None:
    """Register ``adapter`` for ``optimizer_cls`` and its subclasses (a later registration replaces an earlier).

    An adapter provides ``effective_stepsizes(group, states) -> list[Tensor]`` (η_t per parameter, read after the
    step) and ``coupled_weight_decay(group) -> float``; see :class:`OptimizerAdapter`. Adapters that give every
    coordinate the same η may instead provide ``uniform_stepsize(group)`` (see :class:`SGDAdapter`).
    """
    if not isinstance(optimizer_cls, type):
        raise TypeError(f"register_adapter expects an optimizer class, got {optimizer_cls!r}; pass e.g. torch.optim.Adam")
    for attr in ("coupled_weight_decay",):
        if not callable(getattr(adapter, attr, None)):
            raise TypeError(f"adapter {adapter!r} has no method {attr}(group); see lightning_adamtype.OptimizerAdapter")
    if not callable(getattr(adapter, "effective_stepsizes", None)) and not callable(getattr(adapter, "uniform_stepsize", None)):
        raise TypeError(
            f"adapter {adapter!r} needs effective_stepsizes(group, states) or uniform_stepsize(group); "
            "see lightning_adamtype.OptimizerAdapter"
        )
    _REGISTRY[optimizer_cls] = adapter


def unregister_adapter(optimizer_cls: type) -> OptimizerAdapter | None:
    """Remove the adapter registered for exactly ``optimizer_cls`` (its subclasses then fall back to their nearest
    registered base class); returns the removed adapter, or None when there was none."""
    return _REGISTRY.pop(optimizer_cls, None)


def find_adapter(optimizer: torch.optim.Optimizer) -> OptimizerAdapter | None:
    """The adapter registered for the optimizer's class or for its nearest registered base class when no class in
    between overrides ``step`` (a subclass that changes the update is not its parent's algorithm), else None."""
    return adapter_lookup(optimizer)[0]


def adapter_lookup(optimizer: torch.optim.Optimizer) -> tuple[OptimizerAdapter | None, str]:
    """(:func:`find_adapter`'s answer, why there is none: '' when there is one)."""
    mro = type(optimizer).__mro__
    for depth, cls in enumerate(mro):
        if cls not in _REGISTRY and cls in DECLINED:
            return None, f"{cls.__qualname__} is declined: {DECLINED[cls]}"
        if cls in _REGISTRY:
            # (torch wraps a class's step in place for its profiler hooks: compare the functions underneath)
            base_step = inspect.unwrap(getattr(cls, "step"))
            overriding = [
                c.__qualname__ for c in mro[:depth] if "step" in vars(c) and inspect.unwrap(vars(c)["step"]) is not base_step
            ]
            if overriding:
                return None, (
                    f"it subclasses {cls.__qualname__} but {overriding[0]} overrides step(), so its update may not be "
                    f"{cls.__qualname__}'s; if it is, say so with register_adapter({type(optimizer).__qualname__}, "
                    f"lightning_adamtype.find_adapter({cls.__qualname__}(...)))"
                )
            return _REGISTRY[cls], ""
    known = third_party.lookup(type(optimizer))
    if known is not None:
        return known
    return None, "no adapter is registered for it or a base class"


class AdapterError(ValueError):
    """An adapter returned effective stepsizes that cannot be trusted (see :func:`validate_first_step`)."""


def validate_first_step(adapter: Any, step: Any) -> str | None:
    """What is wrong with the η_t an adapter gives for a group's first observed step, or None when nothing is.

    ``step`` is the tracker's :class:`~lightning_adamtype.backends.GroupStep` (group, params, grads, and what the
    adapter gave: ``uniform``, ``form`` or the ``effective_stepsizes`` call). η_t must be, per parameter p_i, a
    floating-point tensor of p_i's shape with finite entries η_ij ≥ 0 (η = s/(sqrt(v) + e) from a square-root form);
    a ``uniform_stepsize`` must be one finite number ≥ 0. ``effective_stepsizes`` is called once here and its
    answer handed on to the backend (``step.effective_stepsizes`` then returns it), so the adapter runs once per step
    as always. Non-finite η is not blamed on the adapter when a gradient of the step is itself non-finite (the tracker
    counts such steps under ``nonfinite_steps``)."""
    name = type(adapter).__qualname__
    if step.uniform is not None:
        return _uniform_problem(name, step.uniform)
    params = step.params
    if step.form is not None:
        shapes = [tuple(v.shape) for v in step.form[0]]
        if len(shapes) != len(params) or any(s != tuple(p.shape) for s, p in zip(shapes, params)):
            return f"adapter {name}.sqrt_form returned v of shapes {shapes} for parameters of shapes {[tuple(p.shape) for p in params]}; return one v per parameter, shaped like it"
        return _stepsize_problem(f"adapter {name}.sqrt_form", from_sqrt_form(*step.form), params, step.grads)
    etas = step.effective_stepsizes()
    step.effective_stepsizes = lambda: etas
    return _stepsize_problem(f"adapter {name}.effective_stepsizes", etas, params, step.grads)


def _uniform_problem(name: str, eta: Any) -> str | None:
    value = eta.detach().reshape(-1) if isinstance(eta, Tensor) else eta
    if isinstance(value, Tensor) and (value.numel() != 1 or not value.is_floating_point()):
        return f"adapter {name}.uniform_stepsize returned a {value.dtype} tensor of {value.numel()} entries; return one float (η for every coordinate)"
    if not isinstance(value, (Tensor, float, int)):
        return f"adapter {name}.uniform_stepsize returned {type(eta).__name__}; return one float (η for every coordinate)"
    number = float(value)
    if not math.isfinite(number) or number < 0:
        return f"adapter {name}.uniform_stepsize returned η = {number}; η must be a finite number ≥ 0"
    return None


def _stepsize_problem(where: str, etas: Any, params: Sequence[Tensor], grads: Sequence[Tensor] | None) -> str | None:
    """The first thing wrong with per-parameter η tensors (see :func:`validate_first_step`), or None: the shapes and
    dtypes from metadata, the values from one host read of a small flag tensor (a failure reads a little more)."""
    if not isinstance(etas, (list, tuple)) or len(etas) != len(params):
        got = f"{len(etas)} items" if isinstance(etas, (list, tuple)) else type(etas).__name__
        return f"{where} returned {got} for {len(params)} parameters; return a list with one tensor per parameter"
    for i, (eta, p) in enumerate(zip(etas, params)):
        if not isinstance(eta, Tensor):
            return f"{where} returned a {type(eta).__name__} for parameter {i}; return a tensor shaped like the parameter"
        if not eta.is_floating_point():
            return f"{where} returned a {eta.dtype} tensor for parameter {i}; η must be floating point (float32 or wider)"
        if eta.shape != p.shape:
            return f"{where} returned η of shape {tuple(eta.shape)} for parameter {i} of shape {tuple(p.shape)}; return η shaped like the parameter"
    if not etas:
        return None
    device = etas[0].device
    finite = [torch.isfinite(e).all().to(device) for e in etas]
    nonnegative = [(e >= 0).logical_or_(e.isnan()).all().to(device) for e in etas]
    grads_finite = [torch.isfinite(g).all().to(device) for g in grads or []] or [torch.ones((), dtype=torch.bool, device=device)]
    flags = torch.stack([torch.stack(finite), torch.stack(nonnegative)]).tolist()  # the one host read
    if not all(flags[0]) and bool(torch.stack(grads_finite).all()):
        i = flags[0].index(False)
        bad = etas[i][~torch.isfinite(etas[i])].reshape(-1)[0].item()
        return f"{where} returned a non-finite η ({bad}) for parameter {i} while the gradients are finite; check its formula (a division by zero?)"
    if not all(flags[1]):
        i = flags[1].index(False)
        return f"{where} returned a negative η ({etas[i].min().item()}) for parameter {i}; η_t = α_t/sqrt(v̂_t) is ≥ 0 (put maximize's sign into g, not η)"
    return None


def registered_adapters() -> dict[type, OptimizerAdapter]:
    """A copy of the registry (optimizer class → adapter)."""
    return dict(_REGISTRY)


#: torch optimizers that are deliberately not mapped onto the template, and why (``adapter_lookup`` reports it; a
#: :func:`register_adapter` for the class or a subclass takes precedence)
DECLINED: dict[type, str] = {
    torch.optim.LBFGS: "not a diagonal Adam-type method (a quasi-Newton step along a low-rank curvature estimate, "
    "with line search and several gradient evaluations per step)",
    torch.optim.Rprop: "not a diagonal Adam-type method in the paper's sense: it steps x ← x − s_t·sign(g_t), a "
    "multiple of sign(g) rather than of g; written as η_t = s_t/|g_t| the stepsize is unbounded as g → 0 and is "
    "made of the current gradient's noise, so a and c would measure |g_t|, not the method",
    torch.optim.ASGD: "the stepsize it applies at step t is the 'eta' its state held before the step (computed "
    "from the previous step's lr); after the step the state holds the next step's, so under an lr schedule η_t "
    "cannot be read from the post-step state an adapter sees (with a constant lr it is lr/(1 + λ·lr·(t − 1))^α "
    "for every coordinate: register a uniform_stepsize adapter for that case yourself)",
}
if hasattr(torch.optim, "Muon"):  # torch ≥ 2.9
    DECLINED[torch.optim.Muon] = (
        "not a diagonal Adam-type method (its update is the Newton–Schulz orthogonalised momentum matrix, not a "
        "per-coordinate multiple of the gradient)"
    )


_BUILTIN: list[tuple[type, Callable[[], OptimizerAdapter]]] = [
    (torch.optim.Adam, AdamAdapter),
    (torch.optim.AdamW, AdamWAdapter),
    (torch.optim.Adagrad, AdagradAdapter),
    (torch.optim.RMSprop, RMSpropAdapter),
    (torch.optim.SGD, SGDAdapter),
    (torch.optim.Adamax, AdamaxAdapter),
    (torch.optim.NAdam, NAdamAdapter),
    (torch.optim.RAdam, RAdamAdapter),
    (torch.optim.Adadelta, AdadeltaAdapter),
    (torch.optim.SparseAdam, SparseAdamAdapter),
]
if hasattr(torch.optim, "Adafactor"):  # torch ≥ 2.5
    _BUILTIN.append((torch.optim.Adafactor, AdafactorAdapter))
for _cls, _factory in _BUILTIN:
    register_adapter(_cls, _factory())
