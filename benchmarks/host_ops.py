"""Host-side cost of the tracker's post-step hook on a CIFAR ResNet-18 parameter group (62 tensors), with the Triton
kernels replaced by a stub so that it runs on a CPU: aten operations per post-step and milliseconds per call.

Compares the two ways Adam's (s, e) scalars are built when the step counters are tensors (fused and capturable
optimizers keep them on the GPU): one small computation per parameter, or one vector for the group
(``adapters.device_steps`` / ``ScalarTable``). CPU step tensors stand in for device ones.

    python benchmarks/host_ops.py
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from cifar10 import CifarResNet  # noqa: E402

import lightning_adamtype.adapters as adapters  # noqa: E402
from lightning_adamtype import ConditionTracker, triton_kernels  # noqa: E402


def measure(per_parameter: bool, calls: int = 30) -> tuple[int, float]:
    saved = (adapters.step_value, adapters.device_steps, triton_kernels.available, triton_kernels.GroupLaunch.terms)
    try:
        triton_kernels.available = lambda device: True
        triton_kernels.GroupLaunch.terms = lambda self, *args, **kwargs: torch.zeros(5)
        if per_parameter:  # what device counters took before: each one a tensor, its own small operations
            adapters.step_value = lambda state: state["step"].to(torch.float32).clamp_min(1.0)
            adapters.device_steps = lambda states: None
        else:
            adapters.device_steps = lambda states: torch.stack([s["step"] for s in states]).to(torch.float32).clamp_min(1.0)
        model = CifarResNet("resnet18")
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        tracker = ConditionTracker(opt, kernel="triton")
        for _ in range(3):
            opt.step()
        with torch.profiler.profile() as prof:
            tracker._post_step(opt, (), {})
        ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
        t0 = time.perf_counter()
        for _ in range(calls):
            tracker._post_step(opt, (), {})
        return ops, (time.perf_counter() - t0) / calls * 1e3
    finally:
        adapters.step_value, adapters.device_steps, triton_kernels.available, triton_kernels.GroupLaunch.terms = saved


def main() -> int:
    print("| (s, e) built | aten ops per post-step | post-step (ms, kernels stubbed) |")
    print("|---|---|---|")
    for per_parameter in (True, False):
        ops, ms = measure(per_parameter)
        print(f"| {'per parameter' if per_parameter else 'one vector per group'} | {ops} | {ms:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
