"""Every tracker path on a CUDA device: the same float64 oracle, no synchronisation on non-logging steps, the
training left bitwise untouched, and the callback in a GPU ``Trainer``.

Skipped without CUDA (CI has none). The checks are plain functions of ``device`` so that they can also be run on
the CPU by hand (``cd tests && python -c "import test_cuda as t; t.check_matches_reference('cpu', ...)"``) when
editing them; the bitwise-untouched check is :func:`twins.assert_training_untouched`.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import test_backends as backend_checks  # (a module: its tests are not collected again here)
from host_reads import NO_SAMPLES, leaky_adam
from lightning_adamtype import ConditionTracker, backends
from lightning_adamtype.row import ACCUMULATOR_KEYS
from reference import Reference
from runs import STEPS, assert_matches, make_run, train
from twins import assert_training_untouched

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

A, AW = torch.optim.Adam, torch.optim.AdamW

#: every one has a square-root form η = s / (sqrt(v) + e), so "auto" runs it on the one-pass backend
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

#: tracker options; "auto" (the default) is the Triton backend on CUDA (where Triton is installed)
MODES = {
    "auto": {},
    "auto-recomputed": {"previous_stepsize": "recomputed"},
    "foreach": {"kernel": "foreach"},
    "foreach-recomputed": {"kernel": "foreach", "previous_stepsize": "recomputed"},
}
#: observe_every estimates the sums from every k-th step pair, so it has no exact float64 oracle: it is checked for
#: syncs here and against the foreach backend in test_group_kernels.py
SYNC_MODES = {
    **MODES,
    "auto-observe-every-3": {"observe_every": 3},
    "foreach-observe-every-3": {"kernel": "foreach", "observe_every": 3},
}


def expected_backend(device: str, tracker_kwargs: dict) -> str:
    """The backend a square-root-form group whose parameters all have an η_{t−1} runs on under these options."""
    kernel = tracker_kwargs.get("kernel", "auto")
    if kernel == "auto":
        kernel = {"cuda": "triton", "cpu": "native"}.get(torch.device(device).type, "foreach")
    if kernel != "foreach" and backends.backend(kernel).unavailable(torch.device(device)) is not None:
        return "foreach"
    return kernel


def check_matches_reference(device: str, cls, kwargs, tracker_kwargs: dict) -> dict:
    """Attached after 3 steps (so a recomputed v_{t−1} is well resolved), 11 observed steps against the oracle."""
    model, opt, sched, data = make_run(cls, kwargs, device=device)
    train(model, opt, sched, data, range(1, 4))
    tracker = ConditionTracker(opt, **tracker_kwargs)
    ref = Reference(opt)
    train(model, opt, sched, data, range(4, STEPS + 1), ref)
    got = assert_matches(tracker, ref)
    assert all(v["measured"] == 1.0 for v in got.values())
    # the accumulators (and every other float64 buffer: detectors, launch outputs) live on the parameters' device
    held64 = [t for t in tracker.held_tensors() if t.dtype == torch.float64]
    assert sum(t.shape == (len(ACCUMULATOR_KEYS),) for t in held64) >= len(opt.param_groups)
    assert all(t.device.type == torch.device(device).type for t in held64)
    # the latest step (every parameter had a gradient at this step and the one before) ran on the expected backend
    assert set(tracker.backends().values()) == {expected_backend(device, tracker_kwargs)}, tracker.backends()
    return got


def check_no_sync(device: str, cls, kwargs, tracker_kwargs: dict, steps: int = 24) -> ConditionTracker:
    """Steps 2..steps+1 (none a trend-sample or log step) under ``torch.cuda.set_sync_debug_mode("error")``: any
    host–device synchronisation inside ``opt.step()`` (optimizer and tracker hooks) raises. The tracker's hooks
    turn an error of the tracker into a warning (training goes on), so the check also fails on any warning of the
    tracker and on a group no longer measured."""
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
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step_grads in grads[1:]:
                for p, g in zip(params, step_grads):
                    p.grad = g
                opt.step()
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode(previous)
    messages = [str(w.message) for w in caught if "lightning_adamtype" in str(w.message)]
    assert not messages, "the tracker warned during the watched steps:\n" + "\n".join(messages)
    assert tracker.attached and tracker.observations == steps + 1
    measured = tracker.compute()
    assert measured and all(v["measured"] == 1.0 for v in measured.values()), measured
    assert set(tracker.backends().values()) == {expected_backend(device, tracker_kwargs)}, tracker.backends()
    return tracker


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name,cls,kwargs", OPTIMIZERS, ids=IDS)
def test_every_path_matches_the_float64_reference_on_cuda(name, cls, kwargs, mode):
    check_matches_reference("cuda", cls, kwargs, MODES[mode])


@pytest.mark.parametrize("mode", list(SYNC_MODES))
@pytest.mark.parametrize("name,cls,kwargs", OPTIMIZERS, ids=IDS)
def test_non_logging_steps_never_synchronise_on_cuda(name, cls, kwargs, mode):
    check_no_sync("cuda", cls, kwargs, SYNC_MODES[mode])


@pytest.mark.parametrize("mode", ["auto", "foreach"])
def test_the_sync_check_is_not_vacuous_on_cuda(mode):
    """An adapter that reads a sum of the optimizer state on the host once per group and step
    (tests/host_reads.leaky_adam) synchronises: ``check_no_sync`` fails, naming the synchronisation."""
    with leaky_adam() as cls, pytest.raises(AssertionError, match="synchroniz"):
        check_no_sync("cuda", cls, dict(lr=1e-2, foreach=True), MODES[mode])


@pytest.mark.filterwarnings("ignore:.*non-finite:UserWarning")  # (the run's lr = inf step)
@pytest.mark.parametrize("coordinates", ["active", "all"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("opt_name,cls,kwargs", backend_checks.ACTIVATING, ids=[a[0] for a in backend_checks.ACTIVATING])
def test_coordinates_that_become_active_midway_on_cuda(opt_name, cls, kwargs, mode, coordinates):
    """tests/test_backends.py's run with coordinates activated midway and a non-finite step, on the GPU, against
    the same float64 oracle (every count exact)."""
    tracker_kwargs = {**MODES[mode], "coordinates": coordinates}
    backend_checks.check_activating_run("cuda", opt_name, cls, kwargs, tracker_kwargs,
                                        expected_backend("cuda", tracker_kwargs))


@pytest.mark.parametrize("previous_stepsize", ["stored", "recomputed"])
@pytest.mark.parametrize("name", ["triton", "foreach"])
def test_backend_steps_at_40M_on_cuda(name, previous_stepsize):
    """tests/test_backends.py's two steps at 40M coordinates (activations, inactive coordinates) through
    ``backend(name).run`` on the GPU, both coordinates modes: the group terms within 1e-6 of float64, the counts
    exact, the shares within 1e-6 (foreach: 1e-3)."""
    if backends.backend(name).unavailable(torch.device("cuda")) is not None:
        pytest.skip(backends.backend(name).unavailable(torch.device("cuda")))
    gradients = torch.randn(backend_checks.N_LARGE + 16 * 4099, generator=torch.Generator().manual_seed(2)) * 1e-2
    run = backend_checks.large_steps(gradients, backend_checks.LARGE_SIZES, previous_stepsize)
    for coordinates in ("active", "all"):
        for which in ("first", "second"):
            x, expected = run[which], run[f"{which}_expected"][coordinates]
            result = backends.backend(name).run(x.step(coordinates, device="cuda"))
            backend_checks.assert_terms_close(result.terms, expected, x.mode)
            backend_checks.assert_shares_close(result.per_tensor, expected, x.mode, name)
            backend_checks.assert_kept(result, x, expected)


@pytest.mark.parametrize("mode", list(MODES))
def test_the_tracker_never_changes_the_training_on_cuda(mode):
    assert_training_untouched((5000, 70, 3), MODES[mode], device="cuda", fused=True)


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
