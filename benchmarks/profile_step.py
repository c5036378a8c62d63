"""Where a tracked optimizer step spends its time: host issue time, device time, kernel launches, top operators.

For each tracker mode (and the bare optimizer), after a warm-up: ``steps`` steps issued back to back are timed on
the host (issue time) and to the drained queue (wall); then ``torch.profiler`` over ``steps`` more steps gives
the kernels launched per step, their summed device time, and the operators that cost the most.

    python benchmarks/profile_step.py --device cuda --numel 10000000
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import OPTIMIZERS, make_params, modes_for, synchronize  # noqa: E402

from lightning_adamtype import ConditionTracker  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--numel", type=int, default=10_000_000)
    ap.add_argument("--optimizer", default="Adam (foreach)", choices=list(OPTIMIZERS))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=10, help="operators listed per mode")
    ap.add_argument("--modes", nargs="*", default=None, help="tracker modes (default: bare and all of bench.py's modes for the device)")
    args = ap.parse_args(argv)
    on_gpu = args.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    all_modes = modes_for(args.device)
    modes = args.modes or ["bare", *all_modes]
    summary = []
    for mode in modes:
        opt = OPTIMIZERS[args.optimizer](make_params(args.numel, device=args.device))
        tracker = None if mode == "bare" else ConditionTracker(opt, **all_modes[mode])
        for _ in range(5):
            opt.step()
        synchronize(args.device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            opt.step()
        t1 = time.perf_counter()
        synchronize(args.device)
        t2 = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                opt.step()
            synchronize(args.device)
        events = prof.key_averages()
        if on_gpu:
            kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
            launches = sum(e.count for e in kernels) / args.steps
            device_ms = sum(e.self_device_time_total for e in kernels) / args.steps / 1e3
        else:
            launches, device_ms = float("nan"), float("nan")
        summary.append((mode, (t1 - t0) / args.steps * 1e3, (t2 - t0) / args.steps * 1e3, launches, device_ms))
        sort = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
        print(f"\n## {mode}\n")
        print(events.table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
        if on_gpu:
            print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
        del opt, tracker
    print(f"\n{args.optimizer}, {args.numel:,} params in 10 tensors, {args.device}; per step:\n")
    print("| mode | host issue (ms) | wall to drained queue (ms) | kernels launched | summed kernel time (ms) |")
    print("|---|---|---|---|---|")
    for mode, issue, wall, launches, device_ms in summary:
        print(f"| {mode} | {issue:.3f} | {wall:.3f} | {launches:.1f} | {device_ms:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
