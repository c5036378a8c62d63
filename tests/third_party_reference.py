"""A float64 oracle for the third-party optimizers' convergence quantities (a helper, not a test module).

Independent of ``lightning_adamtype`` and of the optimizers' state: every rule below re-runs the optimizer's
*published* recurrence in float64 on the gradients it was given (snapshotted before each step), with its own moments,
bias corrections, eps placement and weight-decay form, and returns per parameter (η_t, the consumed g_t, the active
coordinates). Per group and observed step the accumulation is the paper's (as tests/reference.py):

    a += min_j η_{t,j},  b += Σ_j (η_{t,j} g_{t,j})²,  c += Σ_j |η_{t,j} − η_{t−1,j}|,  c2 += Σ_j (Δη_j)²

over the active coordinates (c, c2: also active at t − 1, parameters that had an η at t − 1 only).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

Rule = Callable[[dict, dict, Tensor, Tensor, "Context"], tuple[Tensor, Tensor, Tensor]]


def num(x: Any) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


class Context:
    """What a rule may need besides its own parameter: the group's step count t and the global gradient norm."""

    def __init__(self, t: int, global_norm: float) -> None:
        self.t, self.global_norm = t, global_norm


def _ema(st: dict, key: str, beta: float, value: Tensor) -> Tensor:
    st[key] = beta * st.get(key, torch.zeros_like(value)) + (1 - beta) * value
    return st[key]


def _own_step(st: dict) -> int:
    st["t"] = st.get("t", 0) + 1
    return st["t"]


def adam_corrected(maximize_key: str | None = None) -> Rule:
    """timm AdamP / NAdamW: m, v EMAs; η = (lr/(1 − β1^t)) / (sqrt(v)/sqrt(1 − β2^t) + eps), t per parameter."""
    def rule(group, st, g, x, ctx):
        if maximize_key and group.get(maximize_key):
            g = -g
        b1, b2 = (num(b) for b in group["betas"])
        t = _own_step(st)
        _ema(st, "m", b1, g)
        v = _ema(st, "v", b2, g * g)
        eta = (num(group["lr"]) / (1 - b1**t)) / (v.sqrt() / math.sqrt(1 - b2**t) + num(group["eps"]))
        return eta, g, v > 0
    return rule


def adabelief(decoupled_key: str, per_group_step: bool, ams_key: str) -> Rule:
    """AdaBelief: m = EMA(g), s = β2 s + (1 − β2)(g − m)² + eps (max over steps with AMSGrad);
    η = (lr/(1 − β1^t)) / (sqrt(s)/sqrt(1 − β2^t) + eps); coupled decay adds λx to g (timm: unless decoupled_decay;
    pytorch-optimizer: unless weight_decouple)."""
    def rule(group, st, g, x, ctx):
        b1, b2 = (num(b) for b in group["betas"])
        eps, wd = num(group["eps"]), num(group["weight_decay"])
        decoupled = group[decoupled_key]
        if wd and not decoupled:
            g = g + wd * x
        t = ctx.t if per_group_step else _own_step(st)
        m = _ema(st, "m", b1, g)
        s = b2 * st.get("s", torch.zeros_like(g)) + (1 - b2) * (g - m) ** 2 + eps
        st["s"] = s
        if group.get(ams_key):
            s = st["smax"] = torch.maximum(st.get("smax", torch.zeros_like(s)), s)
        lr = num(group["lr"])
        eta = (lr / (1 - b1**t)) / (s.sqrt() / math.sqrt(1 - b2**t) + eps)
        if group.get("rectify"):  # timm's default: RAdam's rule on s
            rho_inf = 2 / (1 - b2) - 1
            rho = rho_inf - 2 * t * b2**t / (1 - b2**t)
            if rho >= 5:
                r = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
                eta = lr * r * math.sqrt(1 - b2**t) / (1 - b1**t) / (s.sqrt() + eps)
            else:
                eta = torch.full_like(g, lr / (1 - b1**t) if group["degenerated_to_sgd"] else 0.0)
        return eta, g, torch.ones_like(g, dtype=torch.bool)
    return rule


def laprop(group, st, g, x, ctx):
    """timm LaProp: v = EMA(g²); η = lr / (sqrt(v/(1 − β2^t)) + eps) (the stepsize of g_t entering the mean)."""
    b2 = num(group["betas"][1])
    t = _own_step(st)
    v = _ema(st, "v", b2, g * g)
    return num(group["lr"]) / ((v / (1 - b2**t)).sqrt() + num(group["eps"])), g, v > 0


def po_adamp(group, st, g, x, ctx):
    """pytorch-optimizer AdamP: group step t; η = (lr/(1 − β1^t))·sqrt(1 − β2^t)/(sqrt(v) + eps); its coupled
    decay reaches p.grad only after the moments, so g is the plain gradient."""
    b1, b2 = (num(b) for b in group["betas"])
    _ema(st, "m", b1, g)
    v = _ema(st, "v", b2, g * g)
    t = ctx.t
    eta = (num(group["lr"]) / (1 - b1**t)) * math.sqrt(1 - b2**t) / (v.sqrt() + num(group["eps"]))
    return eta, g, v > 0


def po_lamb(pre_norm: bool = False, max_grad_norm: float = 1.0) -> Rule:
    """pytorch-optimizer Lamb: g ← g·min(1, max_grad_norm/(‖g‖_global + eps)) with pre_norm; m, v EMAs;
    x' = x(1 − lr·λ) (decoupled); u = m/(sqrt(v) + eps) (+ λx coupled); r = min(‖x'‖, 10)/(‖u‖ + eps);
    η = (lr/(1 − β1^t))·r/(sqrt(v) + eps)."""
    def rule(group, st, g, x, ctx):
        b1, b2 = (num(b) for b in group["betas"])
        lr, eps, wd = num(group["lr"]), num(group["eps"]), num(group["weight_decay"])
        if pre_norm:
            g = g * min(1.0, max_grad_norm / (ctx.global_norm + eps))
        m = _ema(st, "m", b1, g)
        v = _ema(st, "v", b2, g * g)
        decoupled = group["weight_decouple"]
        xd = x * (1 - lr * wd) if decoupled else x
        u = m / (v.sqrt() + eps) + (0.0 if decoupled else wd * x)
        wn, un = min(xd.norm().item(), 10.0), u.norm().item()
        r = 1.0 if wn == 0 or un == 0 else wn / (un + eps)
        return (lr / (1 - b1**ctx.t)) * r / (v.sqrt() + eps), g, v > 0
    return rule


def po_adan(group, st, g, x, ctx):
    """pytorch-optimizer Adan: g̃ = g + β2(g − g_prev) (g_prev = g at the first step); n = EMA_{β3}(g̃²);
    η = lr / (sqrt(n)/sqrt(1 − β3^t) + eps)."""
    b1, b2, b3 = (num(b) for b in group["betas"])
    prev = st.get("prev", g)
    tilde = g + b2 * (g - prev)
    st["prev"] = g
    n = _ema(st, "n", b3, tilde * tilde)
    return num(group["lr"]) / (n.sqrt() / math.sqrt(1 - b3**ctx.t) + num(group["eps"])), g, n > 0


def schedule_free(group, st, g, x, ctx):
    """schedulefree AdamWScheduleFree: v = EMA(g²); lr_t = lr·min(1, t/warmup_steps);
    η = lr_t / (sqrt(v/(1 − β2^t)) + eps) (the z-sequence's step; m_t = g_t)."""
    b2 = num(group["betas"][1])
    warm = group["warmup_steps"]
    lr = num(group["lr"]) * (ctx.t / warm if ctx.t - 1 < warm else 1.0)
    v = _ema(st, "v", b2, g * g)
    return lr / ((v / (1 - b2**ctx.t)).sqrt() + num(group["eps"])), g, v > 0


class HFAdafactor:
    """transformers Adafactor, from Shazeer & Stern (2018), Algorithms 4 and 5, with the package's published choices:
    t per parameter, β̂2_t = 1 − t^decay_rate, ε1 added to g² and ε2 flooring RMS(x_t) (eps = (ε1, ε2)):

        ≥ 2-D (n × m over the last two dims):  R ← β̂2 R + (1 − β̂2)·(g² + ε1)·1_m,  C ← β̂2 C + (1 − β̂2)·1_nᵀ(g² + ε1),
                                               V̂ = R C / (1_nᵀ R)   (row and column *sums*, the paper's form)
        1-D:                                   V̂ ← β̂2 V̂ + (1 − β̂2)·(g² + ε1)
        ρ_t = lr, or min(1e-6·t (warmup_init) | 1e-2, 1/√t) (relative_step);  α_t = ρ_t·max(ε2, RMS(x_t)) (scale_parameter)
        U = g/√V̂,  d = max(1, RMS(U)/clip_threshold),  step α_t·U/d  (β1: through an EMA of that step, weights summing
        to 1, so g_t's multiplier is the same)  ⇒  η = α_t/(d·√V̂).

    Active: the coordinates (≥ 2-D: whose row and column) have had a non-zero g (an EMA of g² without ε1, > 0).
    ``clips`` records every d."""

    def __init__(self) -> None:
        self.clips: list[float] = []

    def __call__(self, group, st, g, x, ctx):
        t = _own_step(st)
        e1, e2 = (num(e) for e in group["eps"])
        b2 = 1.0 - t ** num(group["decay_rate"])
        sq = g * g
        if g.dim() >= 2:
            r = _ema(st, "R", b2, (sq + e1).sum(dim=-1))
            c = _ema(st, "C", b2, (sq + e1).sum(dim=-2))
            vhat = r.unsqueeze(-1) * c.unsqueeze(-2) / r.sum(dim=-1, keepdim=True).unsqueeze(-1)
            r0, c0 = _ema(st, "R0", b2, sq.sum(dim=-1)), _ema(st, "C0", b2, sq.sum(dim=-2))
            active = (r0 > 0).unsqueeze(-1) & (c0 > 0).unsqueeze(-2)
        else:
            vhat = _ema(st, "V", b2, sq + e1)
            active = _ema(st, "V0", b2, sq) > 0
        if group["relative_step"]:
            rho = min(1e-6 * t if group["warmup_init"] else 1e-2, 1 / math.sqrt(t))
        else:
            rho = num(group["lr"])
        rms = lambda a: math.sqrt(float((a * a).mean()))  # noqa: E731
        alpha = rho * max(e2, rms(x)) if group["scale_parameter"] else rho
        d = max(1.0, rms(g / vhat.sqrt()) / num(group["clip_threshold"]))
        self.clips.append(d)
        return alpha / (d * vhat.sqrt()), g, active


class ThirdPartyOracle:
    """Drive with ``before_step()`` / ``after_step()`` around ``optimizer.step()`` (as tests/reference.py)."""

    def __init__(self, optimizer: torch.optim.Optimizer, rule: Rule) -> None:
        self.optimizer, self.rule = optimizer, rule
        self.own: dict[int, dict] = {}
        self.group_steps = [0] * len(optimizer.param_groups)
        self.acc = [dict(steps=0.0, a=0.0, b=0.0, c=0.0, c2=0.0) for _ in optimizer.param_groups]
        self.previous: list[dict[int, tuple[int, Tensor, Tensor]]] = [{} for _ in optimizer.param_groups]
        self.observation = 0
        self._snap: list[list[tuple[Tensor, Tensor] | None]] = []

    def before_step(self) -> None:
        self._snap = [[None if p.grad is None else (p.detach().double().clone(), p.grad.detach().double().clone())
                       for p in group["params"]] for group in self.optimizer.param_groups]

    def after_step(self) -> None:
        self.observation += 1
        grads = [s[1] for snaps in self._snap for s in snaps if s is not None]
        global_norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
        for gi, group in enumerate(self.optimizer.param_groups):
            if not any(s is not None for s in self._snap[gi]):
                continue
            self.group_steps[gi] += 1
            ctx = Context(self.group_steps[gi], global_norm)
            rows = {}
            for pi, snap in enumerate(self._snap[gi]):
                if snap is not None:
                    x, g = snap
                    rows[pi] = self.rule(group, self.own.setdefault(id(group["params"][pi]), {}), g, x, ctx)
            self._accumulate(gi, rows)

    def _accumulate(self, gi: int, rows: dict[int, tuple[Tensor, Tensor, Tensor]]) -> None:
        acc, previous = self.acc[gi], self.previous[gi]
        acc["steps"] += 1
        mins = [eta[act].min().item() for eta, _, act in rows.values() if act.any()]
        acc["a"] += min(mins) if mins else 0.0
        acc["b"] += sum(((eta * g)[act] ** 2).sum().item() for eta, g, act in rows.values())
        for pi, (eta, _, act) in rows.items():
            if pi in previous and previous[pi][0] == self.observation - 1:
                d = (eta - previous[pi][1])[act & previous[pi][2]]
                acc["c"] += d.abs().sum().item()
                acc["c2"] += (d * d).sum().item()
            previous[pi] = (self.observation, eta, act)

    def compute(self) -> list[dict[str, float]]:
        """Per group (by index): steps, a, b, c, c2."""
        return [dict(acc) for acc in self.acc]
