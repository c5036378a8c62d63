"""``AdamTypeMonitor``: the Lightning ``Callback`` around :class:`~lightning_adamtype.ConditionTracker`.

A thin layer: it creates one tracker per optimizer the LightningModule configures, logs every key of every
group to all the trainer's loggers (``adamtype/<group name>/<key>``) from global rank zero, and checkpoints the
trackers' state so a resumed run continues its curves where the interrupted one stopped.

The class derives from ``pytorch_lightning.Callback`` and from ``lightning.pytorch.Callback``, whichever are
installed, so both ``pytorch_lightning.Trainer`` and ``lightning.pytorch.Trainer`` accept it.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from typing import Any, Callable

import torch

from .options import TrackerOptions
from .tracker import ConditionTracker
from .trend import TrendOptions

__all__ = ["AdamTypeMonitor", "TAG_PREFIX"]

TAG_PREFIX = "adamtype"
#: Strategies whose optimizer state is sharded across ranks (refused at setup).
#: Strategies that shard optimizer state in a form the trackers cannot read: FSDP1's flat parameters (padding and
#: views), DeepSpeed's partitioned state. ModelParallelStrategy (FSDP2: DTensor shards) is supported: the trackers
#: combine the shards across ranks.
_SHARDED_STRATEGIES = frozenset({"FSDPStrategy", "DeepSpeedStrategy"})


def _fail_safe(default: Any = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A Lightning hook that never raises: an error gives one warning (per monitor) and ``default`` is returned;
    training goes on without what the hook would have logged."""

    def wrap(hook: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(hook)
        def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return hook(self, *args, **kwargs)
            except Exception as error:
                if not getattr(self, "_hook_failed", False):
                    self._hook_failed = True
                    warnings.warn(
                        f"lightning_adamtype: AdamTypeMonitor.{hook.__name__} failed ({type(error).__name__}: {error}); "
                        "training goes on, without what this hook logs. Please report it (the message and the "
                        "optimizers' settings) to the lightning_adamtype issue tracker",
                        UserWarning,
                        stacklevel=2,
                    )
                return default() if callable(default) else default

        return guarded

    return wrap


def _callback_bases() -> tuple[type, ...]:
    bases = []
    for module in ("pytorch_lightning", "lightning.pytorch"):
        try:
            bases.append(importlib.import_module(module).Callback)
        except ImportError:
            continue
    if not bases:
        raise ImportError(
            "AdamTypeMonitor needs Lightning: pip install pytorch-lightning (or lightning). "
            "Without Lightning, use lightning_adamtype.ConditionTracker directly."
        )
    return tuple(dict.fromkeys(bases))


def _check_positive_int_or_none(option: str, value: Any, none_means: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"AdamTypeMonitor({option}={value!r}): expected a positive int, or None {none_means}")


def _optimizer_prefixes(optimizers: list[torch.optim.Optimizer]) -> list[str]:
    """``<Class>``, then ``<Class>-1``, ``<Class>-2`` … for further optimizers of one class (as LearningRateMonitor)."""
    seen: dict[str, int] = {}
    prefixes = []
    for opt in optimizers:
        cls = type(opt).__name__
        count = seen.get(cls, 0)
        prefixes.append(cls if count == 0 else f"{cls}-{count}")
        seen[cls] = count + 1
    return prefixes


class AdamTypeMonitor(*_callback_bases()):  # type: ignore[misc]
    """Log the Adam-type convergence conditions (Chen et al., ICLR 2019) of every optimizer, per param group.

    For each group: A_T = Σ_t min_j η_{t,j}, B_T = Σ_t ‖η_t ⊙ g_t‖², C_T = Σ_t ‖η_t − η_{t−1}‖₁,
    C2_T = Σ_t ‖η_t − η_{t−1}‖², variance_ratio = B/A and bias_ratio = C/A (see :class:`ConditionTracker`).

    Args:
        log_every_n_steps: log every this many optimizer steps (``trainer.global_step``); default: the
            trainer's ``log_every_n_steps``.
        switch_to_amsgrad: switch a group of an Adam/AdamW optimizer to AMSGrad in place when its bias verdict
            holds (see :class:`ConditionTracker`). Each switch logs ``adamtype/<group>/switched`` = 1 at the step
            it took effect and prints one rank-zero message with the reason.
        trend: options of the trend detectors behind the verdicts (:class:`TrendOptions`).
        tensorboard_layout: write a TensorBoard custom-scalars layout once training starts: per group, a
            Multiline chart of b, a and b/a (variance condition) and one of c, a and c/a (bias condition), in the
            "CUSTOM SCALARS" dashboard (TensorBoard loggers only; others are skipped).
        histogram_every_n_logs: every this many logs, add a histogram of the effective stepsizes η of each group
            (``adamtype/<group>/eta``, one value per coordinate, from the last observed step) to TensorBoard
            loggers; ``None`` (default) writes none.
        progress_bar: show the first group's ``variance_ratio`` and ``bias_ratio`` in Lightning's progress bar as
            ``adamtype_variance_ratio`` / ``adamtype_bias_ratio`` (updated at log steps only, not sent to loggers).
        kernel, previous_stepsize: how each tracker computes (see :class:`ConditionTracker`): ``kernel="auto"``
            (default) takes two Triton launches per group on a CUDA device, one call of a C loop per group on the
            CPU (compiled on first use when a C compiler works), and multi-tensor operations otherwise;
            ``kernel="foreach"`` forces the reference multi-tensor backend; ``previous_stepsize="recomputed"`` keeps
            no per-coordinate η_{t−1} (Adam/AdamW/Adagrad/RMSprop).
        observe_every: observe only the step pairs (t − 1, t) with t divisible by k and weigh them by k (see
            :class:`ConditionTracker`); 1 (default) observes every step.
        coordinates: ``"active"`` (default) or ``"all"``: which coordinates a, b, c, c2 sum over (see
            :class:`ConditionTracker`).
        start_step: ignore the optimizer steps before this one, as if the monitor were attached there (a resumed
            or fine-tuned run); 1 (default) observes from the first step.
        summary: print :meth:`ConditionTracker.summary` of each tracker at the end of ``fit`` (rank zero; default
            True).

    Example::

        trainer = Trainer(callbacks=[AdamTypeMonitor()], logger=TensorBoardLogger("runs"))
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        *,
        switch_to_amsgrad: bool = False,
        trend: TrendOptions | None = None,
        tensorboard_layout: bool = True,
        histogram_every_n_logs: int | None = None,
        progress_bar: bool = False,
        kernel: str = "auto",
        previous_stepsize: str = "stored",
        observe_every: int = 1,
        coordinates: str = "active",
        start_step: int = 1,
        summary: bool = True,
    ) -> None:
        self.options = TrackerOptions(
            switch_to_amsgrad, trend, kernel, previous_stepsize, observe_every, coordinates, start_step
        ).validated(
            "AdamTypeMonitor"
        )
        for option, value in (
            ("tensorboard_layout", tensorboard_layout),
            ("progress_bar", progress_bar),
            ("summary", summary),
        ):
            if not isinstance(value, bool):
                raise ValueError(f"AdamTypeMonitor({option}={value!r}): expected True or False")
        _check_positive_int_or_none("log_every_n_steps", log_every_n_steps, "to use the Trainer's log_every_n_steps")
        _check_positive_int_or_none("histogram_every_n_logs", histogram_every_n_logs, "for no histograms")
        self.log_every_n_steps = log_every_n_steps
        self.tensorboard_layout = tensorboard_layout
        self.histogram_every_n_logs = histogram_every_n_logs
        self.progress_bar = progress_bar
        self.summary = summary
        self._logs_written = 0
        self.trackers: list[ConditionTracker] = []
        self._pending_state: dict[str, Any] | None = None
        self._last_logged_bucket = 0
        self._last_logged_step = -1

    # ------------------------------------------------------------------ attaching
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Refuse strategies that shard optimizer state: each rank would see one shard and log wrong numbers."""
        strategy = type(getattr(trainer, "strategy", None)).__name__
        if strategy in _SHARDED_STRATEGIES:
            raise RuntimeError(
                f"AdamTypeMonitor does not support {strategy}: it shards the optimizer state in a form the monitor "
                "cannot combine across ranks (FSDP1 flat parameters, DeepSpeed partitions), so the logged a, b, c "
                "would be wrong. Use ModelParallelStrategy (FSDP2, supported: shards are combined), strategy='ddp' "
                "or a single device, or remove AdamTypeMonitor from the callbacks."
            )

    @_fail_safe()
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Attach a tracker to each optimizer (after the checkpoint, if any, has restored their state)."""
        self._detach()
        self.trackers = []  # a callback reused for another fit releases the previous optimizers
        names = {p: n for n, p in pl_module.named_parameters()}
        optimizers = list(trainer.optimizers)
        for opt, prefix in zip(optimizers, _optimizer_prefixes(optimizers)):
            raw = getattr(opt, "optimizer", opt)  # a LightningOptimizer wraps the torch one
            self.trackers.append(ConditionTracker(raw, name=prefix, parameter_names=names, **self.options.as_kwargs()))
        if self._pending_state is not None:
            self._restore(self._pending_state, optimizers)
            self._pending_state = None
        if self.tensorboard_layout and trainer.is_global_zero and trainer.loggers:
            from .tensorboard_layout import write_layout

            write_layout(trainer.loggers, [name for tracker in self.trackers for name in tracker.group_names()])

    def _restore(self, pending: dict[str, Any], optimizers: list[Any]) -> None:
        """Load the checkpointed tracker states; a state that cannot be read starts that tracker over, with one
        warning (a monitor never stops a run)."""
        saved = pending.get("trackers", {}) if isinstance(pending, dict) else {}
        for i, tracker in enumerate(self.trackers):
            if tracker.name not in saved:
                continue
            try:
                tracker.load_state_dict(saved[tracker.name])
            except Exception as error:
                raw = getattr(optimizers[i], "optimizer", optimizers[i])
                self.trackers[i] = ConditionTracker(raw, name=tracker.name, parameter_names=tracker.parameter_names, **self.options.as_kwargs())
                tracker.remove()
                warnings.warn(
                    f"lightning_adamtype: the checkpointed state of {tracker.name} could not be read "
                    f"({type(error).__name__}: {error}); its measurement starts over from this step",
                    UserWarning,
                    stacklevel=2,
                )
        try:
            self._last_logged_bucket = int(pending.get("last_logged_bucket", 0))
            self._last_logged_step = int(pending.get("last_logged_step", -1))
        except (TypeError, ValueError, AttributeError):
            self._last_logged_bucket, self._last_logged_step = 0, -1

    @_fail_safe()
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Log the final values (if the last step was not logged already), write the per-tensor shares, print the
        summary (rank zero, unless ``summary=False``) and detach from the optimizers."""
        if trainer.global_step != self._last_logged_step:
            self._log(trainer)
        if trainer.is_global_zero and trainer.loggers:
            from .tensorboard_layout import write_shares

            write_shares(trainer.loggers, self.trackers, trainer.global_step)
        if self.summary and trainer.is_global_zero:
            for tracker in self.trackers:
                if tracker.compute():
                    print(tracker.summary())
        self._detach()

    @_fail_safe()
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._detach()

    def _detach(self) -> None:
        """Detach every tracker; their numbers stay readable until the next ``fit`` replaces them."""
        for tracker in self.trackers:
            tracker.remove()

    # ------------------------------------------------------------------ logging
    def _interval(self, trainer: Any) -> int:
        return self.log_every_n_steps or max(int(getattr(trainer, "log_every_n_steps", 50) or 50), 1)

    @_fail_safe()
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log when ``global_step`` crossed a multiple of the interval (one host transfer per log)."""
        self._report_switches(trainer)
        bucket = trainer.global_step // self._interval(trainer)
        if bucket != self._last_logged_bucket and trainer.global_step != self._last_logged_step:
            self._last_logged_bucket = bucket
            metrics = self._log(trainer)
            if self.progress_bar and metrics:
                self._show_in_progress_bar(pl_module, metrics)

    def _show_in_progress_bar(self, pl_module: Any, metrics: dict[str, float]) -> None:
        """The first group's two ratios in the progress bar (host floats computed for logging: no extra sync)."""
        names = [name for tracker in self.trackers for name in tracker.group_names()]
        first = next((n for n in names if f"{TAG_PREFIX}/{n}/variance_ratio" in metrics), None)
        if first is None:
            return
        for key in ("variance_ratio", "bias_ratio"):
            value = metrics.get(f"{TAG_PREFIX}/{first}/{key}")
            if value is not None:
                pl_module.log(
                    f"{TAG_PREFIX}_{key}", value, prog_bar=True, logger=False, on_step=True, on_epoch=False,
                    rank_zero_only=True,
                )

    def _report_switches(self, trainer: Any) -> None:
        """One rank-zero message and a scalar marker per switch (host lists only: no device work)."""
        for tracker in self.trackers:
            while tracker.switch_events:
                group, step, reason = tracker.switch_events.pop(0)
                if not trainer.is_global_zero:
                    continue
                print(f"[lightning_adamtype] {group}: switched to AMSGrad from optimizer step {step}: {reason}")
                for logger in trainer.loggers:
                    logger.log_metrics({f"{TAG_PREFIX}/{group}/switched": 1.0}, step=step)

    def _log(self, trainer: Any) -> dict[str, float] | None:
        self._last_logged_step = trainer.global_step
        if not trainer.is_global_zero or not (trainer.loggers or self.progress_bar):
            return None
        metrics = self.metrics()
        if not metrics:
            return None
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self._logs_written += 1
        if self.histogram_every_n_logs and trainer.loggers and self._logs_written % self.histogram_every_n_logs == 0:
            from .tensorboard_layout import write_histograms, write_shares

            write_histograms(trainer.loggers, self.trackers, trainer.global_step)
            write_shares(trainer.loggers, self.trackers, trainer.global_step)
        return metrics

    def metrics(self) -> dict[str, float]:
        """The flat ``{"adamtype/<group>/<key>": value}`` mapping that is logged."""
        return {
            f"{TAG_PREFIX}/{group}/{key}": float(value)
            for group, values in self.compute().items()
            for key, value in values.items()
        }

    def compute(self) -> dict[str, dict[str, float]]:
        """``{group name: {key: value}}`` over all optimizers (see :meth:`ConditionTracker.compute`)."""
        out: dict[str, dict[str, float]] = {}
        for tracker in self.trackers:
            out.update(tracker.compute())
        return out

    # ------------------------------------------------------------------ checkpointing
    @_fail_safe(default=dict)
    def state_dict(self) -> dict[str, Any]:
        if not self.trackers and self._pending_state is not None:
            return dict(self._pending_state)
        return {
            "version": 1,
            "trackers": {tracker.name: tracker.state_dict() for tracker in self.trackers},
            "last_logged_bucket": self._last_logged_bucket,
            "last_logged_step": self._last_logged_step,
        }

    def __getstate__(self) -> dict[str, Any]:
        """A copy (``copy.deepcopy``, pickling) is detached: it holds no tracker, only this one's state, which it
        applies at its next ``fit`` (as a checkpoint would)."""
        # (Lightning binds ``log``/``log_dict`` to the LightningModule at each fit: a copy carries no module)
        state = {k: v for k, v in self.__dict__.items() if k not in ("log", "log_dict")}
        state["_pending_state"] = self.state_dict()
        state["trackers"] = []
        state["_copied"] = True
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if state.get("_copied"):
            warnings.warn(
                "lightning_adamtype: this AdamTypeMonitor is a copy and is detached from the optimizers; compute() "
                "gives {} until its next fit, which continues from the copied state",
                UserWarning,
                stacklevel=2,
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied in on_train_start, once the optimizers exist and their own state is restored.
        self._pending_state = dict(state_dict)
