"""A/B the tracker's per-step cost: the installed ``lightning_adamtype`` against another copy of the package (a
modified one, or another commit's), in one process.

    mkdir -p /tmp/variant && git archive HEAD lightning_adamtype | tar -x -C /tmp/variant   # or another commit
    # ... edit /tmp/variant/lightning_adamtype, or patch it ...
    python benchmarks/compare.py /tmp/variant/lightning_adamtype

Three optimizers on identical parameters (bare, tracked by the installed package, tracked by the variant) are
stepped in turn, repetition after repetition; the medians give each tracker's cost. Both trackers' results are
compared (a, b, c, c2 to a relative 1e-9), so a faster variant that computes something else is flagged.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402
import lightning_adamtype as base  # noqa: E402


def load_variant(path: str):
    path = os.path.abspath(path)
    spec = importlib.util.spec_from_file_location(
        "lightning_adamtype_variant", os.path.join(path, "__init__.py"), submodule_search_locations=[path]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variant", help="directory of the modified lightning_adamtype package")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)
    variant = load_variant(args.variant)
    assert variant.__file__ != base.__file__
    print("| optimizer | params | bare (ms) | tracker cost, installed (ms) | tracker cost, variant (ms) | change | "
          "same results |")
    print("|---|---|---|---|---|---|---|")
    for name in bench.OPTIMIZERS:
        for numel, steps in ((1_000_000, 10), (10_000_000, 3)):
            make = bench.OPTIMIZERS[name]
            opts = {k: make(bench.make_params(numel)) for k in ("bare", "base", "variant")}
            ta = base.ConditionTracker(opts["base"])
            tb = variant.ConditionTracker(opts["variant"])
            for o in opts.values():
                bench._time_steps(o, 2)
            times: dict[str, list[float]] = {k: [] for k in opts}
            for _ in range(args.reps):
                for k, o in opts.items():
                    times[k].append(bench._time_steps(o, steps))
            bare = statistics.median(times["bare"])
            ca = statistics.median(times["base"]) - bare
            cb = statistics.median(times["variant"]) - bare
            ra, rb = ta.compute(), tb.compute()
            same = all(
                abs(ra[g][k] - rb[g][k]) <= 1e-9 * abs(ra[g][k]) for g in ra for k in ("a", "b", "c", "c2")
            )
            print(f"| {name} | {bench.fmt_n(numel)} | {bare:.2f} | {ca:.2f} ({ca / bare:.2f}×) | "
                  f"{cb:.2f} ({cb / bare:.2f}×) | {cb / ca - 1:+.0%} | {same} |", flush=True)
            del opts, ta, tb
    return 0


if __name__ == "__main__":
    sys.exit(main())
