"""Small Lightning runs shared by tests/test_callback.py and tests/test_precision.py (not a test module itself):
a tiny two-group model with an lr schedule, its data and a quiet CPU ``Trainer``."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from tiny_lightning import Tiny

__all__ = ["TinyModel", "make_data", "make_trainer"]


def make_data(n: int = 64) -> DataLoader:
    """``n`` random (x: 8, y: 1) pairs in batches of 4 (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4)


class TinyModel(Tiny):
    """:class:`tiny_lightning.Tiny` with β1 = 0, the head at its own lr, a per-step lr schedule, optionally one group."""

    def __init__(self, optimizer: str = "adam", two_groups: bool = True):
        super().__init__(optimizer)
        self.two_groups = two_groups

    def configure_optimizers(self):
        groups = (
            [{"params": self.body.parameters()}, {"params": self.head.parameters(), "lr": 3e-3, "name": "head"}]
            if self.two_groups
            else self.parameters()
        )
        if self.optimizer == "adam":
            opt = torch.optim.Adam(groups, lr=1e-2, betas=(0.0, 0.9))
        elif self.optimizer == "adam-wd":  # coupled weight decay: g = ∇ + λx needs x before the update
            opt = torch.optim.Adam(groups, lr=1e-2, betas=(0.0, 0.9), weight_decay=0.1)
        else:
            opt = torch.optim.SGD(groups, lr=1e-2, momentum=0.9)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.99)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def make_trainer(tmp_path, callbacks, **kw) -> pl.Trainer:
    """A CPU ``Trainer`` for one epoch of 12 batches, without logger, progress bar, summary or checkpoints
    (``kw`` overrides any of these)."""
    defaults = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=12,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    defaults.update(kw)
    return pl.Trainer(callbacks=callbacks, **defaults)
