"""A tiny LightningModule shared by the report and TensorBoard tests (not a test module itself)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch


class Tiny(pl.LightningModule):
    """Linear → tanh → Linear, two param groups (the second named "head"); Adam or SGD with momentum."""

    def __init__(self, optimizer: str = "adam"):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 1)
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.head(torch.tanh(self.body(x))), y)

    def configure_optimizers(self):
        groups = [{"params": self.body.parameters()}, {"params": self.head.parameters(), "name": "head"}]
        if self.optimizer == "adam":
            return torch.optim.Adam(groups, lr=1e-2)
        return torch.optim.SGD(groups, lr=1e-2, momentum=0.9)
