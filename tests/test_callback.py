"""The Lightning callback: logging to TensorBoard, several optimizers, manual optimization, resume."""

from __future__ import annotations

import math
import os

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from lightning_adamtype import AdamTypeMonitor, ConditionTracker  # noqa: E402
from lightning_runs import TinyModel, make_data, make_trainer  # noqa: E402

KEYS = ("steps", "a", "b", "c", "c2", "variance_ratio", "bias_ratio")


def test_tensorboard_tags_are_written_and_finite(tmp_path):
    monitor = AdamTypeMonitor(log_every_n_steps=2)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer = make_trainer(tmp_path, [monitor], logger=logger)
    trainer.fit(TinyModel(), make_data())

    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for group in ("Adam/pg0", "Adam/head"):
        for key in KEYS:
            tag = f"adamtype/{group}/{key}"
            assert tag in tags, f"{tag} missing from {sorted(tags)}"
            events = acc.Scalars(tag)
            assert [e.step for e in events] == [2, 4, 6, 8, 10, 12]
            assert all(math.isfinite(e.value) for e in events)
    steps = acc.Scalars("adamtype/Adam/pg0/steps")
    assert [e.value for e in steps] == [2, 4, 6, 8, 10, 12]
    final = monitor.compute()
    assert final["Adam/head"]["a"] == pytest.approx(acc.Scalars("adamtype/Adam/head/a")[-1].value, rel=1e-6)
    assert final["Adam/pg0"]["c"] > 0 and final["Adam/pg0"]["b"] > 0


def test_default_interval_is_the_trainers(tmp_path):
    monitor = AdamTypeMonitor()
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer = make_trainer(tmp_path, [monitor], logger=logger, log_every_n_steps=5)
    trainer.fit(TinyModel(), make_data())
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    # every 5 steps, and the final step at the end of training
    assert [e.step for e in acc.Scalars("adamtype/Adam/pg0/a")] == [5, 10, 12]


@pytest.mark.parametrize("optimizer", ["adam", "adam-wd"])
def test_matches_a_plain_tracker(tmp_path, optimizer):
    """The callback's numbers are the core tracker's numbers on the same run (Lightning steps with a closure;
    the plain loop without one)."""
    monitor = AdamTypeMonitor()
    make_trainer(tmp_path, [monitor]).fit(TinyModel(optimizer), make_data())

    model = TinyModel(optimizer)
    opt_conf = model.configure_optimizers()
    opt, sched = opt_conf["optimizer"], opt_conf["lr_scheduler"]["scheduler"]
    tracker = ConditionTracker(opt)
    for batch_idx, batch in zip(range(12), make_data()):
        opt.zero_grad()
        model.training_step(batch, batch_idx).backward()
        opt.step()
        sched.step()
    expected = tracker.compute()
    got = monitor.compute()
    for group in expected:
        for key in KEYS:
            assert got[group][key] == pytest.approx(expected[group][key], rel=1e-9), (group, key)


class TwoOptimizerManual(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(8, 1)
        self.b = torch.nn.Linear(8, 1)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_a, opt_b = self.optimizers()
        for opt, layer in ((opt_a, self.a), (opt_b, self.b)):
            opt.zero_grad()
            self.manual_backward(torch.nn.functional.mse_loss(layer(x), y))
            opt.step()

    def configure_optimizers(self):
        return torch.optim.Adam(self.a.parameters(), lr=1e-2), torch.optim.Adam(self.b.parameters(), lr=1e-2)


def test_two_optimizers_manual_optimization(tmp_path):
    monitor = AdamTypeMonitor(log_every_n_steps=1)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    make_trainer(tmp_path, [monitor], logger=logger, limit_train_batches=6).fit(TwoOptimizerManual(), make_data())
    result = monitor.compute()
    assert set(result) == {"Adam/pg0", "Adam-1/pg0"}
    assert result["Adam/pg0"]["steps"] == 6 and result["Adam-1/pg0"]["steps"] == 6
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    assert "adamtype/Adam-1/pg0/bias_ratio" in acc.Tags()["scalars"]


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    monitor = AdamTypeMonitor()
    make_trainer(tmp_path, [monitor], accumulate_grad_batches=3).fit(TinyModel(), make_data())
    assert monitor.compute()["Adam/pg0"]["steps"] == 4  # 12 batches / 3


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    """Crash after 2 epochs (8 steps), resume from the checkpoint: the curves end where an uninterrupted run's do."""
    common = dict(limit_train_batches=4, max_epochs=3)
    full = AdamTypeMonitor()
    make_trainer(tmp_path / "full", [full], **common).fit(TinyModel(), make_data())

    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    first = AdamTypeMonitor()
    make_trainer(tmp_path / "a", [first, ckpt_cb], limit_train_batches=4, max_epochs=2, enable_checkpointing=True).fit(
        TinyModel(), make_data()
    )
    ckpt = [f for f in os.listdir(tmp_path / "ckpt") if "step=8" in f]
    assert ckpt, os.listdir(tmp_path / "ckpt")
    assert first.compute()["Adam/pg0"]["steps"] == 8

    resumed = AdamTypeMonitor()
    make_trainer(tmp_path / "b", [resumed], **common).fit(TinyModel(), make_data(), ckpt_path=str(tmp_path / "ckpt" / ckpt[0]))
    expected, got = full.compute(), resumed.compute()
    assert expected.keys() == got.keys()
    for group in expected:
        assert got[group]["steps"] == 12
        assert got[group]["c"] > first.compute()[group]["c"]
        for key, value in expected[group].items():
            assert got[group][key] == pytest.approx(value, rel=1e-9, abs=1e-15, nan_ok=True), (group, key)


def test_unmappable_optimizer_warns_and_trains(tmp_path):
    class LBFGSModel(TinyModel):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=2)

    model = LBFGSModel()
    before = model.head.weight.detach().clone()
    monitor = AdamTypeMonitor()
    with pytest.warns(UserWarning, match="LBFGS.*register_adapter"):
        make_trainer(tmp_path, [monitor], limit_train_batches=3).fit(model, make_data())
    assert not torch.equal(before, model.head.weight)
    assert monitor.compute() == {}


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", True])
def test_bad_interval_is_refused(bad):
    with pytest.raises(ValueError, match="log_every_n_steps"):
        AdamTypeMonitor(log_every_n_steps=bad)


def test_accepted_by_every_installed_lightning_trainer():
    for module in ("pytorch_lightning", "lightning.pytorch"):
        mod = pytest.importorskip(module) if module == "pytorch_lightning" else None
        if mod is None:
            try:
                import lightning.pytorch as mod  # type: ignore[no-redef]
            except ImportError:
                continue
        assert isinstance(AdamTypeMonitor(), mod.Callback)


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_sharded_strategy_is_refused_at_setup(strategy):
    class FakeTrainer:  # only the strategy's class name matters to the check; no process group is started
        pass

    FakeTrainer.strategy = type(strategy, (), {})()
    with pytest.raises(RuntimeError, match=f"{strategy}.*shard"):
        AdamTypeMonitor().setup(FakeTrainer(), None, "fit")


@pytest.mark.parametrize("strategy", ["ModelParallelStrategy", "DDPStrategy", "SingleDeviceStrategy"])
def test_strategies_the_trackers_can_read_are_accepted_at_setup(strategy):
    class FakeTrainer:
        pass

    FakeTrainer.strategy = type(strategy, (), {})()
    AdamTypeMonitor().setup(FakeTrainer(), None, "fit")  # no error
