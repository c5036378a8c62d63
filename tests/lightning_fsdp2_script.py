"""One Lightning run with ``AdamTypeMonitor`` under ``ModelParallelStrategy`` (FSDP2) for tests/test_fsdp.py.

Run as a script (Lightning's CPU launcher re-runs ``sys.argv`` for rank 1)::

    python tests/lightning_fsdp2_script.py OUT [--devices 2]

``--devices 2``: ``ModelParallelStrategy(data_parallel_size=2)``, every layer ``fully_shard``-ed in
``configure_model``; ``--devices 1``: the same model unsharded on one process. ``use_distributed_sampler=False``,
so every rank trains on the same batches and FSDP's gradient average equals the one-process gradient. Every rank
writes ``<out>/rank<r>.json`` with ``monitor.compute()``, its shard sizes and the strategy's name.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from torch.utils.data import DataLoader, TensorDataset

import pytorch_lightning as pl

from lightning_adamtype import AdamTypeMonitor


class Sharded(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(8, 7)  # 7 rows: shards of 4 and 3
        self.head = torch.nn.Linear(7, 1)  # 1 row: rank 1's shard is empty

    def configure_model(self) -> None:
        if self.trainer.world_size == 1:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.body, mesh=mesh)
        fully_shard(self.head, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.head(torch.tanh(self.body(x))), y)

    def configure_optimizers(self):
        opt = torch.optim.Adam(
            [{"params": self.body.parameters(), "weight_decay": 0.1}, {"params": self.head.parameters(), "name": "head"}],
            lr=1e-2,
        )
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.95)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()
    if args.devices > 1:
        from pytorch_lightning.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    else:
        strategy = "auto"
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(48, 8, generator=gen), torch.randn(48, 1, generator=gen))
    monitor = AdamTypeMonitor(log_every_n_steps=4)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_epochs=1,
        callbacks=[monitor],
        logger=False,
        use_distributed_sampler=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Sharded()
    trainer.fit(model, DataLoader(data, batch_size=4))
    local_rows = [getattr(p, "to_local", lambda: p)().shape[0] for p in model.parameters()]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(
            {"compute": monitor.compute(), "local_rows": local_rows, "strategy": type(trainer.strategy).__name__,
             "steps": trainer.global_step},
            f,
        )
    if args.devices > 1:
        # Both ranks have written their results; leave without the interpreter's teardown, where destroying
        # FSDP2's gloo state aborts now and then (SIGABRT) after all the work is done.
        trainer.strategy.barrier()
        os._exit(0)


if __name__ == "__main__":
    main()
