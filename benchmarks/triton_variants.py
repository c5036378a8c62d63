"""Achieved bandwidth of the Triton group kernel (:mod:`lightning_adamtype.backends.triton`) per mode
(:mod:`lightning_adamtype.backends.one_pass`: FIRST, STORED, CURRENT, RECOMPUTED) and launch shape (BLOCK, SUB,
warps, stages: the module's constants, set here per variant), against a plain device-to-device copy (the ceiling).
The kernel alone (``GroupLaunch.terms``, both launches), one group of ``--tensors`` tensors. CUDA only.

    python benchmarks/triton_variants.py --numel 100000000
"""

from __future__ import annotations

import argparse
import sys

import torch

from lightning_adamtype.backends import triton as tk
from lightning_adamtype.backends.one_pass import CURRENT, FIRST, RECOMPUTED, STORED

#: mode → (launch mode, bytes moved per coordinate: v and g read, η_{t−1} read, η_t written)
MODES = {"FIRST": (FIRST, 12), "STORED": (STORED, 16), "CURRENT": (CURRENT, 8), "RECOMPUTED": (RECOMPUTED, 8)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--numel", type=int, default=100_000_000)
    ap.add_argument("--tensors", type=int, default=10)
    current = f"{tk.BLOCK},{tk.SUB},{tk.NUM_WARPS},{tk.NUM_STAGES}"
    ap.add_argument("--variants", nargs="*",
                    default=[current, "16384,1024,4,3", "16384,1024,4,1", "16384,2048,8,1", "4096,4096,8,1", "16384,4096,8,1"],
                    help=f"BLOCK,SUB,NUM_WARPS,NUM_STAGES (default: the module's {current} first, then the variants "
                         "measured in the fourth session)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or tk.triton is None:
        ap.error("needs a CUDA device and Triton")
    import triton.testing

    device = torch.device("cuda")
    n = args.numel // args.tensors
    vs = [torch.rand(n, device=device) * 1e-3 for _ in range(args.tensors)]
    gs = [torch.randn(n, device=device) * 1e-2 for _ in range(args.tensors)]
    table = torch.tensor([[1e-3, 1e-8, 0.9e-3, 1e-8]] * args.tensors, device=device)
    x, y = torch.empty(args.numel, device=device), torch.rand(args.numel, device=device)
    copy_ms = triton.testing.do_bench(lambda: x.copy_(y), return_mode="median")
    print(f"copy of {args.numel:,} float32: {copy_ms:.3f} ms, {8 * args.numel / copy_ms / 1e9:.2f} TB/s (read + write)")
    print("| BLOCK, SUB, warps, stages | " + " | ".join(f"{m} ms (TB/s)" for m in MODES) + " |")
    print("|---|" + "---|" * len(MODES))
    for variant in args.variants:
        tk.BLOCK, tk.SUB, tk.NUM_WARPS, tk.NUM_STAGES = (int(x) for x in variant.split(","))
        launch = tk.GroupLaunch(tuple(v.numel() for v in vs), device)
        eta = torch.rand(launch.eta_numel, device=device) * 1e-2
        cells = []
        for mode, bytes_per in MODES.values():
            t = table if mode == RECOMPUTED else table[:, :2].contiguous()
            ms = triton.testing.do_bench(
                lambda: launch.terms(vs, gs, eta if mode in (FIRST, STORED) else None, t, mode, 1 / 0.999, 1e-3),
                return_mode="median",
            )
            cells.append(f"{ms:.3f} ({bytes_per * args.numel / ms / 1e9:.2f})")  # bytes per ms / 1e9 = TB/s
        print(f"| {variant} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
