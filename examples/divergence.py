"""The divergence examples of Chen, Liu, Sun & Hong (ICLR 2019, arXiv:1808.02941), monitored with Lightning.

Bias case, the paper's own example (x ∈ ℝ, x₁ = 1): every step draws i uniformly from {1, …, 11}; the stochastic
gradient is

    g = 11·x  if i = 1,   g = −x  otherwise              for |x| ≤ 1,
    g = 11·sign(x)  if i = 1,   g = −sign(x)  otherwise   for |x| > 1.

The mean gradient points to 0, the only stationary point. One rare, large attracting gradient inflates v̂ and
many small repelling ones let Adam's v̂ shrink again, so Adam's effective stepsize η_t is correlated with the
noise: the bias condition C_T / A_T → 0 fails and Adam drifts away. AMSGrad keeps v̂ at its running maximum,
its bias ratio falls by about 10× per decade of steps, and it converges.

The script trains the problem three times through a ``pytorch_lightning`` Trainer with
:class:`lightning_adamtype.AdamTypeMonitor`, which logs the paper's quantities to TensorBoard: with Adam, with
Adam(amsgrad=True), and with Adam plus ``AdamTypeMonitor(switch_to_amsgrad=True)`` ("Adam + switch"), which
switches the group to AMSGrad in place once its bias verdict holds. It then reads the event files back, draws
them (``--out``, the switch step as a dashed vertical line) and prints a verdict table.

Variance case (``--problem variance``; our set-up, not the paper's: its Figure 1 set-up is not given). The same
kind of 1-D problem, with additive noise that does not vanish at the minimum: x₁ = 1, i uniform in {1, …, 11},

    f(x) = h(x),   g = h'(x) + ξ_i,   ξ_1 = −10,  ξ_i = +1 for i ≠ 1   (E ξ = 0; h'(x) = clip(x, −1, 1)),

h the Huber function above, so f is smooth, bounded below, |g| ≤ 11 and the noise is unbiased: the assumptions of
the paper's Theorem 3.1 hold. With a stepsize that does not decay (α_t = α) the effective stepsize settles at a
constant η, so B_T/A_T tends to a constant (≈ η·E g²; the variance condition fails) while C_T grows at most like
log T, so C_T/A_T falls like 1/T (the bias condition holds); x does not converge: it keeps wandering around 0 at a
fixed spread (RMS ≈ 0.7 for AMSGrad, ≈ 1.1–1.5 for AdaGrad's v̂ at α = 0.5). It does not run off to infinity: the
failure is non-convergence, not blow-up. With α_t = α/√t both ratios fall (B/A like log T/√T) and x converges (its
RMS falls like t^(−1/4)). Four runs, all with α = 0.5: AMSGrad (Adam(amsgrad=True), betas (0, 0.9), eps 1e-8) with
α_t = α and α_t = α/√t, and AdaGrad's v̂ (the mean of g_1², …, g_t²) with α_t = α (torch's Adagrad, lr·√t) and
α_t = α/√t (torch's Adagrad as it is). The table gives |x| at the end, the RMS of x early and late, both ratios with
the slopes of log(ratio) against log(t) over the last decade, and the monitor's verdicts.

    python examples/divergence.py                      # both cases, 20 000 steps per run: divergence.png,
                                                       # divergence_variance.png
    tensorboard --logdir runs/divergence               # the logged curves

Lightning costs about a millisecond per training batch, so each batch carries ``--steps-per-batch`` indices
and ``training_step`` (manual optimization) takes one optimizer step per index. Every quantity is still
measured per optimizer step: the monitor hooks the optimizer itself.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_adamtype import AdamTypeMonitor

KEYS = ("a", "b", "c", "variance_ratio", "bias_ratio")
LABELS = {
    "a": "A_T = Σ min_j η_t,j",
    "b": "B_T = Σ ‖η_t ⊙ g_t‖²",
    "c": "C_T = Σ ‖η_t − η_{t−1}‖₁",
    "variance_ratio": "variance ratio B_T / A_T",
    "bias_ratio": "bias ratio C_T / A_T",
    "abs_x": "|x_t|",
    "rms_x": "RMS of x_t over each logging interval",
    "rms_half": "RMS of x_s over s ∈ (t/2, t]",
}
# (run folder, label, Adam(amsgrad=...), AdamTypeMonitor(switch_to_amsgrad=...))
RUNS = (
    ("adam", "Adam", False, False),
    ("amsgrad", "AMSGrad", True, False),
    ("adam_switch", "Adam + switch", False, True),
)
ABS_X_TAG = "divergence/abs_x"
RMS_X_TAG = "divergence/rms_x"
SWITCHED_TAG = "adamtype/Adam/pg0/switched"
BIAS_SLOPE_THRESHOLD = -0.2  # slope of log(C/A) vs log(t) above this: the bias condition is violated
VARIANCE_SLOPE_THRESHOLD = -0.2  # slope of log(B/A) vs log(t) above this: the variance condition is violated

# The variance case (our set-up): additive noise ξ_i, mean 0, one rare large value and ten frequent small ones.
VARIANCE_NOISE_RARE = -10.0  # ξ_1
VARIANCE_NOISE_FREQUENT = 1.0  # ξ_i for i = 2, …, 11
VARIANCE_LR = 0.5  # α of every variance run: α_t = α or α/√t
# (run folder, label, optimizer family, α_t schedule)
VARIANCE_RUNS = (
    ("variance_amsgrad_constant", "AMSGrad, α_t = 0.5", "amsgrad", "constant"),
    ("variance_amsgrad_inv_sqrt", "AMSGrad, α_t = 0.5/√t", "amsgrad", "inv_sqrt"),
    ("variance_adagrad_constant", "AdaGrad v̂, α_t = 0.5", "adagrad", "constant"),
    ("variance_adagrad_inv_sqrt", "AdaGrad, α_t = 0.5/√t", "adagrad", "inv_sqrt"),
)
PROBLEMS = ("bias", "variance", "both")


# --------------------------------------------------------------------------------------------- the problem


def stochastic_loss(x: Tensor, i: int) -> Tensor:
    """A loss whose gradient in ``x`` is exactly the paper's stochastic gradient for index ``i``.

    With h(x) = x²/2 for |x| ≤ 1 and |x| − 1/2 outside (so h'(x) = x inside, sign(x) outside) the loss is
    11·h(x) for i = 1 and −h(x) otherwise: ∂/∂x = 11x or −x inside [−1, 1], 11·sign(x) or −sign(x) outside.
    """
    weight = 11.0 if i == 1 else -1.0
    inside = x.abs() <= 1
    h = torch.where(inside, 0.5 * x * x, x.abs() - 0.5)
    return weight * h


def stochastic_gradient(x: float, i: int) -> float:
    """The paper's stochastic gradient, written out directly (the oracle for :func:`stochastic_loss`)."""
    if abs(x) <= 1:
        return 11.0 * x if i == 1 else -x
    sign = math.copysign(1.0, x)
    return 11.0 * sign if i == 1 else -sign


def variance_noise(i: int) -> float:
    """ξ_i of the variance case: −10 for i = 1, +1 otherwise (mean 0 over i uniform in {1, …, 11})."""
    return VARIANCE_NOISE_RARE if i == 1 else VARIANCE_NOISE_FREQUENT


def variance_loss(x: Tensor, i: int) -> Tensor:
    """The variance case's loss for index ``i``: h(x) + ξ_i·x, so ∂/∂x = h'(x) + ξ_i = clip(x, −1, 1) + ξ_i.

    h is the Huber function of :func:`stochastic_loss` (x²/2 inside [−1, 1], |x| − 1/2 outside). The mean loss
    over i is h(x): minimum 0 at x = 0; the noise ξ_i does not vanish there, so a stepsize that does not decay
    leaves x wandering at a fixed spread.
    """
    inside = x.abs() <= 1
    h = torch.where(inside, 0.5 * x * x, x.abs() - 0.5)
    return h + variance_noise(i) * x


def variance_gradient(x: float, i: int) -> float:
    """The variance case's stochastic gradient written out directly (the oracle for :func:`variance_loss`)."""
    return max(-1.0, min(1.0, x)) + variance_noise(i)


def draw_indices(steps: int, seed: int) -> Tensor:
    """``steps`` indices drawn uniformly from {1, …, 11} with a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, 12, (steps,), generator=generator)


class DivergenceProblem(pl.LightningModule):
    """One scalar parameter x (float64, x₁ = 1) trained on the paper's stochastic gradients.

    Each batch is a 1-D tensor of indices; ``training_step`` takes one optimizer step per index (manual
    optimization), so ``trainer.global_step`` counts optimizer steps.
    """

    def __init__(
        self,
        amsgrad: bool = False,
        lr_schedule: str = "constant",
        lr: float | None = None,
        log_every_n_steps: int = 10,
    ) -> None:
        super().__init__()
        if lr_schedule not in ("constant", "inv_sqrt"):
            raise ValueError(f"lr_schedule={lr_schedule!r}: use 'constant' or 'inv_sqrt'")
        self.automatic_optimization = False
        self.amsgrad = amsgrad
        self.lr_schedule = lr_schedule
        self.lr = lr if lr is not None else (0.1 if lr_schedule == "constant" else 0.5)
        self.log_every_n_steps = log_every_n_steps
        self.x = nn.Parameter(torch.ones((), dtype=torch.float64))

    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        for i in batch.reshape(-1).tolist():
            optimizer.zero_grad()
            self.manual_backward(self.loss(i))
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            self._after_step()
            if self.global_step % self.log_every_n_steps == 0:
                self._log_abs_x()

    def loss(self, i: int) -> Tensor:
        """The stochastic loss of index ``i`` at the current x (the paper's problem)."""
        return stochastic_loss(self.x, i)

    def _after_step(self) -> None:
        """Called after every optimizer step (nothing to do for the paper's problem)."""

    def _metrics(self) -> dict[str, float]:
        return {ABS_X_TAG: float(self.x.detach().abs())}

    def _log_abs_x(self) -> None:
        # Logged straight to the loggers with the optimizer step as the x-axis (self.log would use the batch count).
        metrics = self._metrics()
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam([self.x], lr=self.lr, betas=(0.0, 0.9), eps=1e-8, amsgrad=self.amsgrad)
        if self.lr_schedule == "constant":
            return optimizer
        # α_t = lr / √t at optimizer step t = 1, 2, …: LambdaLR's counter k starts at 0.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0 / math.sqrt(k + 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class VarianceProblem(DivergenceProblem):
    """The variance case (our set-up): one scalar x (float64, x₁ = 1) trained on g = clip(x, −1, 1) + ξ_i.

    ``optimizer``: "amsgrad" (Adam(amsgrad=True), betas (0, 0.9), eps 1e-8) or "adagrad" (v̂ = the mean of
    g_1², …, g_t², torch's Adagrad). ``schedule``: "constant" (α_t = α) or "inv_sqrt" (α_t = α/√t), with
    α = ``lr``. torch's Adagrad divides by the square root of the *sum* of g², i.e. it is the template with
    v̂ = mean and α_t = lr/√t already; its "constant" run multiplies lr by √t (a LambdaLR) to get α_t = α.

    Every iterate x_t is kept in ``x_history`` (a float64 tensor, written without a host transfer); the logs carry
    |x_t| and the RMS of x over each logging interval.
    """

    def __init__(
        self,
        optimizer: str = "amsgrad",
        schedule: str = "constant",
        lr: float = VARIANCE_LR,
        log_every_n_steps: int = 10,
        steps: int = 20_000,
    ) -> None:
        if optimizer not in ("amsgrad", "adagrad"):
            raise ValueError(f"optimizer={optimizer!r}: use 'amsgrad' or 'adagrad'")
        if schedule not in ("constant", "inv_sqrt"):
            raise ValueError(f"schedule={schedule!r}: use 'constant' or 'inv_sqrt'")
        super().__init__(amsgrad=optimizer == "amsgrad", lr_schedule=schedule, lr=lr,
                         log_every_n_steps=log_every_n_steps)
        self.optimizer_kind = optimizer
        self.x_history = torch.zeros(steps, dtype=torch.float64)
        self._last_logged = 0

    def loss(self, i: int) -> Tensor:
        return variance_loss(self.x, i)

    def _after_step(self) -> None:
        t = self.global_step  # optimizer steps taken so far (x_{t+1} is the iterate after step t)
        if 0 < t <= self.x_history.numel():
            self.x_history[t - 1] = self.x.detach()

    def _metrics(self) -> dict[str, float]:
        metrics = super()._metrics()
        t = min(self.global_step, self.x_history.numel())
        if t > self._last_logged:
            metrics[RMS_X_TAG] = float(self.x_history[self._last_logged:t].square().mean().sqrt())
            self._last_logged = t
        return metrics

    def configure_optimizers(self) -> Any:
        if self.optimizer_kind == "amsgrad":
            optimizer = torch.optim.Adam([self.x], lr=self.lr, betas=(0.0, 0.9), eps=1e-8, amsgrad=True)
            if self.lr_schedule == "constant":
                return optimizer
            factor = inv_sqrt_t  # α_t = α/√t at optimizer step t = k + 1
        else:
            optimizer = torch.optim.Adagrad([self.x], lr=self.lr)
            if self.lr_schedule == "inv_sqrt":
                return optimizer  # torch's Adagrad: η_t = lr / √(Σ g²) = (lr/√t) / √(mean g²)
            factor = sqrt_t  # lr·√t: η_t = lr / √(mean g²), the template with a constant α_t
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def inv_sqrt_t(k: int) -> float:
    """LambdaLR factor 1/√t at optimizer step t = k + 1 (LambdaLR's counter k starts at 0)."""
    return 1.0 / math.sqrt(k + 1)


def sqrt_t(k: int) -> float:
    """LambdaLR factor √t at optimizer step t = k + 1."""
    return math.sqrt(k + 1)


def rms(values: Tensor) -> float:
    """Root mean square of a 1-D tensor (NaN when it is empty)."""
    return float(values.square().mean().sqrt()) if values.numel() else float("nan")


def rms_curve(history: Tensor, points_per_decade: int = 32) -> tuple[list[float], list[float]]:
    """RMS of x_s over s ∈ (t/2, t] at log-spaced t = 2, …, len(history) (``history[s − 1]`` = x after step s):
    the spread of the iterate over the second half of the run so far, the window of the windowed ratios."""
    n = int(history.numel())
    if n < 2:
        return [], []
    sums = torch.cat([torch.zeros(1, dtype=torch.float64), history.double().square().cumsum(0)])
    grid = sorted({min(n, max(2, round(10 ** (k / points_per_decade))))
                   for k in range(int(points_per_decade * math.log10(n)) + 2)})
    xs, ys = [], []
    for t in grid:
        lo = t // 2
        xs.append(float(t))
        ys.append(math.sqrt(max(0.0, float(sums[t] - sums[lo])) / (t - lo)))
    return xs, ys


def make_batches(steps: int, seed: int, steps_per_batch: int) -> list[Tensor]:
    """The seeded index stream cut into batches of ``steps_per_batch`` indices (the last may be shorter)."""
    indices = draw_indices(steps, seed)
    return list(torch.split(indices, steps_per_batch))


# ------------------------------------------------------------------------------------------------ training


def train(
    run: str,
    amsgrad: bool,
    *,
    steps: int,
    logdir: str | os.PathLike,
    seed: int,
    lr_schedule: str,
    steps_per_batch: int,
    log_every_n_steps: int,
    switch_to_amsgrad: bool = False,
    model: DivergenceProblem | None = None,
) -> dict[str, Any]:
    """Train one optimizer; returns the final |x|, the monitor's final numbers, the switch step (``None`` if the
    group was not switched) and the TensorBoard run folder.

    ``model`` replaces the paper's problem (``DivergenceProblem(amsgrad, lr_schedule)``), e.g. a
    :class:`VarianceProblem`; ``amsgrad`` and ``lr_schedule`` are then only recorded."""
    pl.seed_everything(seed, verbose=False)
    if model is None:
        model = DivergenceProblem(amsgrad=amsgrad, lr_schedule=lr_schedule, log_every_n_steps=log_every_n_steps)
    batches = make_batches(steps, seed, steps_per_batch)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=0)
    logger = TensorBoardLogger(str(logdir), name=run)
    monitor = AdamTypeMonitor(log_every_n_steps=log_every_n_steps, switch_to_amsgrad=switch_to_amsgrad)
    trainer = pl.Trainer(
        max_steps=steps,
        max_epochs=1,
        logger=logger,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        precision="64-true",
        log_every_n_steps=max(1, log_every_n_steps // steps_per_batch),
    )
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=loader)
    seconds = time.perf_counter() - start
    logger.finalize("success")
    final = monitor.compute()
    group = next(iter(final.values())) if final else {}
    switched = {name: step for tracker in monitor.trackers for name, step in tracker.switched.items() if step > 0}
    return {
        "run": run,
        "amsgrad": amsgrad,
        "steps": int(trainer.global_step),
        "abs_x": float(model.x.detach().abs()),
        "final": {k: float(v) for k, v in group.items()},
        "switched_at": next(iter(switched.values()), None),
        "log_dir": logger.log_dir,
        "seconds": seconds,
        "x_history": getattr(model, "x_history", None),
    }


# ------------------------------------------------------------------------------------------- reading back


def read_scalars(log_dir: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """All scalar series of one TensorBoard run folder: ``{tag: (steps, values)}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    series = {}
    for tag in accumulator.Tags().get("scalars", []):
        events = accumulator.Scalars(tag)
        series[tag] = ([e.step for e in events], [e.value for e in events])
    return series


def condition_curves(scalars: dict[str, tuple[list[int], list[float]]]) -> dict[str, tuple[list[float], list[float]]]:
    """The monitor's curves keyed by quantity (``a``, ``b``, …, ``abs_x``), against the optimizer step count.

    The x-axis is the monitor's own ``steps`` scalar where it was logged (the optimizer's step count, whatever
    step the event carries), else the event step.
    """
    by_key: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for tag, series in scalars.items():
        if not tag.startswith("adamtype/"):
            continue
        group, _, key = tag[len("adamtype/"):].rpartition("/")
        by_key.setdefault(group, {})[key] = series
    curves: dict[str, tuple[list[float], list[float]]] = {}
    if by_key:
        group = sorted(by_key)[0]  # one optimizer with one group here: e.g. "Adam/pg0"
        group_series = by_key[group]
        steps_at = dict(zip(*group_series["steps"])) if "steps" in group_series else {}
        for key, (event_steps, values) in group_series.items():
            xs = [float(steps_at.get(s, s)) for s in event_steps]
            curves[key] = (xs, list(values))
    for key, tag in (("abs_x", ABS_X_TAG), ("rms_x", RMS_X_TAG)):
        if tag in scalars:
            event_steps, values = scalars[tag]
            curves[key] = ([float(s) for s in event_steps], list(values))
    return curves


def switch_step(scalars: dict[str, tuple[list[int], list[float]]]) -> int | None:
    """The optimizer step of the first ``adamtype/<group>/switched`` marker in the event files, or ``None``."""
    steps = [
        s
        for tag, (xs, _) in scalars.items()
        if tag.startswith("adamtype/") and tag.endswith("/switched")
        for s in xs
    ]
    return min(steps) if steps else None


def value_at(curve: tuple[Sequence[float], Sequence[float]], step: float) -> float:
    """The curve's value at the last logged step ≤ ``step`` (the first point if none is)."""
    xs, ys = curve
    if not xs:
        return float("nan")
    best = 0
    for k, x in enumerate(xs):
        if x <= step:
            best = k
    return float(ys[best])


def loglog_slope(curve: tuple[Sequence[float], Sequence[float]], start: float, stop: float) -> float:
    """Least-squares slope of log(value) against log(step) over steps in [start, stop] (NaN if < 2 points)."""
    points = [
        (math.log(x), math.log(y))
        for x, y in zip(*curve)
        if start <= x <= stop and x > 0 and y > 0 and math.isfinite(y)
    ]
    if len(points) < 2:
        return float("nan")
    mx = sum(p[0] for p in points) / len(points)
    my = sum(p[1] for p in points) / len(points)
    sxx = sum((p[0] - mx) ** 2 for p in points)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in points)
    return sxy / sxx if sxx > 0 else float("nan")


def monitor_verdict(value: Any) -> str:
    """The monitor's verdict as a word: "violation" (1 / True: trending toward violation), "ok" (0 / False: the
    condition holds) or "unknown" (NaN or missing). Works with the bools of older versions and the 1.0 / 0.0 /
    NaN floats of newer ones."""
    if value is None:
        return "unknown"
    value = float(value)
    if math.isnan(value):
        return "unknown"
    return "violation" if value == 1 else "ok" if value == 0 else f"{value:g}"


def condition_word(slope: float, threshold: float) -> str:
    """The script's own verdict from the slope of log(ratio) over the last decade."""
    return "undetermined" if math.isnan(slope) else "violated" if slope > threshold else "holds"


def verdict(result: dict[str, Any], curves: dict[str, tuple[list[float], list[float]]]) -> dict[str, Any]:
    """The numbers of the verdict table for one run."""
    steps = result["steps"]
    bias = curves.get("bias_ratio", ([], []))
    slope = loglog_slope(bias, steps / 10, steps)
    return {
        "optimizer": result["label"],
        "steps": steps,
        "abs_x": result["abs_x"],
        "ca_10": value_at(bias, steps / 10),
        "ca_100": result["final"].get("bias_ratio", value_at(bias, steps)),
        "slope": slope,
        "bias_condition": condition_word(slope, BIAS_SLOPE_THRESHOLD),
        # The package's own trend detector (warm-up, patience, margin), where the monitor reports it.
        "detector_slope": result["final"].get("bias_slope", float("nan")),
        "detector_violation": result["final"].get("bias_violation", float("nan")),
        "switched_at": result.get("switched_at"),
        "seconds": result["seconds"],
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """The verdict table as Markdown."""
    lines = [
        "| optimizer | steps | final \\|x\\| | C/A at 10% | C/A at 100% | slope of C/A (last decade) | bias condition "
        "| monitor's bias_slope / verdict | switched at |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        detector = monitor_verdict(r["detector_violation"])
        switched = "—" if r.get("switched_at") is None else str(r["switched_at"])
        lines.append(
            f"| {r['optimizer']} | {r['steps']} | {r['abs_x']:.4g} | {r['ca_10']:.4g} | {r['ca_100']:.4g} "
            f"| {r['slope']:+.3f} | {r['bias_condition']} | {r['detector_slope']:+.3f} / {detector} | {switched} |"
        )
    return "\n".join(lines)


def variance_verdict(result: dict[str, Any], curves: dict[str, tuple[list[float], list[float]]]) -> dict[str, Any]:
    """The numbers of the variance case's table for one run: |x|, the RMS of x early and late, B/A and C/A with
    their slopes over the last decade, the script's verdicts and the monitor's (``variance_violation`` /
    ``bias_violation`` of ``monitor.compute()``)."""
    steps = result["steps"]
    variance = curves.get("variance_ratio", ([], []))
    bias = curves.get("bias_ratio", ([], []))
    v_slope = loglog_slope(variance, steps / 10, steps)
    b_slope = loglog_slope(bias, steps / 10, steps)
    history = result.get("x_history")
    if history is None:
        history = torch.zeros(0, dtype=torch.float64)
    history = history[:steps]
    final = result["final"]
    return {
        "optimizer": result["label"],
        "steps": steps,
        "abs_x": result["abs_x"],
        # RMS of x_t over t in (T/20, T/10] and over (T/2, T]: the spread of the iterate early and late
        "rms_early": rms(history[steps // 20 : steps // 10]),
        "rms_late": rms(history[steps // 2 :]),
        "ba_10": value_at(variance, steps / 10),
        "ba_100": final.get("variance_ratio", value_at(variance, steps)),
        "variance_slope": v_slope,
        "variance_condition": condition_word(v_slope, VARIANCE_SLOPE_THRESHOLD),
        "ca_100": final.get("bias_ratio", value_at(bias, steps)),
        "bias_slope": b_slope,
        "bias_condition": condition_word(b_slope, BIAS_SLOPE_THRESHOLD),
        "detector_variance_slope": final.get("variance_slope", float("nan")),
        "detector_variance": final.get("variance_violation", float("nan")),
        "detector_bias_slope": final.get("bias_slope", float("nan")),
        "detector_bias": final.get("bias_violation", float("nan")),
        "seconds": result["seconds"],
    }


def format_variance_table(rows: list[dict[str, Any]]) -> str:
    """The variance case's table as Markdown."""
    lines = [
        "| run | steps | final \\|x\\| | RMS x, t ∈ (T/20, T/10] | RMS x, t ∈ (T/2, T] | B/A at 10% | B/A at 100% "
        "| slope of B/A (last decade) | variance condition | C/A at 100% | slope of C/A (last decade) "
        "| bias condition | monitor's variance_slope / verdict | monitor's bias_slope / verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['steps']} | {r['abs_x']:.3g} | {r['rms_early']:.3g} | {r['rms_late']:.3g} "
            f"| {r['ba_10']:.4g} | {r['ba_100']:.4g} | {r['variance_slope']:+.3f} | {r['variance_condition']} "
            f"| {r['ca_100']:.3g} | {r['bias_slope']:+.3f} | {r['bias_condition']} "
            f"| {r['detector_variance_slope']:+.3f} / {monitor_verdict(r['detector_variance'])} "
            f"| {r['detector_bias_slope']:+.3f} / {monitor_verdict(r['detector_bias'])} |"
        )
    return "\n".join(lines)


def plot(
    all_curves: dict[str, dict[str, tuple[list[float], list[float]]]],
    out: str | os.PathLike,
    title: str,
    switches: dict[str, int | None] | None = None,
    last: str = "abs_x",
) -> None:
    """A 2×3 grid: a, b, c, B/A, C/A and ``last`` (|x|, or "rms_x") against the step on log-log axes, one line per
    optimizer.

    ``switches`` maps a run's label to its switch step: a dashed vertical line in that run's colour in every panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (*KEYS, last)
    colors = {label: f"C{k}" for k, label in enumerate(all_curves)}
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    for ax, key in zip(axes.flat, keys):
        for label, curves in all_curves.items():
            if key not in curves:
                continue
            xs, ys = curves[key]
            pts = [(x, y) for x, y in zip(xs, ys) if x > 0 and y > 0 and math.isfinite(y)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, lw=1.4, color=colors[label])
        for label, step in (switches or {}).items():
            if step is not None and step > 0:
                ax.axvline(
                    step, color=colors.get(label, "k"), ls="--", lw=1.0, alpha=0.8, label=f"switch at t = {step}"
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(LABELS[key], fontsize=10)
        ax.set_xlabel("optimizer step t")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ CLI


def variance_figure_path(out: str | os.PathLike) -> Path:
    """The variance case's figure next to ``out``: ``divergence.png`` → ``divergence_variance.png``."""
    out = Path(out)
    return out.with_name(f"{out.stem}_variance{out.suffix or '.png'}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line. Every help line names its default once (no formatter adds another)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--problem",
        choices=PROBLEMS,
        default="both",
        help="bias: the paper's example (Adam, AMSGrad, Adam + switch); variance: our variance-condition case\n"
        "(AMSGrad and AdaGrad with α_t = 0.5 and 0.5/sqrt(t)); both (default: both)",
    )
    parser.add_argument("--steps", type=int, default=20_000, help="optimizer steps per run (default: 20000)")
    parser.add_argument("--logdir", default="runs/divergence", help="TensorBoard folder (default: runs/divergence)")
    parser.add_argument("--out", default="divergence.png", help="bias case's figure (default: divergence.png)")
    parser.add_argument(
        "--out-variance",
        default=None,
        help="variance case's figure (default: --out with _variance before the suffix, divergence_variance.png)",
    )
    parser.add_argument(
        "--lr-schedule",
        choices=("constant", "inv_sqrt"),
        default="constant",
        help="bias case only. constant: lr 0.1; inv_sqrt: lr 0.5/sqrt(t) (LambdaLR stepped every optimizer\n"
        "step) (default: constant)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the index draws (default: 0)")
    parser.add_argument(
        "--steps-per-batch", type=int, default=20, help="optimizer steps per Lightning batch (default: 20)"
    )
    parser.add_argument(
        "--log-every-n-steps",
        type=int,
        default=None,
        help="logging interval in optimizer steps (default: steps/1000)",
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.steps_per_batch < 1:
        parser.error(f"--steps-per-batch must be at least 1, got {args.steps_per_batch}")
    if args.log_every_n_steps is not None and args.log_every_n_steps < 1:
        parser.error(f"--log-every-n-steps must be at least 1, got {args.log_every_n_steps}")
    if args.out_variance is None:
        args.out_variance = str(variance_figure_path(args.out))
    return args


def run_bias(args: argparse.Namespace, log_every: int) -> dict[str, Any]:
    """The paper's example: Adam, AMSGrad and Adam + switch; figure ``args.out``; prints the verdict table."""
    results, all_curves, rows = {}, {}, []
    for run, label, amsgrad, switch in RUNS:
        result = train(
            run,
            amsgrad,
            steps=args.steps,
            logdir=args.logdir,
            seed=args.seed,
            lr_schedule=args.lr_schedule,
            steps_per_batch=args.steps_per_batch,
            log_every_n_steps=log_every,
            switch_to_amsgrad=switch,
        )
        result["label"] = label
        result["scalars"] = read_scalars(result["log_dir"])
        # The switch step as the event files record it (the monitor's own record is result["switched_at"]).
        result["switched_at_logged"] = switch_step(result["scalars"])
        curves = condition_curves(result["scalars"])
        all_curves[label] = curves
        rows.append(verdict(result, curves))
        results[run] = result

    lr_text = "lr 0.1" if args.lr_schedule == "constant" else "lr 0.5/√t"
    plot(
        all_curves,
        args.out,
        f"Chen et al. (2019) divergence example: Adam, AMSGrad and Adam + switch to AMSGrad, betas (0, 0.9), "
        f"{lr_text}, seed {args.seed}",
        switches={results[run]["label"]: results[run]["switched_at_logged"] for run, *_ in RUNS},
    )
    table = format_table(rows)
    print(table)
    print(
        "time: " + ", ".join(f"{r['optimizer']} {r['seconds']:.1f} s" for r in rows)
        + f"; figure: {args.out}; logs: tensorboard --logdir {args.logdir}"
    )
    return {"results": results, "curves": all_curves, "rows": rows, "table": table, "out": str(args.out)}


def run_variance(args: argparse.Namespace, log_every: int) -> dict[str, Any]:
    """Our variance case: AMSGrad and AdaGrad with α_t = α and α/√t; figure ``args.out_variance``; prints the
    table (the monitor's verdicts read from ``monitor.compute()``)."""
    results, all_curves, rows = {}, {}, []
    for run, label, kind, schedule in VARIANCE_RUNS:
        model = VarianceProblem(kind, schedule, log_every_n_steps=log_every, steps=args.steps)
        result = train(
            run,
            kind == "amsgrad",
            steps=args.steps,
            logdir=args.logdir,
            seed=args.seed,
            lr_schedule=schedule,
            steps_per_batch=args.steps_per_batch,
            log_every_n_steps=log_every,
            model=model,
        )
        result["label"] = label
        result["scalars"] = read_scalars(result["log_dir"])
        curves = condition_curves(result["scalars"])
        curves["rms_half"] = rms_curve(result["x_history"][: result["steps"]])
        all_curves[label] = curves
        rows.append(variance_verdict(result, curves))
        results[run] = result
    plot(
        all_curves,
        args.out_variance,
        "Variance condition, our set-up (not the paper's): g = clip(x, −1, 1) + ξ, ξ = −10 w.p. 1/11, else +1\n"
        f"AMSGrad (betas 0, 0.9) and AdaGrad's v̂, α_t = {VARIANCE_LR} or {VARIANCE_LR}/√t, seed {args.seed}",
        last="rms_half",
    )
    table = format_variance_table(rows)
    print(
        "Variance case (our set-up, not the paper's): constant α_t keeps B/A flat and x wandering; "
        "α_t ∝ 1/√t converges"
    )
    print(table)
    print(
        "time: " + ", ".join(f"{r['optimizer']} {r['seconds']:.1f} s" for r in rows)
        + f"; figure: {args.out_variance}; logs: tensorboard --logdir {args.logdir}"
    )
    return {"results": results, "curves": all_curves, "rows": rows, "table": table, "out": str(args.out_variance)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the chosen case(s), draw the figure(s), print the table(s); returns everything it measured.

    The bias case's numbers are at the top level (``results``, ``curves``, ``rows``, ``table``, ``out``; empty when
    ``--problem variance``), the variance case's under ``"variance"`` (``None`` when ``--problem bias``)."""
    args = parse_args(argv)
    log_every = args.log_every_n_steps or max(1, args.steps // 1000)
    out: dict[str, Any] = {"results": {}, "curves": {}, "rows": [], "table": "", "out": None, "variance": None}
    if args.problem in ("bias", "both"):
        out.update(run_bias(args, log_every))
    if args.problem in ("variance", "both"):
        if args.problem == "both":
            print()
        out["variance"] = run_variance(args, log_every)
    return out


def _not_a_tip(record: Any) -> bool:
    return not str(record.getMessage()).startswith("💡 Tip")


def _quiet() -> None:
    """Keep the script's output to its tables: Lightning's info lines (the "💡 Tip" lines about litlogger and
    litmodels among them), its data-loader hints and torch's ``LeafSpec`` deprecation warning (raised by
    Lightning's own pytree helper) are dropped. The script's filters; the package sets none."""
    import logging

    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_not_a_tip)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*The number of training batches.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


if __name__ == "__main__":
    _quiet()
    main()
    sys.exit(0)
