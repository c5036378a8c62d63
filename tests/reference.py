"""A plain, slow float64 oracle for the Adam-type convergence conditions (Chen et al., ICLR 2019).

Independent of ``lightning_adamtype`` on purpose: nothing is imported from the package. Every effective stepsize
η_t is recomputed here in float64, parameter by parameter (no foreach), straight from the optimizer's state after
its step and torch's documented update rules. The training loop drives it explicitly:

    ref = Reference(optimizer)
    ...
    ref.before_step()      # snapshot x_t and ∇f (clones) of every parameter with a gradient
    optimizer.step()
    ref.after_step()       # read the state, compute η_t and g_t, accumulate

Per group and observed step t (over the parameters that had a gradient; a sparse gradient, SparseAdam's, is
densified, and its coordinates counted at t are those in its coalesced indices: :func:`touched`):

    a  += min_j η_{t,j}                 b  += Σ_j (η_{t,j} g_{t,j})²
    c  += Σ_j |η_{t,j} − η_{t−1,j}|     c2 += Σ_j (η_{t,j} − η_{t−1,j})²   (parameters with an η at t−1 only)
    a_mean += mean_j η_{t,j}            c_mean += (Σ_j |Δη_j|) / (number of coordinates in Δη)
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

KEYS = ("steps", "a", "b", "c", "c2", "a_mean", "c_mean", "activations")


def num(x: Any) -> float:
    """A Python float from a number or a one-element tensor."""
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def f64(t: Tensor) -> Tensor:
    """A float64 CPU copy (the oracle always computes on the CPU, whatever the parameters' device)."""
    return t.detach().to("cpu", torch.float64).clone()


# ---------------------------------------------------------------------------------------------- η per optimizer
# Each function: (group, state of one parameter after the step, parameter) -> η_t in float64, shape of the param.


def eta_adam(group: dict, state: dict, p: Tensor) -> Tensor:
    """Adam/AdamW: η = (lr/(1 − β1^t)) / (sqrt(v)/sqrt(1 − β2^t) + eps); v = max_exp_avg_sq under amsgrad."""
    lr = num(group["lr"])
    beta1, beta2 = num(group["betas"][0]), num(group["betas"][1])
    eps = num(group["eps"])
    t = num(state["step"])
    v = f64(state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"])
    bc1 = 1.0 - beta1**t
    bc2 = 1.0 - beta2**t
    return (lr / bc1) / (v.sqrt() / math.sqrt(bc2) + eps)


def eta_adagrad(group: dict, state: dict, p: Tensor) -> Tensor:
    """Adagrad: η = (lr/(1 + (t − 1)·lr_decay)) / (sqrt(sum) + eps)."""
    lr = num(group["lr"])
    t = num(state["step"])
    clr = lr / (1.0 + (t - 1.0) * num(group["lr_decay"]))
    return clr / (f64(state["sum"]).sqrt() + num(group["eps"]))


def eta_rmsprop(group: dict, state: dict, p: Tensor) -> Tensor:
    """RMSprop: η = lr / ((1 − μ)(sqrt(v) + eps)); centered v = square_avg − grad_avg²."""
    lr = num(group["lr"])
    mu = num(group["momentum"])
    v = f64(state["square_avg"])
    if group["centered"]:
        ga = f64(state["grad_avg"])
        v = v - ga * ga
    return lr / ((1.0 - mu) * (v.sqrt() + num(group["eps"])))


def eta_sgd(group: dict, state: dict, p: Tensor) -> Tensor:
    """SGD: η = lr (μ = 0), else lr·(1 − dampening)/(1 − μ)."""
    lr = num(group["lr"])
    mu = num(group["momentum"])
    value = lr if mu == 0.0 else lr * (1.0 - num(group["dampening"])) / (1.0 - mu)
    return torch.full(p.shape, value, dtype=torch.float64)


def eta_adamax(group: dict, state: dict, p: Tensor) -> Tensor:
    """Adamax: η = lr/(1 − β1^t) / exp_inf."""
    lr = num(group["lr"])
    beta1 = num(group["betas"][0])
    t = num(state["step"])
    return (lr / (1.0 - beta1**t)) / f64(state["exp_inf"])


def eta_nadam(group: dict, state: dict, p: Tensor) -> Tensor:
    """NAdam: η = lr·w_t / (sqrt(v/(1 − β2^t)) + eps), w_t = (1 − μ_t)/(1 − Π_t) + μ_{t+1}/(1 − Π_t μ_{t+1})."""
    lr = num(group["lr"])
    beta1, beta2 = num(group["betas"][0]), num(group["betas"][1])
    psi = num(group["momentum_decay"])
    t = num(state["step"])
    prod = num(state["mu_product"])  # Π_t, already including μ_t
    mu_t = beta1 * (1.0 - 0.5 * 0.96 ** (t * psi))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1.0) * psi))
    w = (1.0 - mu_t) / (1.0 - prod) + mu_next / (1.0 - prod * mu_next)
    v = f64(state["exp_avg_sq"])
    return lr * w / ((v / (1.0 - beta2**t)).sqrt() + num(group["eps"]))


def eta_radam(group: dict, state: dict, p: Tensor) -> Tensor:
    """RAdam: rectified adaptive step when ρ_t > 5, else the un-adapted lr/(1 − β1^t) on every coordinate."""
    lr = num(group["lr"])
    beta1, beta2 = num(group["betas"][0]), num(group["betas"][1])
    t = num(state["step"])
    bc1 = 1.0 - beta1**t
    bc2 = 1.0 - beta2**t
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * t * beta2**t / bc2
    if rho_t > 5.0:
        r = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        v = f64(state["exp_avg_sq"])
        return (lr / bc1) * r * math.sqrt(bc2) / (v.sqrt() + num(group["eps"]))
    return torch.full(p.shape, lr / bc1, dtype=torch.float64)


def eta_adafom(group: dict, state: dict, p: Tensor) -> Tensor:
    """AdaFom (the paper's method): α_t = lr/√t, v̂_t = (1/t)Σ g², so η = lr / (sqrt(sum) + eps)."""
    return num(group["lr"]) / (f64(state["sum"]).sqrt() + num(group["eps"]))


# ---------------------------------------------------------------------------------------------- replayed updates
# η of optimizers whose post-step state does not hold it: each function replays the published update in float64
# from the state *before* the step (``before``, float64 copies; empty at a parameter's first step), x_t and the
# consumed gradient g_t (coupled weight decay and maximize's sign included): (group, before, x_t, g_t) -> η_t.


def eta_adadelta(group: dict, before: dict, x: Tensor, g: Tensor) -> Tensor:
    """Adadelta: v_t = ρ·v_{t−1} + (1 − ρ)·g², η = lr·sqrt(Δ_{t−1} + ε)/sqrt(v_t + ε) (Δ = acc_delta before the step)."""
    lr, rho, eps = num(group["lr"]), num(group["rho"]), num(group["eps"])
    v_old = before.get("square_avg", torch.zeros_like(g))
    delta_old = before.get("acc_delta", torch.zeros_like(g))
    v = rho * v_old + (1.0 - rho) * g * g
    return lr * (delta_old + eps).sqrt() / (v + eps).sqrt()


def adafactor_estimate(group: dict, before: dict, g: Tensor, t: float) -> Tensor:
    """Adafactor's V̂_t: R C / max(mean(R), ε1) from the updated row/column EMAs (≥ 2-D), else the EMA of g²."""
    w = t ** num(group["beta2_decay"])
    eps1 = adafactor_eps1(group)
    if g.dim() > 1:
        row = before.get("row_var", torch.zeros(*g.shape[:-1], 1, dtype=torch.float64))
        col = before.get("col_var", torch.zeros(*g.shape[:-2], 1, g.shape[-1], dtype=torch.float64))
        row = row + w * ((g * g).mean(dim=-1, keepdim=True) - row)
        col = col + w * ((g * g).mean(dim=-2, keepdim=True) - col)
        return row @ col / row.mean(dim=-2, keepdim=True).clamp(min=eps1)
    variance = before.get("variance", torch.zeros_like(g))
    return variance + w * (g * g - variance)


def adafactor_eps1(group: dict) -> float:
    eps1 = group["eps"][0]
    return float(torch.finfo(torch.float32).eps) if eps1 is None else num(eps1)


def eta_adafactor(group: dict, before: dict, x: Tensor, g: Tensor) -> Tensor:
    """Adafactor: η = (α_t/d_t)/sqrt(max(V̂_t, ε1²)), α_t = min(lr, 1/√t)·max(ε2, RMS(x_t)), d_t = max(1, RMS(U)/d)."""
    t = num(before.get("step", 0.0)) + 1.0
    lr = num(group["lr"])
    inverse_root = adafactor_estimate(group, before, g, t).clamp(min=adafactor_eps1(group) ** 2).rsqrt()
    update = inverse_root * g
    n = max(g.numel(), 1)
    alpha = min(lr, 1.0 / math.sqrt(t)) * max(num(group["eps"][1]), x.norm().item() / math.sqrt(n))
    clip = max(1.0, update.norm().item() / (math.sqrt(n) * num(group["d"])))
    return alpha / clip * inverse_root


def touched(grad: Tensor) -> Tensor:
    """Where a sparse gradient touched its parameter: True at the coordinates of its coalesced indices (all of a
    hybrid tensor's dense dimensions there), whatever the values (an explicit 0 is touched)."""
    mask = torch.zeros(grad.shape, dtype=torch.bool)
    for index in grad.coalesce().indices().t().tolist():
        mask[tuple(index)] = True
    return mask


def eta_sparse_adam(group: dict, before: dict, x: Tensor, g: Tensor, touched: Tensor) -> Tensor:
    """SparseAdam's published (lazy) update: t = step + 1; at the touched coordinates only v ← β2·v + (1 − β2)·g²
    (the others keep v); η = lr·sqrt(1 − β2^t)/(1 − β1^t) / (sqrt(v) + eps), eps not bias-corrected."""
    lr, eps = num(group["lr"]), num(group["eps"])
    beta1, beta2 = num(group["betas"][0]), num(group["betas"][1])
    t = num(before.get("step", 0)) + 1.0
    v = sparse_adam_v(group, before, g, touched)
    return lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t) / (v.sqrt() + eps)


def sparse_adam_v(group: dict, before: dict, g: Tensor, touched: Tensor) -> Tensor:
    """SparseAdam's v_t: β2·v + (1 − β2)·g² at the touched coordinates, v_{t−1} elsewhere."""
    beta2 = num(group["betas"][1])
    v_old = before.get("exp_avg_sq", torch.zeros_like(g))
    return torch.where(touched, beta2 * v_old + (1.0 - beta2) * g * g, v_old)


def active_adafactor(group: dict, state: dict, p: Tensor) -> Tensor:
    """Adafactor: active where V̂_t > 0 (from the state after the step)."""
    if p.dim() > 1:
        row, col = f64(state["row_var"]), f64(state["col_var"])
        return row @ col > 0
    return f64(state["variance"]) > 0


REPLAY: dict[str, tuple[Callable, Callable]] = {}  # filled below (the weight-decay functions come first)


def radam_rectified(group: dict, t: float) -> bool:
    """Whether RAdam's step t takes the rectified (adaptive) branch."""
    beta2 = num(group["betas"][1])
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    return rho_inf - 2.0 * t * beta2**t / (1.0 - beta2**t) > 5.0


def wd_coupled(group: dict) -> float:
    """Weight decay added to the gradient (Adam, Adagrad, RMSprop, SGD, Adamax, NAdam/RAdam unless decoupled)."""
    if group.get("decoupled_weight_decay", False):
        return 0.0
    return num(group.get("weight_decay", 0.0))


def wd_none(group: dict) -> float:
    return 0.0


ETA: dict[str, tuple[Callable, Callable]] = {
    "Adam": (eta_adam, wd_coupled),
    "AdamW": (eta_adam, wd_none),
    "Adagrad": (eta_adagrad, wd_coupled),
    "RMSprop": (eta_rmsprop, wd_coupled),
    "SGD": (eta_sgd, wd_coupled),
    "Adamax": (eta_adamax, wd_coupled),
    "NAdam": (eta_nadam, wd_coupled),
    "RAdam": (eta_radam, wd_coupled),
    "AdaFom": (eta_adafom, wd_coupled),
}


REPLAY.update({"Adadelta": (eta_adadelta, wd_coupled), "Adafactor": (eta_adafactor, wd_none)})
#: replays of optimizers with sparse gradients: (group, before, x_t, g_t densified, touched) -> η_t; the coordinates
#: counted at t are the touched ones
SPARSE_REPLAY: dict[str, tuple[Callable, Callable]] = {"SparseAdam": (eta_sparse_adam, wd_none)}


def _positive(key: str) -> Callable:
    return lambda group, state, p: f64(state[key]) > 0


#: per optimizer: where a coordinate is active (has had a non-zero gradient): its second moment is > 0
ACTIVE: dict[str, Callable] = {
    "Adam": _positive("exp_avg_sq"),
    "AdamW": _positive("exp_avg_sq"),
    "Adagrad": _positive("sum"),
    "RMSprop": _positive("square_avg"),
    # (u = max(β2·u, |g| + eps) is eps in the state's dtype until a first non-zero gradient)
    "Adamax": lambda group, state, p: f64(state["exp_inf"]) > float(torch.tensor(num(group["eps"]), dtype=state["exp_inf"].dtype)),
    "NAdam": _positive("exp_avg_sq"),
    "RAdam": _positive("exp_avg_sq"),
    "AdaFom": _positive("sum"),
    "Adadelta": _positive("square_avg"),
    "Adafactor": active_adafactor,
}


def all_active(group: dict, state: dict, p: Tensor) -> Tensor:
    return torch.ones(p.shape, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------- the oracle


class Reference:
    """Accumulates steps, a, b, c, c2, a_mean, c_mean, activations per group in float64 Python numbers (and keeps
    ``inactive``, the coordinates that stepped but were inactive at the group's latest step).

    ``coordinates="active"`` (the tracker's default): a, b, a_mean over the coordinates active at t (``ACTIVE``: the
    second moment > 0; SGD and unknown optimizers: all), c, c2, c_mean over those also active at t − 1;
    ``"all"``: every coordinate (the paper's formulas as written)."""

    def __init__(self, optimizer: torch.optim.Optimizer, eta_fn: Callable | None = None, wd_fn: Callable | None = None,
                 coordinates: str = "active", active_fn: Callable | None = None, recomputed_zero: float | None = None):
        self.optimizer = optimizer
        # previous_stepsize="recomputed": v_{t−1} ≤ recomputed_zero · v_t counts as inactive at t − 1 (Adam's v)
        self.recomputed_zero = recomputed_zero
        self.previous_v: dict[int, Tensor] = {}
        self.coordinates = coordinates
        self.active_fn = active_fn or ACTIVE.get(type(optimizer).__name__, all_active)
        self.was_active: list[dict[int, Tensor]] = []
        self.replay_fn: Callable | None = None
        self.sparse = eta_fn is None and type(optimizer).__name__ in SPARSE_REPLAY
        replays = SPARSE_REPLAY if self.sparse else REPLAY
        if eta_fn is None and type(optimizer).__name__ in replays:
            self.replay_fn, default_wd = replays[type(optimizer).__name__]
            wd_fn = wd_fn or default_wd
        elif eta_fn is None:
            eta_fn, default_wd = ETA[type(optimizer).__name__]
            wd_fn = wd_fn or default_wd
        self.eta_fn = eta_fn
        self.wd_fn = wd_fn or wd_none
        self.observations = 0
        self.acc: list[dict[str, float]] = []
        self.inactive: list[float] = []  # per group: coordinates that stepped but were inactive, at its latest step
        self.previous: list[dict[int, Tensor]] = []
        self.last_seen: list[dict[int, int]] = []
        self.seen: list[bool] = []
        self._snap: list[list[tuple[Tensor, Tensor] | None]] = []
        self._before: dict[int, dict] = {}  # (replayed optimizers) float64 copies of the state before the step
        self._touched: dict[int, Tensor] = {}  # (sparse gradients) where this step's gradient touched its parameter

    def before_step(self) -> None:
        self._touched = {
            id(p): touched(p.grad) for group in self.optimizer.param_groups for p in group["params"]
            if p.grad is not None and p.grad.is_sparse
        }
        self._snap = [
            [None if p.grad is None else (f64(p), f64(p.grad.to_dense() if p.grad.is_sparse else p.grad)) for p in group["params"]]
            for group in self.optimizer.param_groups
        ]
        if self.replay_fn is not None:
            self._before = {
                id(p): {k: f64(v) if isinstance(v, Tensor) else v for k, v in self.optimizer.state.get(p, {}).items()}
                for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None
            }

    def after_step(self) -> None:
        self.observations += 1
        while len(self.acc) < len(self.optimizer.param_groups):
            self.acc.append(dict.fromkeys(KEYS, 0.0))
            self.inactive.append(0.0)
            self.previous.append({})
            self.was_active.append({})
            self.last_seen.append({})
            self.seen.append(False)
        for gi, group in enumerate(self.optimizer.param_groups):
            etas: dict[int, Tensor] = {}
            grads: dict[int, Tensor] = {}
            active: dict[int, Tensor] = {}
            for pi, p in enumerate(group["params"]):
                snap = self._snap[gi][pi]
                if snap is None:
                    continue
                p_before, grad = snap
                state = self.optimizer.state[p] if p in self.optimizer.state else {}
                g = -grad if group.get("maximize", False) else grad
                wd = self.wd_fn(group)
                if wd != 0.0:
                    g = g + wd * p_before
                if self.sparse:
                    eta = self.replay_fn(group, self._before[id(p)], p_before, g, self._touched[id(p)])  # type: ignore[misc]
                elif self.replay_fn is not None:
                    eta = self.replay_fn(group, self._before[id(p)], p_before, g)
                else:
                    eta = self.eta_fn(group, state, p)
                etas[pi] = eta
                grads[pi] = g
                known = state or self.active_fn is all_active
                if self.sparse:  # touched at t, and v_t > 0 (a coordinate that only ever had 0 gradients is not)
                    hit = self._touched[id(p)]
                    active[pi] = hit & (sparse_adam_v(group, self._before[id(p)], g, hit) > 0)
                else:
                    active[pi] = self.active_fn(group, state, p).reshape(eta.shape) if known else torch.zeros(eta.shape, dtype=torch.bool)
            if not etas:
                continue
            counted = active if self.coordinates == "active" else {pi: torch.ones_like(m) for pi, m in active.items()}
            acc = self.acc[gi]
            self.seen[gi] = True
            acc["steps"] += 1.0
            self.inactive[gi] = float(sum(int((~m).sum()) for m in active.values()))
            mins = [e[counted[pi]].min().item() for pi, e in etas.items() if counted[pi].any()]
            acc["a"] += min(mins) if mins else 0.0
            acc["b"] += sum(((etas[pi] * grads[pi])[counted[pi]] ** 2).sum().item() for pi in etas)
            n = sum(int(counted[pi].sum()) for pi in etas)
            if n:
                acc["a_mean"] += sum(e[counted[pi]].sum().item() for pi, e in etas.items()) / n
            c = c2 = 0.0
            n_diff = 0
            for pi, eta in etas.items():
                if self.last_seen[gi].get(pi) == self.observations - 1:
                    before = self.was_active[gi][pi]
                    if self.recomputed_zero is not None:
                        v = f64(self.optimizer.state[group["params"][pi]]["exp_avg_sq"])
                        before = self.previous_v[id(group["params"][pi])] > self.recomputed_zero * v
                    pairs = counted[pi] & before if self.coordinates == "active" else counted[pi]
                    d = (eta - self.previous[gi][pi])[pairs]
                    c += d.abs().sum().item()
                    c2 += (d * d).sum().item()
                    n_diff += d.numel()
                    acc["activations"] += float((active[pi] & ~before).sum())
            acc["c"] += c
            acc["c2"] += c2
            if n_diff:
                acc["c_mean"] += c / n_diff
            for pi, eta in etas.items():
                self.previous[gi][pi] = eta
                self.was_active[gi][pi] = active[pi]
                if self.recomputed_zero is not None:
                    p = group["params"][pi]
                    self.previous_v[id(p)] = f64(self.optimizer.state[p]["exp_avg_sq"])
                self.last_seen[gi][pi] = self.observations
        self._snap = []

    def compute(self) -> list[dict[str, float] | None]:
        """Per group (by index): the accumulators and the ratios b/a, c/a, c_mean/a_mean; None if never stepped."""
        out: list[dict[str, float] | None] = []
        for gi, acc in enumerate(self.acc):
            if not self.seen[gi]:
                out.append(None)
                continue
            values = dict(acc)
            values["inactive"] = self.inactive[gi]
            a = values["a"]
            values["variance_ratio"] = values["b"] / a if a > 0 else math.nan
            values["bias_ratio"] = values["c"] / a if a > 0 else math.nan
            values["bias_ratio_mean"] = values["c_mean"] / values["a_mean"] if values["a_mean"] > 0 else math.nan
            out.append(values)
        return out
