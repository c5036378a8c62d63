"""Performance benchmark of lightning_adamtype's hot path, on the CPU or on a CUDA GPU.

Measures, in ONE run, with alternating repetitions (bare, tracked, bare, tracked, ...) and medians:

1. the tracker's cost per optimizer step relative to the optimizer's own ``step()``
   (Adam foreach, Adam fused, AdamW, Adagrad; fixed random gradients in 10 tensors; 1M and 10M parameters on
   the CPU, 10M and 100M on a GPU);
2. end-to-end Lightning training throughput with and without ``AdamTypeMonitor``: a small CNN on the CPU, the
   CIFAR ResNet-18 of ``examples/cifar10.py`` at batch 128 on a GPU (synthetic data in both cases);
3. the extra persistent memory the tracker holds (bytes per parameter; on a GPU also the extra peak of one step);
4. host reads (Tensor.item / tolist / __bool__ / __float__ / __int__) the tracker makes on steps that are not
   trend-sample steps; on a GPU those steps also run under ``torch.cuda.set_sync_debug_mode("error")``.

Usage::

    python benchmarks/bench.py --out benchmarks/results.md                    # CPU, all sections
    python benchmarks/bench.py --device cuda --out benchmarks/results-gpu.md  # GPU
    python benchmarks/bench.py --quick                                        # smoke run
    python benchmarks/bench.py --only step --modes default foreach            # parts, modes (run times: README)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch

from lightning_adamtype import ConditionTracker, TrendOptions

# ---------------------------------------------------------------------------------------------- helpers


def make_params(total: int, n_tensors: int = 10, seed: int = 0, device: str = "cpu") -> list[torch.nn.Parameter]:
    """``n_tensors`` float32 parameters with ``total`` coordinates in all, each with a fixed random grad."""
    g = torch.Generator(device=device).manual_seed(seed)
    sizes = [total // n_tensors] * n_tensors
    sizes[-1] += total - sum(sizes)
    params = []
    for n in sizes:
        p = torch.nn.Parameter(torch.randn(n, generator=g, device=device))
        p.grad = torch.randn(n, generator=g, device=device)
        params.append(p)
    return params


def synchronize(device: str) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU needs nothing)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


OPTIMIZERS = {
    "Adam (foreach)": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
    "Adam (fused)": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
    "AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2, foreach=True),
    "Adagrad (foreach)": lambda ps: torch.optim.Adagrad(ps, lr=1e-2, foreach=True),
    "NAdam (foreach)": lambda ps: torch.optim.NAdam(ps, lr=1e-3, foreach=True),
}


def modes_for(device: str) -> dict[str, dict]:
    """The tracker configurations measured side by side (ConditionTracker / AdamTypeMonitor keyword arguments):
    ``kernel="auto"`` (the default: the native C kernel on CPU groups, the Triton kernels on CUDA groups, each where
    it can run, else the foreach backend) and ``kernel="foreach"`` (the multi-tensor reference), each with η_{t−1}
    stored (the default) and recomputed from the optimizer state, and the default with ``observe_every=8``.
    (``kernel="native"`` / ``"triton"`` name the backend "auto" already takes on that device; the tables say which
    backend each mode ran.)"""
    one_pass = "Triton" if torch.device(device).type == "cuda" else "native"
    return {
        f"default ({one_pass})": {},
        f"recomputed ({one_pass})": dict(previous_stepsize="recomputed"),
        "foreach": dict(kernel="foreach"),
        "foreach, recomputed": dict(kernel="foreach", previous_stepsize="recomputed"),
        "observe_every=8": dict(observe_every=8),
    }


def ran(tracker: ConditionTracker) -> str:
    """The backend(s) the tracker's groups ran at their latest observed step ("native", "triton", "foreach")."""
    return "+".join(sorted(set(tracker.backends().values()))) or "—"


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# ---------------------------------------------------------------------------------------------- 1. step cost


@dataclass
class StepRow:
    optimizer: str
    numel: int
    mode: str
    bare_ms: float
    tracked_ms: float
    bare_spread: float
    tracked_spread: float
    hook_ratio: float = float("nan")  # median over repetitions of (time inside the hooks / the bare step), same rep
    backend: str = ""  # the backend the tracked optimizer's group ran

    @property
    def cost_ms(self) -> float:
        return self.tracked_ms - self.bare_ms

    @property
    def ratio(self) -> float:
        return self.cost_ms / self.bare_ms


def _time_steps(opt: torch.optim.Optimizer, steps: int, device: str = "cpu") -> float:
    """ms per ``opt.step()``, averaged over ``steps`` back-to-back steps (on a GPU: from the queue empty to the
    queue drained, so the device time counts, not only the launches)."""
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    synchronize(device)
    return (time.perf_counter() - t0) / steps * 1e3


class _PatchedHooks:
    """Replaces the monitor's hooks on their classes (before the trackers bind them) with ``self._wrap(original,
    name)`` inside a ``with`` block, and puts them back after. Subclasses say what the wrapper does."""

    def __enter__(self):
        from lightning_adamtype import AdamTypeMonitor

        hooks = [(ConditionTracker, "_pre_step"), (ConditionTracker, "_post_step"), (AdamTypeMonitor, "on_train_batch_end")]
        self._saved = [(cls, name, getattr(cls, name)) for cls, name in hooks]
        for cls, name, original in self._saved:
            setattr(cls, name, self._wrap(original, name))
        return self

    def _wrap(self, original, name: str):
        raise NotImplementedError

    def __exit__(self, *exc) -> None:
        for cls, name, original in self._saved:
            setattr(cls, name, original)


class HookTimer(_PatchedHooks):
    """Sums the wall time spent inside the trackers' pre- and post-step hooks (:attr:`seconds`; reset it at will).
    On a GPU that is host time: the launches, not the kernels."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def _wrap(self, original, name: str):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed


def bench_step(name: str, numel: int, reps: int, steps: int, warmup: int = 3, modes=None, device: str = "cpu") -> list[StepRow]:
    """Alternate ``steps`` bare steps and ``steps`` tracked steps of each mode, ``reps`` times; medians of ms; and,
    per repetition, the time inside the tracker's hooks over the bare step of the same repetition."""
    modes = modes or modes_for(device)
    make = OPTIMIZERS[name]
    with HookTimer() as hooks:
        bare = make(make_params(numel, device=device))
        tracked = {mode: make(make_params(numel, device=device)) for mode in modes}
        trackers = {mode: ConditionTracker(opt, **modes[mode]) for mode, opt in tracked.items()}
        _time_steps(bare, warmup, device)
        for opt in tracked.values():
            _time_steps(opt, warmup, device)  # includes the native kernel's first load / Triton's first compile
        b: list[float] = []
        t: dict[str, list[float]] = {mode: [] for mode in modes}
        inside: dict[str, list[float]] = {mode: [] for mode in modes}
        for _ in range(reps):
            b.append(_time_steps(bare, steps, device))
            for mode, opt in tracked.items():
                hooks.seconds = 0.0
                t[mode].append(_time_steps(opt, steps, device))
                inside[mode].append(hooks.seconds / steps * 1e3 / b[-1])
    rows = []
    for mode, times in t.items():
        assert trackers[mode].observations == warmup + reps * steps
        rows.append(
            StepRow(name, numel, mode, median(b), median(times), (max(b) - min(b)) / median(b),
                    (max(times) - min(times)) / median(times), median(inside[mode]), ran(trackers[mode]))
        )
    del bare, tracked, trackers
    return rows


# ---------------------------------------------------------------------------------------------- 2. end to end


class MonitorClock(_PatchedHooks):
    """Times, per training iteration, everything the monitor runs: the tracker's pre- and post-step hooks and the
    callback's ``on_train_batch_end`` (which writes the logs). The hooks are patched on the classes before the
    trackers bind them; two ``perf_counter`` calls per hook (~0.1 µs) are the clock's own cost.
    ``seconds[i]`` is the monitor's time in iteration i (closed at each ``on_train_batch_end``)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._current = 0.0

    def _wrap(self, original, name: str):
        closes = name == "on_train_batch_end"

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._current += time.perf_counter() - t0
                if closes:
                    self.seconds.append(self._current)
                    self._current = 0.0

        return timed


class MonitorGate(_PatchedHooks):
    """Runs the monitor's hooks (tracker pre/post-step, the callback's batch-end hook) only while :attr:`on`; when off
    they return at once (the tracker neither reads nor counts that step). Lets one training run alternate blocks of
    iterations with and without the monitor, so that drift of the machine's speed between runs cancels out."""

    def __init__(self) -> None:
        self.on = True

    def _wrap(self, original, name: str):
        def gated(*args, **kwargs):
            return original(*args, **kwargs) if self.on else None

        return gated


def small_cnn() -> torch.nn.Module:
    """The CPU end-to-end model: conv 3→32→64, linear 4096→10 on 3×32×32 inputs (62k parameters in 6 tensors)."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(64 * 8 * 8, 10),
    )


#: iterations per block in the interleaved runs (with, without, with, ...)
INTERLEAVE_BLOCK = 10


def bench_end_to_end(
    reps: int, steps: int, skip: int = 10, modes=None, device: str = "cpu"
) -> tuple[dict[str, list[tuple[float, ...]]], dict[str, str]]:
    """Samples/s without AdamTypeMonitor and with it in each mode, alternated: on the CPU a small CNN (3×32×32,
    batch 64, Adam), on a GPU the CIFAR ResNet-18 of ``examples/cifar10.py`` (batch 128, Adam, batches already on
    the device). Returns ``{"without": [(samples/s over the whole run, from the median iteration, in-situ share),
    ...], mode: [(..., interleaved slowdown), ...], "without (control)": [...]}`` and ``{mode: backend that ran}``."""
    try:
        import pytorch_lightning as pl
    except ImportError:  # pragma: no cover
        import lightning.pytorch as pl  # type: ignore[no-redef]
    from pytorch_lightning.loggers import TensorBoardLogger

    from lightning_adamtype import AdamTypeMonitor

    modes = modes or modes_for(device)
    on_gpu = torch.device(device).type == "cuda"
    batch = 128 if on_gpu else 64
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch * 16, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch * 16,), generator=g)
    if on_gpu:
        # 16 batches resident on the GPU: no loader or host-to-device copy in the timed loop
        data = _Resident([(xb.to(device), yb.to(device)) for xb, yb in zip(x.split(batch), y.split(batch))])
        torch.backends.cudnn.benchmark = True
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
        from cifar10 import CifarResNet

        make_net = lambda: CifarResNet("resnet18")  # noqa: E731
    else:
        data = torch.utils.data.TensorDataset(x, y)
        make_net = small_cnn

    class CNN(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_net()

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            return torch.nn.functional.cross_entropy(self.net(xb), yb)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    gate: MonitorGate | None = None
    backends_ran: dict[str, str] = {}

    class Clock(pl.Callback):
        """Wall time of every training iteration after batch ``skip`` (batch end to batch end: data, forward,
        backward, optimizer step with the tracker's hooks, callbacks). On a GPU the first and the last stamp wait
        for the queue to drain, so the total time is the device's; the stamps between are host times, which track
        the device once the launch queue is full."""

        def __init__(self) -> None:
            self.stamps: list[float] = []
            self.monitored: list[bool] = []  # per stamp: was the monitor on during the batch it closes

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if gate is not None:  # interleaved runs: blocks of INTERLEAVE_BLOCK iterations without, with, ...
                gate.on = trainer.global_step < skip or (trainer.global_step - skip) // INTERLEAVE_BLOCK % 2 == 1

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step >= skip:
                if trainer.global_step in (skip, skip + steps):
                    synchronize(device)
                self.stamps.append(time.perf_counter())
                self.monitored.append(gate is None or gate.on)

    def run(mode: str | None, logdir: str) -> tuple[float, float, float]:
        torch.manual_seed(0)
        clock = Clock()
        monitor = AdamTypeMonitor(**modes[mode]) if mode is not None else None
        callbacks = [clock] + ([monitor] if monitor is not None else [])
        trainer = pl.Trainer(
            max_steps=skip + steps,
            accelerator="gpu" if on_gpu else "cpu",
            devices=1,
            callbacks=callbacks,
            logger=TensorBoardLogger(logdir, name="bench"),
            log_every_n_steps=50,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        loader = data if on_gpu else torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, num_workers=0)
        with MonitorClock() as inside:
            trainer.fit(CNN(), loader)
        if monitor is not None:
            backends_ran[mode] = "+".join(sorted({ran(t) for t in monitor.trackers}))
        stamps = clock.stamps
        iterations = [b - a for a, b in zip(stamps, stamps[1:])]
        total = stamps[-1] - stamps[0]
        monitor = sum(inside.seconds[len(inside.seconds) - len(iterations) :])  # the timed iterations only
        return (len(stamps) - 1) * batch / total, batch / median(iterations), monitor / (total - monitor)

    def interleaved(mode: str, logdir: str) -> float:
        """One run alternating blocks without and with the monitor: median iteration with / without − 1."""
        nonlocal gate
        clock = Clock()
        trainer = pl.Trainer(
            max_steps=skip + steps, accelerator="gpu" if on_gpu else "cpu", devices=1,
            callbacks=[clock, AdamTypeMonitor(**modes[mode])], logger=TensorBoardLogger(logdir, name="bench"),
            log_every_n_steps=50, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        )
        loader = data if on_gpu else torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, num_workers=0)
        torch.manual_seed(0)
        with MonitorGate() as gate:
            trainer.fit(CNN(), loader)
        gate = None
        times = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
        flags = clock.monitored[1:]
        with_ = median([t for t, f in zip(times, flags) if f])
        without = median([t for t, f in zip(times, flags) if not f])
        return with_ / without - 1

    # "without (control)" is a second arm without the monitor: its "slowdown" is the noise floor of the method.
    arms = ["without", *modes, "without (control)"]
    runs: dict[str, list[tuple[float, ...]]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        run(None, tmp)  # warm-up (imports, first-call overheads)
        for mode in modes:
            run(mode, tmp)  # and compilation
        for rep in range(reps):
            order = arms[rep % len(arms):] + arms[: rep % len(arms)]  # rotate: no arm always runs first
            for arm in order:
                if arm.startswith("without"):
                    runs[arm].append(run(None, tmp))
                else:
                    runs[arm].append((*run(arm, tmp), interleaved(arm, tmp)))
    return runs, backends_ran


class _Resident:
    """Batches already on the device, one epoch per pass (a plain list would read as several dataloaders)."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@contextlib.contextmanager
def _quiet():
    import logging

    names = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, lv in zip(loggers, levels):
                lg.setLevel(lv)


# ---------------------------------------------------------------------------------------------- 3. memory


def _storages(tensors) -> dict[tuple[int, int], int]:
    """{(address, bytes): bytes} of the storages behind ``tensors`` (a storage shared by several views counts once)."""
    out = {}
    for t in tensors:
        storage = t.untyped_storage()
        out[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
    return out


def bench_memory(name: str, numel: int, steps: int = 17, device: str = "cpu", **tracker_kwargs) -> tuple[int, int, int, str]:
    """The most (bytes of its own, bytes it references that the optimizer owns, tensors) the tracker holds between
    two steps, over ``steps`` steps (17: two full cycles of ``observe_every=8``, which keeps η_{t−1} only between
    steps t − 1 and t), and the backend that ran. "The optimizer's": storages of the parameters, their gradients and
    the optimizer's state, which a tracker referencing them does not add (``tracker.held_bytes()`` counts them)."""
    opt = OPTIMIZERS[name](make_params(numel, device=device))
    tracker = ConditionTracker(opt, **tracker_kwargs)
    most = (0, 0, 0)
    for _ in range(steps):
        opt.step()
        theirs = _storages(
            [p for g in opt.param_groups for p in g["params"]]
            + [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            + [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        )
        held = _storages(tracker.held_tensors())
        own = sum(n for k, n in held.items() if k not in theirs)
        most = max(most, (own, sum(held.values()) - own, len(tracker.held_tensors())))
    return (*most, ran(tracker))


def bench_peak(name: str, numel: int, device: str, steps: int = 3, **tracker_kwargs) -> int:
    """CUDA only: bytes by which one tracked ``opt.step()`` raises the allocator's peak above what is allocated
    before it, minus the same for a bare step (the tracker's transient working memory)."""
    peaks = []
    for tracked in (False, True):
        opt = OPTIMIZERS[name](make_params(numel, device=device))
        tracker = ConditionTracker(opt, **tracker_kwargs) if tracked else None
        for _ in range(steps):
            opt.step()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - before)
        del opt, tracker
        torch.cuda.empty_cache()
    return peaks[1] - peaks[0]


# ---------------------------------------------------------------------------------------------- 4. host reads

READS = ("item", "tolist", "__bool__", "__float__", "__int__")


class HostReadCounter:
    """Counts calls of Tensor.item/tolist/__bool__/__float__/__int__ while ``active``, by kind of tensor."""

    def __init__(self) -> None:
        self.active = False
        self.calls: list[torch.Tensor] = []
        self._saved: dict[str, tuple[bool, object]] = {}

    def __enter__(self) -> "HostReadCounter":
        for name in READS:
            own = name in torch.Tensor.__dict__
            original = getattr(torch.Tensor, name)
            self._saved[name] = (own, torch.Tensor.__dict__.get(name))

            def wrapper(t, *a, _orig=original, **k):
                if self.active:
                    self.calls.append(t)
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc) -> None:
        for name, (own, value) in self._saved.items():
            if own:
                setattr(torch.Tensor, name, value)
            else:
                delattr(torch.Tensor, name)


def bench_host_reads(
    name: str, numel: int = 10_000, steps: int = 48, device: str = "cpu", **tracker_kwargs
) -> tuple[int, int, int, int, str, str]:
    """(bare optimizer's reads, tracked run's reads, of which on the optimizer's own 0-dim CPU step/lr tensors,
    other reads, what ``torch.cuda.set_sync_debug_mode("error")`` said of the tracked steps, the backend that ran)
    over steps 2..steps+1, none of them a trend-sample step (TrendOptions(warmup=1000))."""
    counts = []
    backend = "—"
    sync_debug = {}
    on_gpu = torch.device(device).type == "cuda"
    for tracked in (False, True):
        opt = OPTIMIZERS[name](make_params(numel, seed=1, device=device))
        tracker = ConditionTracker(opt, trend=TrendOptions(warmup=1000), **tracker_kwargs) if tracked else None
        opt.step()  # step 1: lazy state
        synchronize(device)
        with HostReadCounter() as rec, _sync_debug_error(on_gpu):
            rec.active = True
            try:
                for _ in range(steps):
                    opt.step()
                sync_debug[tracked] = "no synchronisation" if on_gpu else "—"
            except RuntimeError as error:  # raised by the sync debug mode
                sync_debug[tracked] = f"raised: {str(error).splitlines()[0][:80]}"
            rec.active = False
        allowed = {id(s["step"]) for s in opt.state.values() if isinstance(s.get("step"), torch.Tensor)}
        allowed |= {id(g["lr"]) for g in opt.param_groups if isinstance(g["lr"], torch.Tensor)}
        on_counters = sum(1 for t in rec.calls if id(t) in allowed and t.dim() == 0 and t.device.type == "cpu")
        counts.append((len(rec.calls), on_counters))
        if tracker is not None:
            backend = ran(tracker)
        del tracker
    (bare_total, bare_counters), (tr_total, tr_counters) = counts
    extra = tr_total - bare_total
    extra_counters = tr_counters - bare_counters
    said = sync_debug[True] if sync_debug[False] in ("—", "no synchronisation") else f"bare optimizer {sync_debug[False]}"
    return bare_total, tr_total, extra_counters, extra - extra_counters, said, backend


@contextlib.contextmanager
def _sync_debug_error(active: bool):
    """``torch.cuda.set_sync_debug_mode("error")`` inside the block when ``active``: any synchronising call raises."""
    if not active:
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


# ---------------------------------------------------------------------------------------------- report


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    gpu = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), " if torch.cuda.is_available() else ""
    return (
        f"{gpu}{model}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}"
    )


def _loadavg() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def fmt_n(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="also write the markdown report to this file")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the parameters and the model live")
    ap.add_argument("--quick", action="store_true", help="few repetitions (smoke run, ~30 s)")
    ap.add_argument("--reps", type=int, default=None, help="alternating repetitions per row (default 7, quick 3)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's default); 1 is steadier on a loaded machine")
    ap.add_argument("--only", choices=("step", "e2e", "memory", "syncs"), action="append", help="run only these parts")
    ap.add_argument("--modes", nargs="+", default=None, metavar="MODE",
                    help="tracker modes to run, by name or the start of one (e.g. default foreach); default: all of "
                         "'default (native|Triton)', 'recomputed (...)', 'foreach', 'foreach, recomputed', 'observe_every=8'")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available on this machine (torch.cuda.is_available() is False)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    on_gpu = device == "cuda"
    where = "GPU" if on_gpu else "CPU"
    reps = args.reps or (3 if args.quick else 7)
    parts = set(args.only or ("step", "e2e", "memory", "syncs"))
    modes = modes_for(device)
    if args.modes:
        picked = {k for m in args.modes for k in ([m] if m in modes else [k for k in modes if k.startswith(m)])}
        unknown = [m for m in args.modes if not any(k.startswith(m) for k in modes)]
        if unknown:
            ap.error(f"--modes: no mode starts with {', '.join(map(repr, unknown))}; modes: {', '.join(modes)}")
        modes = {k: v for k, v in modes.items() if k in picked}
    t_start = time.perf_counter()
    load0 = _loadavg()
    command = " ".join(["python", "benchmarks/bench.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [f"Machine: {machine()}", "", f"Command: `{command}`", ""]

    def emit(s: str = "") -> None:
        lines.append(s)
        print(s, flush=True)

    for s in lines:
        print(s, flush=True)

    if "step" in parts:
        target = "0.4 for Adam (foreach) at 10M on a GPU" if on_gpu else "0.5 for Adam (foreach) at 10M on the CPU"
        timing = ("each timed block starts and ends with `torch.cuda.synchronize()`, so device time counts"
                  if on_gpu else "wall time")
        emit(f"### 1. Tracker cost per optimizer step ({where}, 10 tensors, fixed random grads)")
        emit()
        emit(f"Alternating repetitions (bare, tracked) × {reps}; medians of ms per `opt.step()` ({timing}). "
             f"Cost = tracked − bare; ratio = cost / bare. Target: ratio ≤ {target}. In the hooks: the time spent "
             "inside the tracker's hooks during each tracked repetition over the bare step of the same repetition "
             "(median over repetitions): side by side, so steadier than the difference of two noisy medians"
             + ("; on a GPU it is host time only (launches), so the ratio column is the one that counts there" if on_gpu
                else "; it leaves out what the hooks cost the optimizer's own next step (caches they evict)") + ".")
        emit()
        emit("| optimizer | params | tracker mode | backend | device | bare step (ms) | with tracker (ms) | "
             "tracker cost (ms) | ratio | in the hooks / bare step | spread bare / tracked |")
        emit("|---|---|---|---|---|---|---|---|---|---|---|")
        sizes = ((10_000_000, 5 if args.quick else 20), (100_000_000, 3 if args.quick else 10)) if on_gpu else (
            (1_000_000, 4 if args.quick else 10), (10_000_000, 2 if args.quick else 4))
        for numel, steps in sizes:
            for name in OPTIMIZERS:
                for r in bench_step(name, numel, reps, steps, modes=modes, device=device):
                    emit(f"| {name} | {fmt_n(numel)} | {r.mode} | {r.backend} | {where} | {r.bare_ms:.3f} | {r.tracked_ms:.3f} | "
                         f"{r.cost_ms:.3f} | **{r.ratio:.2f}×** | {r.hook_ratio:.2f}× | "
                         f"{r.bare_spread:.0%} / {r.tracked_spread:.0%} |")
        emit()

    if "memory" in parts:
        emit(f"### 3. Extra memory held by the tracker ({where})")
        emit()
        emit("Sum of storage bytes of every tensor the tracker keeps between steps (previous η, accumulators, "
             "trend-detector buffers, launch tables), the most over 17 steps, leaving out the storages it only "
             "references that the optimizer owns (parameters, gradients, optimizer state: their own column). "
             "Target: ≤ 4 bytes/param."
             + (" Transient: by how much one tracked step raises the CUDA allocator's peak above the memory "
                "allocated before it, minus the same for a bare step (working buffers of the tracker's kernels)."
                if on_gpu else ""))
        emit()
        emit("| optimizer | params | tracker mode | backend | tensors held | bytes held | bytes / param | "
             "referenced, the optimizer's (bytes / param) |" + (" transient peak (bytes / param) |" if on_gpu else ""))
        emit("|---|---|---|---|---|---|---|---|" + ("---|" if on_gpu else ""))
        for numel in ((10_000_000, 100_000_000) if on_gpu else (1_000_000, 10_000_000)):
            for name in ("Adam (foreach)", "AdamW (foreach)", "Adagrad (foreach)"):
                for mode, kwargs in modes.items():
                    nbytes, theirs, ntensors, backend = bench_memory(name, numel, device=device, **kwargs)
                    peak = f" {bench_peak(name, numel, device, **kwargs) / numel:.3f} |" if on_gpu else ""
                    emit(f"| {name} | {fmt_n(numel)} | {mode} | {backend} | {ntensors} | {nbytes:,} | "
                         f"**{nbytes / numel:.6f}** | {theirs / numel:.6f} |{peak}")
        emit()

    if "syncs" in parts:
        emit(f"### 4. Host reads{' and synchronisations' if on_gpu else ''} on non-logging steps ({where})")
        emit()
        emit("Calls of Tensor.item / tolist / \\_\\_bool\\_\\_ / \\_\\_float\\_\\_ / \\_\\_int\\_\\_ "
             "during 48 `opt.step()` calls "
             "(steps 2–49, none a trend-sample step: `TrendOptions(warmup=1000)`), with and without the tracker. "
             "Reads of the optimizer's own 0-dim CPU `state['step']` / `lr` tensors are not device syncs (on a GPU "
             "they stay on the CPU for non-capturable optimizers); every other read would be one. Target: 0."
             + (" The same 48 steps also run under `torch.cuda.set_sync_debug_mode(\"error\")`, which raises at "
                "any synchronising CUDA call." if on_gpu else ""))
        emit()
        emit("| optimizer | tracker mode | backend | device | bare opt reads | tracked reads | extra reads of CPU step/lr counters | "
             "extra reads of anything else (syncs) |" + (" `set_sync_debug_mode(\"error\")` |" if on_gpu else ""))
        emit("|---|---|---|---|---|---|---|---|" + ("---|" if on_gpu else ""))
        for name in OPTIMIZERS:
            for mode, kwargs in modes.items():
                bare, tracked, counters, other, said, backend = bench_host_reads(name, device=device, **kwargs)
                emit(f"| {name} | {mode} | {backend} | {where} | {bare} | {tracked} | {counters} | **{other}** |"
                     + (f" {said} |" if on_gpu else ""))
        emit()

    if "e2e" in parts:
        e2e_reps = 3 if args.quick else (5 if on_gpu else 7)
        e2e_steps = 40 if args.quick else 150
        model = ("CIFAR ResNet-18 (`examples/cifar10.py`, 11.2M params), Adam, batch 128 of 3×32×32 synthetic images "
                 "resident on the GPU, float32, cudnn.benchmark; the first and last clock stamps of a run wait for the "
                 "GPU (`torch.cuda.synchronize()`), so total times are device times" if on_gpu else
                 "Small CNN (conv 3→32→64, linear 4096→10, 62k params), Adam, batch 64 of 3×32×32 synthetic")
        emit("### 2. End-to-end Lightning training throughput")
        emit()
        emit(f"{model}; "
             f"{e2e_steps} timed iterations per run after 10 warm-up steps, runs alternated × {e2e_reps} in a rotating "
             "order (no arm always first), with a second arm without the monitor as a control (its 'slowdown' is "
             "the noise floor); TensorBoardLogger in a temp dir, log_every_n_steps=50, the monitor updating every "
             "step. Two estimates per arm: from each run's median iteration time (robust to bursts from other "
             "processes; the cost of the log steps, 1 in 50, is not in it) and from each run's total time "
             "(includes them); both as the median over runs, and the median of the runs' paired ratios. "
             "In situ: in every monitored run, the wall time spent inside the monitor's hooks (tracker pre/post-step, "
             "the callback's batch-end hook with its logging) over the rest of the same iterations: a ratio taken "
             "side by side in the same iterations, which drift of the machine's speed between runs cannot move "
             "(median over runs, range). Interleaved: one more run per mode and repetition in which the monitor "
             f"is off and on in alternate blocks of {INTERLEAVE_BLOCK} iterations (its hooks return at once while "
             "off): median iteration with / without − 1, median over runs (range); it includes what the in-situ "
             "share cannot see (caches the hooks evict, allocator and garbage-collector work) and, within one "
             "run, is not moved by drift between runs"
             + ("; on a GPU this is host time (kernel launches), the device time of the tracker's kernels is in the "
                "A/B columns only" if on_gpu else "")
             + f". Target: slowdown ≤ {'1' if on_gpu else '2'} %.")
        emit()
        emit("| model | tracker mode | backend | device | without monitor (samples/s, median iteration) | with AdamTypeMonitor | "
             "slowdown from the median iteration (paired) | slowdown from total time (paired) | "
             "time inside the monitor / the rest of the iteration (in situ) | "
             f"interleaved in one run (blocks of {INTERLEAVE_BLOCK}) | "
             "runs without / with (median iteration) |")
        emit("|---|---|---|---|---|---|---|---|---|---|---|")
        runs, backends_ran = bench_end_to_end(e2e_reps, e2e_steps, device=device, modes=modes)
        wo_all = runs.pop("without")
        for mode, wi_all in runs.items():
            cells = []
            for i in (1, 0):  # 1: from the median iteration, 0: from the total time
                wo, wi = median([r[i] for r in wo_all]), median([r[i] for r in wi_all])
                paired = median([1 - b[i] / a[i] for a, b in zip(wo_all, wi_all)])
                cells.append((wo, wi, f"**{1 - wi / wo:+.1%}** ({paired:+.1%})"))
            (wo, wi, robust), (_, _, total) = cells
            shares = sorted(r[2] for r in wi_all)
            in_situ = "—" if mode.startswith("without") else f"**{median(shares):.2%}** ({shares[0]:.2%}–{shares[-1]:.2%})"
            blocks = sorted(r[3] for r in wi_all) if not mode.startswith("without") else []
            inter = f"**{median(blocks):+.1%}** ({blocks[0]:+.1%}–{blocks[-1]:+.1%})" if blocks else "—"
            emit(f"| {'ResNet-18' if on_gpu else 'small CNN'} | {mode} | {backends_ran.get(mode, '—')} | {where} | "
                 f"{wo:.0f} | {wi:.0f} | {robust} | "
                 f"{total} | {in_situ} | {inter} | "
                 f"{', '.join(f'{r[1]:.0f}' for r in wo_all)} / {', '.join(f'{r[1]:.0f}' for r in wi_all)} |")
        emit()

    emit(f"Total benchmark time: {time.perf_counter() - t_start:.0f} s; load average at start {load0}, at end "
         f"{_loadavg()} (other processes on the machine inflate and scatter the timings; see the spread column)")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0

if __name__ == "__main__":
    sys.exit(main())
