"""Host time of the tracker's post-step hook, with the native kernel stubbed out (CPU).

The C call of ``kernel="native"`` (:meth:`lightning_adamtype.backends.native.GroupLaunch.call`, ctypes' argument
conversion included) is replaced, in this
process only, by a function that returns its ``out`` tensor without calling C, so what is timed is everything the
hook does on the host around the kernel: the gather of the group (gradients, optimizer state, step counters), the
eligibility checks, the (s, e) table, the launch plan and η_{t−1} bookkeeping, the accumulation bookkeeping.

One group of 1, 62 and 200 float32 tensors with the shapes of a CIFAR ResNet-18 (``examples/cifar10.py``: its 62
parameters, conv weights and small batch-norm / bias vectors, cycled for 200), fixed random gradients,
``torch.optim.Adam(foreach=True)``, ``ConditionTracker(opt, kernel="native")``. Each group is timed twice, side by
side in the same rounds: with the steady plan's checks compiled (:mod:`lightning_adamtype.backends.steady_checks`,
the default once its background build has loaded: the benchmark waits for it) and in Python
(``LIGHTNING_ADAMTYPE_STEADY_CHECKS=python``, what runs until then, or where no C++ compiler is found). Two timings
per group and mode, in µs:

- warm: ``tracker._post_step(opt, (), {})`` called back to back: the median of ``--calls`` calls (after 20), in
  ``--rounds`` rounds that go through the three groups in turn; the table gives the lowest round's median (the
  least disturbed by other processes: on a shared machine they only ever add time) and the range;
- in situ: the tracker's hooks detached (``tracker.remove()``), each iteration runs a real ``opt.step()`` and then
  times one ``tracker._post_step(opt, (), {})`` (median of ``--iterations`` after 10): the hook as it runs right
  after the optimizer's step, with the caches that step left.

    python benchmarks/host_time.py                   # the table (about 1 min on 2 cores)
    python benchmarks/host_time.py --out FILE        # also write it to FILE
    python benchmarks/host_time.py --profile         # and cProfile's top 25 (tottime) over 1000 warm calls, 62 tensors
    PYTHONPATH=/path/to/other/checkout python benchmarks/host_time.py   # another version of the package, for an A/B
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time

import torch

import lightning_adamtype
from lightning_adamtype import ConditionTracker
from lightning_adamtype.backends import native, steady_checks

#: the targets (µs, warm): 62 tensors, 200 tensors, per tensor beyond 62
TARGET_62, TARGET_200, TARGET_SLOPE = 40.0, 80.0, 0.3
COUNTS = (1, 62, 200)
#: the steady plan's checks: compiled (the default) and Python (LIGHTNING_ADAMTYPE_STEADY_CHECKS=python)
MODES = ("compiled", "python")

#: the 62 parameter shapes of examples/cifar10.py's CifarResNet("resnet18") (11.2M parameters), in order
_STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))


def resnet18_shapes() -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(64, 3, 3, 3), (64,), (64,)]
    cin = 64
    for cout, stride in _STAGES:
        for block in range(2):
            shapes += [(cout, cin, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if block == 0 and (stride != 1 or cin != cout):
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
            cin = cout
    return shapes + [(10, 512), (10,)]


class StubbedKernel:
    """Within the block, ``native.GroupLaunch.call`` (the one place the C function is called, by the general path
    and by the steady plan alike) returns without calling C; counts the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __enter__(self) -> "StubbedKernel":
        self._saved = native.GroupLaunch.call

        def call(launch, *args):
            self.calls += 1

        native.GroupLaunch.call = call  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc) -> None:
        native.GroupLaunch.call = self._saved  # type: ignore[method-assign]


class checks_mode:
    """Within the block, the steady plan checks as ``mode`` says ("compiled" or "python")."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __enter__(self) -> None:
        self._saved = os.environ.get("LIGHTNING_ADAMTYPE_STEADY_CHECKS")
        os.environ["LIGHTNING_ADAMTYPE_STEADY_CHECKS"] = self.mode

    def __exit__(self, *exc) -> None:
        if self._saved is None:
            del os.environ["LIGHTNING_ADAMTYPE_STEADY_CHECKS"]
        else:
            os.environ["LIGHTNING_ADAMTYPE_STEADY_CHECKS"] = self._saved


def tracked_group(count: int, seed: int = 0) -> tuple[torch.optim.Optimizer, ConditionTracker]:
    """Adam (foreach) on one group of ``count`` ResNet-18-shaped tensors with fixed gradients, tracked with the
    native backend, after 3 steps (the launch plan and the η buffer exist, η_{t−1} is stored)."""
    shapes = resnet18_shapes()
    g = torch.Generator().manual_seed(seed)
    params = []
    for i in range(count):
        p = torch.nn.Parameter(torch.randn(shapes[i % len(shapes)], generator=g) * 0.05)
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
        params.append(p)
    opt = torch.optim.Adam(params, lr=1e-3, foreach=True)
    tracker = ConditionTracker(opt, kernel="native")
    for _ in range(3):
        opt.step()
    ran = set(tracker.backends().values())
    if ran != {"native"}:
        raise SystemExit(f"the group ran {ran or 'nothing'}, not the native backend (is a C compiler available?)")
    for state in tracker._groups:  # the stub never writes them: give the kernel's outputs defined values, once
        launch = state.cache["native"]
        launch.out.zero_()
        launch.finite.fill_(1)
    return opt, tracker


def warm_times(tracker: ConditionTracker, opt: torch.optim.Optimizer, calls: int, skip: int = 20) -> list[float]:
    """Seconds per back-to-back call of the post-step hook."""
    post, times, clock = tracker._post_step, [], time.perf_counter
    for _ in range(skip + calls):
        t0 = clock()
        post(opt, (), {})
        times.append(clock() - t0)
    return times[skip:]


def in_situ_times(tracker: ConditionTracker, opt: torch.optim.Optimizer, iterations: int, skip: int = 10) -> list[float]:
    """Seconds of the post-step hook called right after each real (untracked) ``opt.step()``."""
    tracker.remove()  # opt.step() no longer runs the hooks; the hook is called by hand right after it
    post, times, clock = tracker._post_step, [], time.perf_counter
    for _ in range(skip + iterations):
        opt.step()
        t0 = clock()
        post(opt, (), {})
        times.append(clock() - t0)
    return times[skip:]


def us(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1e6


def revision() -> str:
    """The package's commit, and whether its files differ from it (for A/Bs between checkouts)."""
    where = os.path.dirname(os.path.abspath(lightning_adamtype.__file__))
    try:
        head = subprocess.run(["git", "-C", where, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"lightning_adamtype from {where} (not a git checkout)"
    return f"lightning_adamtype from {where} at {head}{' with local changes' if dirty else ''}"


def loadavg() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}; {revision()}")


def profile_warm(count: int = 62, calls: int = 1000, lines: int = 25) -> str:
    """cProfile's top ``lines`` functions by tottime over ``calls`` warm post-step calls on a group of ``count``."""
    with StubbedKernel():
        opt, tracker = tracked_group(count)
        warm_times(tracker, opt, 50)
        profiler = cProfile.Profile()
        post = tracker._post_step
        profiler.enable()
        for _ in range(calls):
            post(opt, (), {})
        profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(lines)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=300, help="warm calls per group and round (≥ 200; after 20 more)")
    ap.add_argument("--rounds", type=int, default=5, help="warm rounds (the lowest round's median is reported)")
    ap.add_argument("--iterations", type=int, default=200, help="in-situ iterations per group (after 10 more)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (the optimizer's step)")
    ap.add_argument("--out", help="also write the tables to this file")
    ap.add_argument("--profile", action="store_true",
                    help="also print cProfile's top 25 (tottime) for 1000 warm calls on the 62-tensor group")
    args = ap.parse_args(argv)
    if args.calls < 200:
        ap.error("--calls: at least 200")
    if args.threads:
        torch.set_num_threads(args.threads)
    reason = native.NativeBackend().unavailable(torch.device("cpu"))
    if reason is not None:
        ap.error(f"the native backend cannot run here ({reason}); this benchmark measures its host side")
    command = " ".join(["python", "benchmarks/host_time.py", *(argv if argv is not None else sys.argv[1:])])
    load0, t_start = loadavg(), time.perf_counter()
    if steady_checks.wait(600) is None:
        ap.error(f"the compiled checks cannot be built here ({steady_checks.build_info().reason})")
    rounds: dict[tuple[str, int], list[float]] = {(mode, count): [] for mode in MODES for count in COUNTS}
    situ: dict[tuple[str, int], float] = {}
    with StubbedKernel() as stub:
        groups = {count: tracked_group(count) for count in COUNTS}
        before = stub.calls
        for _ in range(args.rounds):
            for mode in MODES:
                with checks_mode(mode):
                    for count, (opt, tracker) in groups.items():
                        rounds[mode, count].append(us(warm_times(tracker, opt, args.calls)))
        for count, (opt, tracker) in groups.items():
            for mode in MODES:
                with checks_mode(mode):
                    situ[mode, count] = us(in_situ_times(tracker, opt, args.iterations))
        expected = len(COUNTS) * len(MODES) * (args.rounds * (args.calls + 20) + args.iterations + 10)
        assert stub.calls - before == expected, "a call did not reach the stubbed kernel"
        del groups
    warm = {key: min(values) for key, values in rounds.items()}
    slope = {mode: (warm[mode, 200] - warm[mode, 62]) / (200 - 62) for mode in MODES}
    slope_situ = {mode: (situ[mode, 200] - situ[mode, 62]) / (200 - 62) for mode in MODES}
    lines = [
        f"Machine: {machine()}",
        "",
        f"Command: `{command}`",
        "",
        "Post-step hook (`ConditionTracker._post_step`), Adam (foreach), `kernel=\"native\"` with the C call stubbed "
        f"out; one group of ResNet-18-shaped float32 tensors; the steady plan's checks compiled (the default) and in "
        f"Python, timed in the same rounds. Warm: the lowest of {args.rounds} rounds' medians of "
        f"{args.calls} back-to-back calls (all rounds' range in parentheses); in situ: the median of "
        f"{args.iterations} calls, each right after a real `opt.step()`; µs. Load average at start {load0}, at end "
        f"{loadavg()} ({time.perf_counter() - t_start:.0f} s).",
        "",
        "| tensors | compiled checks: warm µs | in situ µs | Python checks: warm µs | in situ µs |",
        "|---|---|---|---|---|",
    ]
    for count in COUNTS:
        cells = []
        for mode in MODES:
            spread = f"{min(rounds[mode, count]):.0f}–{max(rounds[mode, count]):.0f}"
            cells += [f"{warm[mode, count]:.1f} ({spread})", f"{situ[mode, count]:.1f}"]
        lines.append(f"| {count} | " + " | ".join(cells) + " |")
    lines.append("| µs per extra tensor (62 → 200) | " + " | ".join(
        f"{slope[mode]:.2f} | {slope_situ[mode]:.2f}" for mode in MODES) + " |")
    met = lambda ok: "**yes**" if ok else "**no**"  # noqa: E731
    w = {count: warm["compiled", count] for count in COUNTS}
    lines += [
        "",
        "| target (warm, compiled checks) | measured | met? |",
        "|---|---|---|",
        f"| 62 tensors ≤ {TARGET_62:g} µs | {w[62]:.1f} µs | {met(w[62] <= TARGET_62)} |",
        f"| 200 tensors ≤ {TARGET_200:g} µs | {w[200]:.1f} µs | {met(w[200] <= TARGET_200)} |",
        f"| ≤ {TARGET_SLOPE:g} µs per additional tensor | {slope['compiled']:.2f} µs | "
        f"{met(slope['compiled'] <= TARGET_SLOPE)} |",
    ]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.profile:
        print("cProfile, 1000 warm post-step calls, 62 tensors (kernel stubbed), top 25 by tottime:\n")
        print(profile_warm())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
