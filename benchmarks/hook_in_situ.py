"""The tracker's post-step hook timed where it runs (right after a real forward, backward and Adam step of the small
CNN of ``bench.py``) and warm (called back to back on the same state), and why the two differ.

Right after a training step most of the hook's code and data are no longer in the CPU caches, so every distinct
operation costs several times its warm time. The probe shows it on one operation: the same ``torch.tensor`` of
six (s, e) pairs, made twice in a row right after ``opt.step()``; the first pays for the cold caches. (When the
hook itself makes such a tensor, as it did before the sixth session, the probe's first call finds that code warm:
the cost moved into the hook.)

    python benchmarks/hook_in_situ.py                  # this checkout
    PYTHONPATH=/path/to/other/checkout python benchmarks/hook_in_situ.py   # another version, for an A/B

Prints medians in microseconds (after 20 warm-up iterations): the hook in situ, the hook warm, and the probe; then
the warm hook on groups of 1, 8, 62 (a ResNet-18's count) and 200 tensors of 256 coordinates, whose slope is the
host cost per parameter.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import _PatchedHooks, small_cnn  # noqa: E402

from lightning_adamtype import ConditionTracker  # noqa: E402


class PostStepTimes(_PatchedHooks):
    """The duration of every call of the tracker's post-step hook (:attr:`times`); the other hooks run as they are."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def _wrap(self, original, name: str):
        if name != "_post_step":
            return original

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.times.append(time.perf_counter() - t0)

        return timed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=320, help="training iterations (batch 64)")
    ap.add_argument("--kernel", default="auto", help="the tracker's kernel= option")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    net = small_cnn()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.randn(64 * 16, 3, 32, 32)
    y = torch.randint(0, 10, (64 * 16,))
    pairs = [(1e-3 * 0.5, 1e-8 * 0.3)] * 6
    probe_first: list[float] = []
    probe_second: list[float] = []
    with PostStepTimes() as hook:  # patched before the tracker binds its hooks to the optimizer
        tracker = ConditionTracker(opt, kernel=args.kernel)
        for i in range(args.iterations):
            xb, yb = x[i % 16 * 64 : (i % 16 + 1) * 64], y[i % 16 * 64 : (i % 16 + 1) * 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xb), yb).backward()
            opt.step()  # the tracker's post-step hook runs in here, in situ
            t0 = time.perf_counter()
            torch.tensor(pairs, dtype=torch.float32)
            t1 = time.perf_counter()
            torch.tensor(pairs, dtype=torch.float32)
            t2 = time.perf_counter()
            probe_first.append(t1 - t0)
            probe_second.append(t2 - t1)
        in_situ = hook.times[20:]
        hook.times.clear()
        for _ in range(300):  # warm: the same hook back to back on the state the loop left
            tracker._post_step(opt, (), {})
        warm = hook.times[20:]
    us = lambda values: f"{statistics.median(values) * 1e6:7.1f} us"  # noqa: E731
    print(f"post-step hook, in situ (after forward, backward, Adam step): {us(in_situ)}")
    print(f"post-step hook, warm (called back to back):                   {us(warm)}")
    print(f"probe: torch.tensor of 6 pairs right after opt.step(), first: {us(probe_first)}, second: {us(probe_second)}")
    for count in (1, 8, 62, 200):
        print(f"post-step hook, warm, {count:3d} tensors of 256: {us(warm_hook(count, args.kernel))}")
    return 0


def warm_hook(count: int, kernel: str, calls: int = 300) -> list[float]:
    """Post-step hook times, called back to back, for one Adam group of ``count`` tensors of 256 coordinates."""
    params = [torch.nn.Parameter(torch.randn(256)) for _ in range(count)]
    opt = torch.optim.Adam(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    tracker = ConditionTracker(opt, kernel=kernel)
    for _ in range(10):
        opt.step()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        tracker._post_step(opt, (), {})
        times.append(time.perf_counter() - t0)
    tracker.remove()
    return times


if __name__ == "__main__":
    raise SystemExit(main())
