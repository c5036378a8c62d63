"""Adapters for optimizers of other packages (timm, transformers, schedulefree, pytorch-optimizer, bitsandbytes).

None of those packages is a dependency: an optimizer class is recognised by its module and qualified name (walking
its MRO), and nothing here imports them. Each adapter maps the package's own update onto the paper's template
x_{t+1} = x_t − η_t ⊙ m_t, η_t = α_t / sqrt(v̂_t), reading the state the package keeps after its step; where the
update is not a per-coordinate multiple of a moment, or the state does not hold what η needs, the class is declined
with the reason (the tracker warns once and the optimizer trains untouched). The mapping of every class is in the
README, "Optimizers from other packages".

An option of a mapped class that changes the update beyond the mapping (a cautious mask, rectification, ...) makes
``effective_stepsizes`` raise ``ValueError`` naming the option: the tracker then warns once and stops measuring that
group, and training goes on untouched.
"""

from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor

from .adapter_kit import NotMapped
from .adapters_torch_extra import StepGradients

if TYPE_CHECKING:
    from .adapter_kit import OptimizerAdapter

__all__ = ["lookup", "known_classes"]


def _num(x: Any) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _f(t: Tensor) -> Tensor:
    """A float32-or-wider working copy (bf16/fp16 state is upcast; the optimizer's tensor is never written)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _refuse(cls_name: str, group: dict[str, Any], options: Sequence[tuple[str, str]]) -> None:
    """Raise ValueError when ``group`` sets one of ``options`` ((key, why it is not mapped)) to a true value."""
    for key, why in options:
        if group.get(key):
            raise NotMapped(
                f"{cls_name} with {key}={group[key]!r} is not mapped onto the template ({why}); "
                f"set {key} to its default to measure this group, or register your own adapter with register_adapter"
            )


def _adam_eta(v: Tensor, step_size: float, root: float, eps: float, eps_outside: bool) -> Tensor:
    """η = step_size / (sqrt(v)/root + eps) (eps after the correction), or step_size·root / (sqrt(v) + eps)
    (``eps_outside``: eps added to the uncorrected sqrt(v), as pytorch-optimizer does)."""
    out = _f(v).sqrt()
    if eps_outside:
        return out.add_(eps).reciprocal_().mul_(step_size * root)
    return out.div_(root).add_(eps).reciprocal_().mul_(step_size)


def _positive(key: str) -> Callable[[dict[str, Any], Sequence[dict[str, Any]]], list[Tensor]]:
    def activity(group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[Tensor]:
        """The second moment ``state[key]``: > 0 exactly where a coordinate has had a non-zero gradient."""
        return [s[key] for s in states]

    return activity


class AdamLikeAdapter:
    """The Adam form of several packages' optimizers, per coordinate:

        η_t = (lr/(1 − β1^t)) / (sqrt(v_t)/sqrt(1 − β2^t) + eps)           (eps after the correction), or
        η_t = (lr/(1 − β1^t)) · sqrt(1 − β2^t) / (sqrt(v_t) + eps)         (``eps_outside``),

    with v = ``state[v_key]`` (``state[ams_key]`` when the group's ``ams_option`` is set), t = ``state["step"]``
    or, for pytorch-optimizer, ``group["step"]`` (one counter per group). ``coupled`` gives the λ the tracker adds as
    λ·x_t to ``p.grad`` (0 where the package already wrote it into ``p.grad``, or decouples it); ``refused`` lists
    options whose update is not this form."""

    def __init__(self, name: str, v_key: str = "exp_avg_sq", *, step_in_group: bool = False, eps_outside: bool = False,
                 ams: tuple[str, str] | None = None, coupled: Callable[[dict[str, Any]], float] | None = None,
                 refused: Sequence[tuple[str, str]] = (), active: bool = True) -> None:
        self.name, self.v_key, self.step_in_group, self.eps_outside = name, v_key, step_in_group, eps_outside
        self.ams, self.coupled, self.refused = ams, coupled, tuple(refused)
        if active:
            self.activity = _positive(v_key)

    def effective_stepsizes(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[Tensor]:
        """η_t per parameter (formula in the class docstring)."""
        _refuse(self.name, group, self.refused)
        beta1, beta2 = _num(group["betas"][0]), _num(group["betas"][1])
        lr, eps = _num(group["lr"]), _num(group["eps"])
        key = self.ams[1] if self.ams is not None and group.get(self.ams[0]) else self.v_key
        out = []
        for s in states:
            t = max(_num(group["step"] if self.step_in_group else s["step"]), 1.0)
            out.append(_adam_eta(s[key], lr / (1 - beta1**t), math.sqrt(1 - beta2**t), eps, self.eps_outside))
        return out

    def coupled_weight_decay(self, group: dict[str, Any]) -> float:
        """λ with g_t = p.grad + λ·x_t (see the class docstring)."""
        return 0.0 if self.coupled is None else self.coupled(group)


class LambAdapter:
    """pytorch-optimizer's ``Lamb``: x ← x − (lr/(1 − β1^t))·r·u with u = m/(sqrt(v) + eps) (+ λx when
    ``weight_decouple=False``) and the per-tensor trust ratio r = min(‖x‖, 10)/(‖u‖ + eps), which it keeps in
    ``state["trust_ratio"]`` (r = 1 with ``adam=True``). A per-tensor scalar on η is a per-coordinate multiple of m:

        η_t = (lr/(1 − β1^t)) · r_t / (sqrt(v_t) + eps)        (no bias correction of v, as in the package).

    λx in u is a decay term, not part of g. g_t = ``p.grad`` after the step (``pre_norm``'s global-norm scaling
    and ``maximize``'s sign are applied to it in place)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.activity = _positive("exp_avg_sq")

    def effective_stepsizes(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[Tensor]:
        """η_t per parameter (formula in the class docstring)."""
        _refuse(self.name, group, [("rectify", "its RAdam-style branch switches between two update forms"),
                                   ("adanorm", "AdaNorm rescales the gradient fed to m only")])
        if not group.get("grad_averaging", True):
            raise NotMapped(f"{self.name} with grad_averaging=False is not mapped (m is then a sum, not an EMA); "
                             "set grad_averaging=True to measure this group")
        beta1, lr, eps = _num(group["betas"][0]), _num(group["lr"]), _num(group["eps"])
        step_size = lr / (1 - beta1 ** max(_num(group["step"]), 1.0))
        out = []
        for s in states:
            ratio = 1.0 if group.get("adam") else s["trust_ratio"]
            eta = _f(s["exp_avg_sq"]).sqrt().add_(eps).reciprocal_().mul_(step_size)
            out.append(eta.mul_(ratio.to(eta.dtype)) if isinstance(ratio, Tensor) else eta.mul_(float(ratio)))
        return out

    def coupled_weight_decay(self, group: dict[str, Any]) -> float:
        """0: λ enters u, not g (decoupled); ``p.grad`` already is the consumed g."""
        return 0.0


class AdanAdapter:
    """pytorch-optimizer's ``Adan``: with g̃_t = g_t + β2(g_t − g_{t−1}),

        m_t = EMA_{β1}(g),  d_t = EMA_{β2}(g_t − g_{t−1}),  n_t = EMA_{β3}(g̃²),
        x ← x − lr·(m_t/(1 − β1^t) + β2·d_t/(1 − β2^t)) / (sqrt(n_t)/sqrt(1 − β3^t) + eps).

    The numerator is a weight-1 mix of past gradients (a Nesterov-style first moment, as NAdam's), so the template's
    m is that mix and η_t = lr / (sqrt(n_t)/sqrt(1 − β3^t) + eps). g_t is the clipped gradient it consumed, kept as
    −``state["previous_grad"]`` after the step (its per-parameter path leaves −g in ``p.grad``). Its proximal weight
    decay x/(1 + lr·λ) and decoupled decay are not part of g."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.activity = _positive("exp_avg_sq")

    def effective_stepsizes(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[Tensor]:
        """η_t per parameter (formula in the class docstring)."""
        _refuse(self.name, group, [("adanorm", "AdaNorm rescales the gradient fed to m only")])
        beta3, lr, eps = _num(group["betas"][2]), _num(group["lr"]), _num(group["eps"])
        root = math.sqrt(1 - beta3 ** max(_num(group["step"]), 1.0))
        return [_adam_eta(s["exp_avg_sq"], lr, root, eps, False) for s in states]

    def consumed_gradients(self, group: dict[str, Any], states: Sequence[dict[str, Any]], grads: list[Tensor]) -> list[Tensor]:
        """g_t = −previous_grad (the clipped, maximize-signed gradient of this step)."""
        return [-s["previous_grad"] for s in states]

    def coupled_weight_decay(self, group: dict[str, Any]) -> float:
        """0: Adan's weight decay (proximal or decoupled) is not added to the gradient."""
        return 0.0


class LaPropAdapter:
    """timm's ``LaProp``: the momentum averages *normalised* gradients,

        v_t = EMA_{β2}(g²),  m_t = β1·m_{t−1} + (1 − β1)·lr_t·g_t/(sqrt(v_t/(1 − β2^t)) + eps),
        x ← x − m_t / Σ_s (1 − β1)β1^{t−s} lr_s,

    so the step is a weighted mean of lr_t·g_s/(…) with weights summing to 1 — RMSprop with momentum, normalised.
    A gradient's stepsize is the one it gets when it enters the mean: η_t = lr_t / (sqrt(v_t/b_t) + eps), with
    b_t = ``state["exp_avg_lr_2"]`` = 1 − β2^t. Weight decay is decoupled (not part of g)."""

    name = "timm.optim.LaProp"

    def __init__(self) -> None:
        self.activity = _positive("exp_avg_sq")

    def effective_stepsizes(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[Tensor]:
        """η_t per parameter (formula in the class docstring)."""
        _refuse(self.name, group, [("caution", "its mask zeroes coordinates whose sign disagrees with g")])
        lr, eps = _num(group["lr"]), _num(group["eps"])
        return [_adam_eta(s["exp_avg_sq"], lr, math.sqrt(_num(s["exp_avg_lr_2"])), eps, False) for s in states]

    def coupled_weight_decay(self, group: dict[str, Any]) -> float:
        """0 (decoupled)."""
        return 0.0


class ScheduleFreeAdapter:
    """schedulefree's ``AdamWScheduleFree``: the base sequence z takes plain adaptive SGD steps,

        v_t = EMA_{β2}(g²),  z_{t+1} = z_t − lr_t·g_t/(sqrt(v_t/(1 − β2^k)) + eps),

    and the parameters are the interpolation y = (1 − β1)z + β1·x of z and its running average x (β1 is not a
    momentum EMA here: m_t = g_t). So η_t = lr_t / (sqrt(v_t/(1 − β2^k)) + eps), lr_t = ``group["scheduled_lr"]``
    (lr with its warm-up), k = ``group["k"]``. It divides ``p.grad`` by the denominator in place, so g_t =
    p.grad·(sqrt(v_t/(1 − β2^k)) + eps). With ``weight_decay`` it adds λy into ``p.grad`` too, which cannot be
    undone from the state: such groups are not measured."""

    name = "schedulefree.AdamWScheduleFree"

    def __init__(self) -> None:
        self.activity = _positive("exp_avg_sq")

    def _denominators(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[Tensor]:
        if _num(group.get("weight_decay", 0.0)) != 0.0:
            raise NotMapped(f"{self.name} with weight_decay != 0 is not mapped (it adds λ·y into p.grad after "
                             "dividing it, so g_t cannot be read back); set weight_decay=0 to measure this group")
        root = math.sqrt(1 - _num(group["betas"][1]) ** max(_num(group["k"]), 1.0))
        return [_f(s["exp_avg_sq"]).sqrt().div_(root).add_(_num(group["eps"])) for s in states]

    def effective_stepsizes(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[Tensor]:
        """η_t per parameter (formula in the class docstring)."""
        lr = _num(group["scheduled_lr"])
        return [d.reciprocal_().mul_(lr) for d in self._denominators(group, states)]

    def consumed_gradients(self, group: dict[str, Any], states: Sequence[dict[str, Any]], grads: list[Tensor]) -> list[Tensor]:
        """g_t = p.grad ⊙ (sqrt(v_t/(1 − β2^k)) + eps) (undoes the package's in-place division)."""
        return [_f(g) * d for g, d in zip(grads, self._denominators(group, states))]

    def coupled_weight_decay(self, group: dict[str, Any]) -> float:
        """0 (groups with weight decay are refused, see the class docstring)."""
        return 0.0


class RectifiedAdaBeliefAdapter(AdamLikeAdapter):
    """timm's ``AdaBelief`` (s = ``exp_avg_var``, max with ``amsgrad``): without ``rectify`` the Adam form
    (see :class:`AdamLikeAdapter`); with ``rectify`` (its default) RAdam's two branches, ρ_∞ = 2/(1 − β2) − 1,
    ρ_t = ρ_∞ − 2tβ2^t/(1 − β2^t):

        ρ_t ≥ 5:  η_t = (lr/(1 − β1^t))·sqrt((1 − β2^t)(ρ_t − 4)(ρ_t − 2)ρ_∞/((ρ_∞ − 4)(ρ_∞ − 2)ρ_t)) / (sqrt(s_t) + eps)
        else:     η_t = lr/(1 − β1^t) on every coordinate (``degenerated_to_sgd``), or 0 (no step) without it.

    Weight decay is coupled (g = ∇ + λx, not written into ``p.grad``) unless ``decoupled_decay``."""

    def effective_stepsizes(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[Tensor]:
        """η_t per parameter (formula in the class docstring)."""
        if not group.get("rectify"):
            return super().effective_stepsizes(group, states)
        beta1, beta2 = _num(group["betas"][0]), _num(group["betas"][1])
        lr, eps = _num(group["lr"]), _num(group["eps"])
        rho_inf = 2 / (1 - beta2) - 1
        out = []
        for s in states:
            t = max(_num(s["step"]), 1.0)
            rho = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
            v = s["max_exp_avg_var"] if group.get("amsgrad") else s["exp_avg_var"]
            if rho >= 5:
                rect = math.sqrt((1 - beta2**t) * (rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
                out.append(_f(v).sqrt().add_(eps).reciprocal_().mul_(lr * rect / (1 - beta1**t)))
            else:
                plain = lr / (1 - beta1**t) if group.get("degenerated_to_sgd", True) else 0.0
                out.append(torch.full_like(v, plain, dtype=_f(v).dtype))
        return out


#: a coordinate of transformers' Adafactor counts as active where its EMA exceeds eps[0] by this fraction of eps[0]
_HF_FLOOR_MARGIN = 2.0**-10


class HFAdafactorAdapter(StepGradients):
    """transformers' ``Adafactor`` (Shazeer & Stern 2018, fairseq's port). Per parameter, with t = ``state["step"]``
    (its own count of steps with a gradient), (ε1, ε2) = ``eps``, β̂2_t = 1 − t^decay_rate:

        ρ_t = lr (``relative_step=False``), else min(1e-6·t if ``warmup_init`` else 1e-2, 1/√t),
        α_t = ρ_t·max(ε2, RMS(x_t)) with ``scale_parameter`` (else α_t = ρ_t), RMS(x_t) = ``state["RMS"]``,
        V̂_t = R_t C_t / mean(R_t) (≥ 2-D; R, C = ``exp_avg_sq_row``/``_col``: EMAs of the row and column means
              of g² + ε1 over the last two dimensions), V̂_t = ``exp_avg_sq`` (1-D: the EMA of g² + ε1),
        U_t = g_t/√V̂_t,  d_t = max(1, RMS(U_t)/clip_threshold),  x_{t+1} = x_t − λ·α_t·x_t − (α_t/d_t)·U_t,

    so η_t = α_t / (d_t·√V̂_t). ε1 sits inside V̂ (added to g²), ε2 floors RMS(x_t), which the package stores
    before its update. The weight decay λ·α_t·x_t (on x_t, times α_t) is decoupled: not part of g. d_t needs this
    step's g, taken from ``consumed_gradients`` as torch's Adafactor adapter does (weak references only).

    ``beta1``: the package keeps m̃_t = β1·m̃_{t−1} + (1 − β1)·(α_t/d_t)·U_t and steps x ← x − m̃_t, an EMA of the
    *normalised update* (as LaProp's momentum, or RMSprop's heavy-ball buffer). g_t's total weight in the steps that
    follow is Σ_k (1 − β1)β1^k·α_t/(d_t√V̂_t) = η_t: the same η (RMSprop's buffer weights μ^k sum to 1/(1 − μ),
    hence its lr/(1 − μ); these EMA weights sum to 1). The template's m_t = EMA(g) with one η_t on the whole mean
    is this when η is steady; η_s entering at its own step is what the package does, as for LaProp.
    """

    name = "transformers.Adafactor"

    def effective_stepsizes(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[Tensor]:
        """η_t = α_t / (d_t·√V̂_t) per parameter (class docstring); d_t from this step's g."""
        clip = _num(group["clip_threshold"])
        out = []
        for st in states:
            inverse_root = self._inverse_root(st)
            grad = _f(self._grad_of(st, self.name)[0])
            n = max(grad.numel(), 1)
            denom = (inverse_root * grad).norm().div_(math.sqrt(n) * clip).clamp_(min=1.0)
            out.append(inverse_root.mul_(self._alpha(group, st) / denom))
        return out

    @staticmethod
    def _alpha(group: dict[str, Any], state: dict[str, Any]) -> float | Tensor:
        """α_t = ρ_t·max(ε2, RMS(x_t)) (``scale_parameter``), else ρ_t; ρ_t = lr, or the relative step."""
        t = max(_num(state["step"]), 1.0)
        rho = _num(group["lr"]) if not group["relative_step"] else min(
            1e-6 * t if group["warmup_init"] else 1e-2, 1.0 / math.sqrt(t))
        if not group["scale_parameter"]:
            return rho
        rms, eps2 = state["RMS"], _num(group["eps"][1])
        return _f(rms).clamp(min=eps2).mul_(rho) if isinstance(rms, Tensor) else rho * max(eps2, float(rms))

    @staticmethod
    def _inverse_root(state: dict[str, Any]) -> Tensor:
        """1/√V̂_t with the package's own operations (a fresh tensor): rsqrt(R/mean(R)) ⊗ rsqrt(C), or rsqrt(v)."""
        if "exp_avg_sq_row" in state:
            row, col = _f(state["exp_avg_sq_row"]), _f(state["exp_avg_sq_col"])
            return (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1) * col.unsqueeze(-2).rsqrt()
        return _f(state["exp_avg_sq"]).rsqrt()

    def activity(self, group: dict[str, Any], states: Sequence[dict[str, Any]]) -> list[Tensor]:
        """1 where the coordinate (≥ 2-D: its row and its column) has had g² above the floor ε1 the package adds,
        i.e. where its EMA of g² + ε1 exceeds ε1·(1 + 2^−10) (a margin that float rounding of a constant ε1 does not
        reach); 0 elsewhere."""
        floor = _num(group["eps"][0]) * (1.0 + _HF_FLOOR_MARGIN)
        out = []
        for st in states:
            if "exp_avg_sq_row" in st:
                row, col = _f(st["exp_avg_sq_row"]), _f(st["exp_avg_sq_col"])
                out.append(((row > floor).unsqueeze(-1) & (col > floor).unsqueeze(-2)).to(row.dtype))
            else:
                v = _f(st["exp_avg_sq"])
                out.append((v > floor).to(v.dtype))
        return out

    def coupled_weight_decay(self, group: dict[str, Any]) -> float:
        """0: its weight decay λ·α_t·x_t is decoupled (not added to g)."""
        return 0.0


def _coupled_unless(flag: str, default: bool = False) -> Callable[[dict[str, Any]], float]:
    """λ = group["weight_decay"] unless ``group[flag]`` (decoupled decay) is set."""
    return lambda group: 0.0 if group.get(flag, default) else _num(group.get("weight_decay", 0.0))


def _adamp_correction(group: dict[str, Any]) -> float:
    """pytorch-optimizer's AdamP with ``weight_decouple=False`` adds λ·x_t into ``p.grad`` *after* its moments took
    the gradient, so the consumed g is p.grad − λ·x_t: −λ (the tracker adds −λ·x_t to p.grad)."""
    if group.get("weight_decouple", True):
        return 0.0
    return -_num(group.get("weight_decay", 0.0))


_CAUTION = ("caution", "its mask zeroes coordinates whose update disagrees in sign with g and rescales the rest")
_CAUTIOUS = ("cautious", _CAUTION[1])
_PROJECTION = (
    "η is the stepsize before its projection: for a weight whose gradient is nearly orthogonal to it, AdamP removes "
    "the radial component of the update (per channel or per tensor), which is not a per-coordinate stepsize and "
    "only shortens the step; b is measured on the unprojected step"
)

_MAPPED: dict[tuple[str, str], Callable[[], OptimizerAdapter]] = {
    ("timm.optim.adamp", "AdamP"): lambda: AdamLikeAdapter("timm.optim.AdamP", refused=[_CAUTION]),
    ("timm.optim.nadamw", "NAdamW"): lambda: AdamLikeAdapter(
        "timm.optim.NAdamW", refused=[_CAUTION, ("clipping_threshold", "it clips the denominator by the RMS of g/…")]
    ),
    ("timm.optim.adabelief", "AdaBelief"): lambda: RectifiedAdaBeliefAdapter(
        "timm.optim.AdaBelief", "exp_avg_var", ams=("amsgrad", "max_exp_avg_var"),
        coupled=_coupled_unless("decoupled_decay"), active=False,
    ),
    ("timm.optim.laprop", "LaProp"): LaPropAdapter,
    ("pytorch_optimizer.optimizer.adamp", "AdamP"): lambda: AdamLikeAdapter(
        "pytorch_optimizer.AdamP", step_in_group=True, eps_outside=True, coupled=_adamp_correction,
        refused=[_CAUTIOUS, ("adanorm", "AdaNorm rescales the gradient fed to m only"),
                 ("adam_debias", "it drops the 1/(1 − β1^t) of the step")],
    ),
    ("pytorch_optimizer.optimizer.adabelief", "AdaBelief"): lambda: AdamLikeAdapter(
        "pytorch_optimizer.AdaBelief", "exp_avg_var", step_in_group=True, ams=("ams_bound", "max_exp_avg_var"),
        active=False, refused=[("rectify", "its RAdam-style branch switches between two update forms"),
                               ("adanorm", "AdaNorm rescales the gradient fed to m only"),
                               ("adam_debias", "it drops the 1/(1 − β1^t) of the step")],
    ),
    ("pytorch_optimizer.optimizer.lamb", "Lamb"): lambda: LambAdapter("pytorch_optimizer.Lamb"),
    ("pytorch_optimizer.optimizer.adan", "Adan"): lambda: AdanAdapter("pytorch_optimizer.Adan"),
    ("schedulefree.adamw_schedulefree", "AdamWScheduleFree"): ScheduleFreeAdapter,
    ("transformers.optimization", "Adafactor"): HFAdafactorAdapter,
}

_BNB = ("needs CUDA, not yet mapped: bitsandbytes keeps its moments block-quantized to 8 bits (state1/state2 with "
        "per-block absmax and a code table) and steps on CUDA only; dequantizing them honestly is not implemented")
_DECLINED: dict[tuple[str, str], str] = {
    ("timm.optim.lamb", "Lamb"): (
        "its trust ratio ‖x_t‖/‖u_t‖ (a per-tensor factor on η) and its global gradient-norm clip (max_grad_norm, a "
        "factor on g from all groups' gradients) are computed inside step() and kept nowhere, so η_t and g_t cannot be "
        "read after the step; pytorch-optimizer's Lamb keeps the trust ratio and is mapped"
    ),
    ("timm.optim.adopt", "Adopt"): (
        "ADOPT normalises g_t by max(sqrt(v_{t−1}), eps), the second moment *before* this step, which its state no "
        "longer holds after the step (it holds v_t), and clip_exp clamps the normalised gradient per coordinate"
    ),
    ("pytorch_optimizer.optimizer.lion", "Lion"): (
        "Lion steps x ← x − lr·sign(β1·m + (1 − β1)·g): a sign has no effective stepsize (η = lr/|u| would make every "
        "step lr long whatever the moments, and is undefined where u = 0), so the template's η_t does not exist"
    ),
    ("bitsandbytes.optim.adam", "Adam8bit"): _BNB,
    ("bitsandbytes.optim.adam", "PagedAdam8bit"): _BNB,
    ("bitsandbytes.optim.adamw", "AdamW8bit"): _BNB,
    ("bitsandbytes.optim.adamw", "PagedAdamW8bit"): _BNB,
}


def known_classes() -> dict[str, str]:
    """``{"module.QualName": "mapped" | reason declined}`` for every class this module recognises."""
    out = {f"{m}.{q}": "mapped" for m, q in _MAPPED}
    out.update({f"{m}.{q}": why for (m, q), why in _DECLINED.items()})
    return out


def _overriding(mro: tuple[type, ...], depth: int) -> str | None:
    """The first class before ``mro[depth]`` that overrides its ``step`` (compared unwrapped), or None."""
    base = inspect.unwrap(getattr(mro[depth], "step"))
    for c in mro[:depth]:
        if "step" in vars(c) and inspect.unwrap(vars(c)["step"]) is not base:
            return c.__qualname__
    return None


_BUILT: dict[tuple[str, str], OptimizerAdapter] = {}


def lookup(optimizer_cls: type) -> tuple[OptimizerAdapter | None, str] | None:
    """(adapter, '') or (None, why it is declined) for a known third-party optimizer class or a subclass of one
    that does not override ``step``; None when no class in its MRO is one this module knows."""
    mro = optimizer_cls.__mro__
    for depth, cls in enumerate(mro):
        key = (cls.__module__, cls.__qualname__)
        if key not in _MAPPED and key not in _DECLINED:
            continue
        name = f"{cls.__module__}.{cls.__qualname__}"
        overriding = _overriding(mro, depth)
        if overriding is not None:
            return None, (
                f"it subclasses {name} but {overriding} overrides step(), so its update may not be "
                f"{cls.__qualname__}'s; if it is, say so with register_adapter({optimizer_cls.__qualname__}, adapter)"
            )
        if key in _DECLINED:
            return None, f"{name} is declined: {_DECLINED[key]}"
        if key not in _BUILT:
            _BUILT[key] = _MAPPED[key]()
        return _BUILT[key], ""
    return None
