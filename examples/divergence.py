"""The divergence example of Chen, Liu, Sun & Hong (ICLR 2019, arXiv:1808.02941), monitored with Lightning.

Problem (x ∈ ℝ, x₁ = 1): every step draws i uniformly from {1, …, 11}; the stochastic gradient is

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

    python examples/divergence.py                      # 20 000 steps per optimizer, writes divergence.png
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
}
# (run folder, label, Adam(amsgrad=...), AdamTypeMonitor(switch_to_amsgrad=...))
RUNS = (
    ("adam", "Adam", False, False),
    ("amsgrad", "AMSGrad", True, False),
    ("adam_switch", "Adam + switch", False, True),
)
ABS_X_TAG = "divergence/abs_x"
SWITCHED_TAG = "adamtype/Adam/pg0/switched"
BIAS_SLOPE_THRESHOLD = -0.2  # slope of log(C/A) vs log(t) above this: the bias condition is violated


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
            self.manual_backward(stochastic_loss(self.x, i))
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if self.global_step % self.log_every_n_steps == 0:
                self._log_abs_x()

    def _log_abs_x(self) -> None:
        # Logged straight to the loggers with the optimizer step as the x-axis (self.log would use the batch count).
        value = float(self.x.detach().abs())
        for logger in self.loggers:
            logger.log_metrics({ABS_X_TAG: value}, step=self.global_step)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam([self.x], lr=self.lr, betas=(0.0, 0.9), eps=1e-8, amsgrad=self.amsgrad)
        if self.lr_schedule == "constant":
            return optimizer
        # α_t = lr / √t at optimizer step t = 1, 2, …: LambdaLR's counter k starts at 0.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0 / math.sqrt(k + 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


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
) -> dict[str, Any]:
    """Train one optimizer; returns the final |x|, the monitor's final numbers, the switch step (``None`` if the
    group was not switched) and the TensorBoard run folder."""
    pl.seed_everything(seed, verbose=False)
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
    if ABS_X_TAG in scalars:
        event_steps, values = scalars[ABS_X_TAG]
        curves["abs_x"] = ([float(s) for s in event_steps], list(values))
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
        "bias_condition": (
            "undetermined" if math.isnan(slope) else "violated" if slope > BIAS_SLOPE_THRESHOLD else "holds"
        ),
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
        flag = r["detector_violation"]
        detector = "n/a" if math.isnan(flag) else "violation" if flag > 0.5 else "ok"
        switched = "—" if r.get("switched_at") is None else str(r["switched_at"])
        lines.append(
            f"| {r['optimizer']} | {r['steps']} | {r['abs_x']:.4g} | {r['ca_10']:.4g} | {r['ca_100']:.4g} "
            f"| {r['slope']:+.3f} | {r['bias_condition']} | {r['detector_slope']:+.3f} / {detector} | {switched} |"
        )
    return "\n".join(lines)


def plot(
    all_curves: dict[str, dict[str, tuple[list[float], list[float]]]],
    out: str | os.PathLike,
    title: str,
    switches: dict[str, int | None] | None = None,
) -> None:
    """A 2×3 grid: a, b, c, B/A, C/A and |x| against the step on log-log axes, one line per optimizer.

    ``switches`` maps a run's label to its switch step: a dashed vertical line in that run's colour in every panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (*KEYS, "abs_x")
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20_000, help="optimizer steps per run (default 20000)")
    parser.add_argument("--logdir", default="runs/divergence", help="TensorBoard folder (default runs/divergence)")
    parser.add_argument("--out", default="divergence.png", help="figure to write (default divergence.png)")
    parser.add_argument(
        "--lr-schedule",
        choices=("constant", "inv_sqrt"),
        default="constant",
        help="constant: lr 0.1; inv_sqrt: lr 0.5/sqrt(t) (LambdaLR stepped every optimizer step)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the index draws (default 0)")
    parser.add_argument(
        "--steps-per-batch", type=int, default=20, help="optimizer steps per Lightning batch (default 20)"
    )
    parser.add_argument(
        "--log-every-n-steps", type=int, default=None, help="logging interval in optimizer steps (default steps/1000)"
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.steps_per_batch < 1:
        parser.error(f"--steps-per-batch must be at least 1, got {args.steps_per_batch}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the three optimizers, draw the figure, print the verdict table; returns everything it measured."""
    args = parse_args(argv)
    log_every = args.log_every_n_steps or max(1, args.steps // 1000)

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


def _quiet() -> None:
    import logging

    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*The number of training batches.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")


if __name__ == "__main__":
    _quiet()
    main()
    sys.exit(0)
