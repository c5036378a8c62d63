"""Post-step time of the tracker's foreach paths (``kernel="foreach"``) on one group of 6 tensors, multi-tensor
path vs concatenated ("flat") path.

Measures the crossover that sets ``lightning_adamtype.tracker.FLAT_MAX_NUMEL``. Run:
``python benchmarks/small_groups.py`` (about 20 s).
"""
import statistics
import time

import torch

import lightning_adamtype.tracker as tracker_module
from lightning_adamtype import ConditionTracker


def per_call_ms(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e3


def main() -> None:
    print("| group size | multi-tensor path | concatenated path |")
    print("|---|---|---|")
    for numel in (6_000, 60_000, 250_000, 1_000_000):
        params = [torch.nn.Parameter(torch.randn(numel // 6)) for _ in range(6)]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = torch.optim.Adam(params, lr=1e-3, foreach=True)
        tracker = ConditionTracker(opt, kernel="foreach")  # ("auto" takes the native kernel: no threshold)
        for _ in range(3):
            opt.step()
        row = {}
        for limit in (0, 1 << 30):  # 0: never concatenate; 2^30: always
            tracker_module.FLAT_MAX_NUMEL = limit
            tracker._post_step(opt, (), {})  # first call on this path builds its buffer
            calls = max(5, 2_000_000 // numel)
            row[limit] = statistics.median(per_call_ms(lambda: tracker._post_step(opt, (), {}), calls) for _ in range(5))
        print(f"| {numel:,} | {row[0]:.2f} ms | {row[1 << 30]:.2f} ms |")


if __name__ == "__main__":
    main()
