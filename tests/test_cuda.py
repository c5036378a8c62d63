"""Every tracker path on a CUDA device: the same float64 oracle, no synchronisation on non-logging steps, the
training left bitwise untouched, and the callback in a GPU ``Trainer``.

Skipped without CUDA (CI has none). The checks are plain functions of ``device`` so that they can also be run on
the CPU by hand (``python -c "import test_cuda as t; t.check_matches_reference('cpu', ...)"``) when editing them;
the bitwise-untouched check is :func:`test_kernels.assert_training_untouched`.
"""

from __future__ import annotations

import pytest
import torch

from lightning_adamtype import ConditionTracker
from reference import Reference
from test_hot_path import NO_SAMPLES
from test_kernels import assert_training_untouched
from test_reference import STEPS, assert_matches, make_run, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

A, AW = torch.optim.Adam, torch.optim.AdamW

OPTIMIZERS = [
    ("adam-foreach", A, dict(lr=1e-2, foreach=True)),
    ("adam-fused-wd", A, dict(lr=1e-2, fused=True, weight_decay=0.1)),
    ("adam-capturable", A, dict(lr=1e-2, capturable=True, foreach=True)),
    ("adamw-foreach", AW, dict(lr=1e-2, weight_decay=0.1, foreach=True)),
    ("adamw-amsgrad-fused", AW, dict(lr=1e-2, amsgrad=True, betas=(0.9, 0.6), fused=True)),
    ("adagrad-foreach", torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.05, foreach=True)),
    ("rmsprop-foreach", torch.optim.RMSprop, dict(lr=1e-2, foreach=True)),
]
IDS = [o[0] for o in OPTIMIZERS]

#: tracker options × whether small groups take the concatenated path (FLAT_MAX_NUMEL) or the per-tensor kernels;
#: "auto" (the default) is the Triton path on CUDA
MODES = {
    "auto": ({}, 1 << 18),
    "auto-recomputed": ({"previous_stepsize": "recomputed"}, 1 << 18),
    "foreach-flat": ({"kernel": "foreach"}, 1 << 18),
    "foreach-per-tensor": ({"kernel": "foreach"}, 0),
    "foreach-recomputed-flat": ({"kernel": "foreach", "previous_stepsize": "recomputed"}, 1 << 18),
    "compiled-flat": ({"kernel": "compiled"}, 1 << 18),
    "compiled-per-tensor": ({"kernel": "compiled"}, 0),
    "compiled-recomputed-per-tensor": ({"kernel": "compiled", "previous_stepsize": "recomputed"}, 0),
}
#: observe_every estimates the sums from every k-th step pair, so it has no exact float64 oracle: it is checked for
#: syncs here and against the foreach path in test_group_kernels.py (which runs compiled on a GPU)
SYNC_MODES = {
    **MODES,
    "auto-observe-every-3": ({"observe_every": 3}, 1 << 18),
    "foreach-observe-every-3": ({"kernel": "foreach", "observe_every": 3}, 0),
}


def _flat_max(monkeypatch, value: int) -> None:
    import lightning_adamtype.tracker as tracker_module

    monkeypatch.setattr(tracker_module, "FLAT_MAX_NUMEL", value)


def check_matches_reference(device: str, cls, kwargs, tracker_kwargs: dict) -> dict:
    """Attached after 3 steps (so a recomputed v_{t−1} is well resolved), 11 observed steps against the oracle."""
    model, opt, sched, data = make_run(cls, kwargs, device=device)
    train(model, opt, sched, data, range(1, 4))
    tracker = ConditionTracker(opt, **tracker_kwargs)
    ref = Reference(opt)
    train(model, opt, sched, data, range(4, STEPS + 1), ref)
    got = assert_matches(tracker, ref)
    assert all(g.accumulators.device.type == torch.device(device).type for g in tracker._groups)
    return got


def check_no_sync(device: str, cls, kwargs, tracker_kwargs: dict, steps: int = 24) -> ConditionTracker:
    """Steps 2..steps+1 (none a trend-sample or log step) under ``torch.cuda.set_sync_debug_mode("error")``: any
    host–device synchronisation inside ``opt.step()`` (optimizer and tracker hooks) raises."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, device=device)) for n in (300, 40, 7)]
    opt = cls(params, **kwargs)
    tracker = ConditionTracker(opt, trend=NO_SAMPLES, **tracker_kwargs)
    grads = [[torch.randn_like(p) for p in params] for _ in range(steps + 1)]
    for p, g in zip(params, grads[0]):
        p.grad = g
    opt.step()  # step 1: lazy state (and compilation), not watched
    if device == "cuda":
        torch.cuda.synchronize()
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
    try:
        for step_grads in grads[1:]:
            for p, g in zip(params, step_grads):
                p.grad = g
            opt.step()
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode(previous)
    assert tracker.observations == steps + 1
    return tracker


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name,cls,kwargs", OPTIMIZERS, ids=IDS)
def test_every_path_matches_the_float64_reference_on_cuda(monkeypatch, name, cls, kwargs, mode):
    tracker_kwargs, flat_max = MODES[mode]
    _flat_max(monkeypatch, flat_max)
    check_matches_reference("cuda", cls, kwargs, tracker_kwargs)


@pytest.mark.parametrize("mode", list(SYNC_MODES))
@pytest.mark.parametrize("name,cls,kwargs", OPTIMIZERS, ids=IDS)
def test_non_logging_steps_never_synchronise_on_cuda(monkeypatch, name, cls, kwargs, mode):
    tracker_kwargs, flat_max = SYNC_MODES[mode]
    _flat_max(monkeypatch, flat_max)
    check_no_sync("cuda", cls, kwargs, tracker_kwargs)


def test_the_sync_check_is_not_vacuous_on_cuda():
    """A tracker that reads an accumulator on the host in its post-step hook fails ``check_no_sync``."""

    class Leaky(ConditionTracker):
        def _post_step(self, optimizer, args, kwargs):
            super()._post_step(optimizer, args, kwargs)
            float(self._groups[0].accumulators[1])

    import test_cuda

    original = test_cuda.ConditionTracker
    test_cuda.ConditionTracker = Leaky
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            check_no_sync("cuda", A, dict(lr=1e-2, foreach=True), {})
    finally:
        test_cuda.ConditionTracker = original


@pytest.mark.parametrize("mode", list(MODES))
def test_the_tracker_never_changes_the_training_on_cuda(monkeypatch, mode):
    tracker_kwargs, flat_max = MODES[mode]
    _flat_max(monkeypatch, flat_max)
    assert_training_untouched((5000, 70, 3), tracker_kwargs, device="cuda", fused=True)


def test_monitor_in_a_gpu_trainer_logs_what_a_cpu_run_logs(tmp_path):
    """AdamTypeMonitor in a Trainer on the GPU: the Triton path, logged scalars, and the measurements
    the same as a CPU run of the same model to float32 tolerance."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from lightning_adamtype import AdamTypeMonitor
    from tiny_lightning import Tiny

    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    results = {}
    for accelerator in ("cpu", "gpu"):
        monitor = AdamTypeMonitor(log_every_n_steps=4)  # "auto": Triton on the GPU
        trainer = pl.Trainer(
            accelerator=accelerator, devices=1, max_steps=12, logger=CSVLogger(tmp_path, name=accelerator),
            callbacks=[monitor], enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        )
        trainer.fit(Tiny(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16))
        results[accelerator] = monitor.compute()
        metrics = (tmp_path / accelerator).glob("version_*/metrics.csv")
        header = next(iter(metrics)).read_text().splitlines()[0]
        assert "adamtype/Adam/head/bias_ratio" in header, header[:300]
    for group, values in results["cpu"].items():
        for key, value in values.items():
            assert results["gpu"][group][key] == pytest.approx(value, rel=1e-4, abs=1e-9, nan_ok=True), (group, key)
