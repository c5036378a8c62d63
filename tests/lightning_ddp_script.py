"""One Lightning run with ``AdamTypeMonitor`` for tests/test_lightning_ddp.py (not a test module itself).

Run as a script, not imported: ``strategy="ddp"`` on the CPU re-launches ``sys.argv`` for every further rank
(Lightning's subprocess launcher), which needs a file it can run. Every rank writes ``<out>/rank<r>.json`` with
what the test compares: ``monitor.compute()``, each tracker's ``switched``, the optimizer's ``amsgrad`` flags, the
final parameters, the sample indices the rank trained on and the ``adamtype/...`` logger calls the callback made on
that rank. Rank zero's loggers write TensorBoard events and a CSV under ``<out>/logs``.

    python tests/lightning_ddp_script.py OUT [--devices 2] [--switch off|on|deaf] [--weight-decay 0.0]

``--switch on``: ``switch_to_amsgrad=True`` with :data:`FORCE` (a verdict that holds after a few steps, so the
switch happens inside this short run). ``deaf``: the same, but rank 1's detectors can never flag (patience out of
reach, same sampling grid: its own verdicts stay unknown), so rank 1 switches only because rank 0's decision is
broadcast to it.
``--devices 1`` is the single-process reference over the same global batches (batch size 2·BATCH); the tests run
it in their own process (:func:`main` with the arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from lightning_adamtype import AdamTypeMonitor, TrendOptions

BATCH = 4  # per rank; the single-process reference uses 2 * BATCH
BATCHES = 10  # limit_train_batches (per epoch)
EPOCHS = 2
N = 2 * BATCH * BATCHES  # every sample is seen exactly once per epoch, by exactly one rank
LOG_EVERY = 4  # the monitor logs at 4, 8, …, 20 (the last step is a log step: on_train_end must not log it again)
#: Flags after three valid samples (sampling from step 5, patience 2, any slope above −10 is a "violation"):
#: the groups switch to AMSGrad at optimizer step 9 of 20.
FORCE = TrendOptions(warmup=5, window=4, min_samples=3, margin=10.0, patience=2)
#: Same grid, but no streak reaches patience within the run: the verdict stays NaN (unknown). (Not 10**6: the grid
#: step TrendDetector.steps_needed() counts to would pass 10^308 and overflow.)
NEVER = TrendOptions(warmup=5, window=4, min_samples=3, margin=10.0, patience=1000)


class Boring(pl.LightningModule):
    """Linear → tanh → Linear in float64; two param groups (the second named), lr scheduled per step.

    ``weight_decay`` is Adam's coupled decay on the first group (0: none).
    """

    def __init__(self, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.weight_decay = weight_decay
        torch.manual_seed(0)
        self.body = torch.nn.Linear(8, 16, dtype=torch.float64)
        self.head = torch.nn.Linear(16, 1, dtype=torch.float64)
        self.seen: list[list[int]] = []  # the sample indices of every batch this rank trained on

    def training_step(self, batch, batch_idx):
        idx, x, y = batch
        self.seen.append(idx.tolist())
        return torch.nn.functional.mse_loss(self.head(torch.tanh(self.body(x))), y)

    def configure_optimizers(self):
        opt = torch.optim.Adam(
            [
                {"params": self.body.parameters(), "weight_decay": self.weight_decay},
                {"params": self.head.parameters(), "lr": 3e-3, "name": "head"},
            ],
            lr=1e-2,
            betas=(0.0, 0.9),
        )
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.97)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def data(devices: int) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 8, generator=g, dtype=torch.float64)
    y = torch.randn(N, 1, generator=g, dtype=torch.float64)
    dataset = TensorDataset(torch.arange(N), x, y)
    if devices > 1:
        # Lightning replaces the sampler of a training loader under DDP by DistributedSampler(shuffle=True, seed=0)
        # and calls set_epoch: rank r trains on positions r, r + 2, … of the epoch's permutation.
        return DataLoader(dataset, batch_size=BATCH, shuffle=False)
    # The same permutations in one process: batch k is positions 2·BATCH·k … 2·BATCH·(k + 1) − 1, i.e. the
    # union of the two ranks' batch k (Lightning calls set_epoch on this sampler too).
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    return DataLoader(dataset, batch_size=2 * BATCH, sampler=sampler)


CALLS: list[list] = []  # [logger class, step, sorted adamtype tags] of every log_metrics call on this rank


def _record(logger, metrics, step) -> None:
    tags = sorted(k for k in metrics if k.startswith("adamtype/"))
    if tags:
        CALLS.append([type(logger).__name__, step, tags])


class RecordingTB(TensorBoardLogger):
    # Not @rank_zero_only: it sees the calls made on every rank, before the base class drops them off rank zero.
    def log_metrics(self, metrics, step=None):
        _record(self, metrics, step)
        super().log_metrics(metrics, step)


class RecordingCSV(CSVLogger):
    def log_metrics(self, metrics, step=None):
        _record(self, metrics, step)
        super().log_metrics(metrics, step)


def main(argv: list[str] | None = None) -> None:
    """One run (``argv``: the command line's arguments, default ``sys.argv[1:]``); ``--devices 1`` may also be run
    in the caller's process (no launcher, nothing re-run)."""
    CALLS.clear()
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--switch", choices=("off", "on", "deaf"), default="off")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    # Lightning's launcher sets LOCAL_RANK for the processes it starts; the first one has none yet.
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.switch == "off":
        monitor = AdamTypeMonitor(log_every_n_steps=LOG_EVERY)
    else:
        trend = NEVER if args.switch == "deaf" and rank == 1 else FORCE
        monitor = AdamTypeMonitor(log_every_n_steps=LOG_EVERY, switch_to_amsgrad=True, trend=trend)
    logs = os.path.join(args.out, "logs")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=EPOCHS,
        limit_train_batches=BATCHES,
        log_every_n_steps=1,
        callbacks=[monitor],
        logger=[RecordingTB(logs, name="tb"), RecordingCSV(logs, name="csv")],
        default_root_dir=args.out,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    model = Boring(args.weight_decay)
    trainer.fit(model, data(args.devices))

    opt = trainer.optimizers[0]
    result = {
        "global_rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "strategy": type(trainer.strategy).__name__,
        "global_step": trainer.global_step,
        "compute": monitor.compute(),
        "switched": [tracker.switched for tracker in monitor.trackers],
        "tracker_names": [tracker.name for tracker in monitor.trackers],
        "amsgrad": [bool(group.get("amsgrad", False)) for group in opt.param_groups],
        "max_exp_avg_sq": [
            all("max_exp_avg_sq" in opt.state[p] for p in group["params"]) for group in opt.param_groups
        ],
        "params": {name: p.detach().flatten().tolist() for name, p in model.named_parameters()},
        "seen": model.seen,
        "logger_calls": CALLS,
    }
    with open(os.path.join(args.out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    torch.set_num_threads(threads)
    if args.devices > 1:
        # Both ranks have written their results; leave without the interpreter's teardown, where destroying
        # gloo's state aborts now and then (SIGABRT) after all the work is done (tests/gloo_ranks.py).
        trainer.strategy.barrier()
        os._exit(0)


if __name__ == "__main__":
    main()
