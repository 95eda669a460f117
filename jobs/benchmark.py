"""Compare selection methods: one proxy run, then a target fine-tuned and evaluated per method, budget and seed.

Writes results.md (accuracy and loss, mean ± std over seeds, per source, wall times),
results.json and results.png under the output folder; finished cells are reused on rerun.

    python jobs/benchmark.py                                   # the CPU preset (configs/benchmark_cpu.yaml)
    python jobs/benchmark.py --config configs/benchmark_gpu.yaml
    python jobs/benchmark.py --methods s2l,random --budgets 0.1 --seeds 0,1,2 --output runs/bench-small
"""
from __future__ import annotations

import _path  # noqa: F401,I001  (first: repo root on sys.path, jobs/ off it)
import argparse
import os
import sys

from s2l_ray import cli
from s2l_ray.config import BenchmarkConfig, load_config, parse_sets

CPU_PRESET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                          "benchmark_cpu.yaml")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=CPU_PRESET, help=f"YAML of BenchmarkConfig fields (default {CPU_PRESET})")
    p.add_argument("--output", help="benchmark folder")
    p.add_argument("--methods", help="comma-separated selection methods")
    p.add_argument("--budgets", help="comma-separated counts or fractions")
    p.add_argument("--seeds", help="comma-separated seeds")
    p.add_argument("--no-full", action="store_true", help="skip fine-tuning on every example")
    p.add_argument("--verbose", action="store_true", help="Ray's own output too (worker logs, progress bars, warnings)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config field, e.g. --set finetune.epochs=2 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="check the config and print the plan; read and run nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    overrides = {"output": a.output, "methods": a.methods, "budgets": a.budgets, "seeds": a.seeds,
                 "full": False if a.no_full else None}

    def body() -> None:
        from s2l_ray import benchmark

        cfg = load_config(a.config, {**overrides, **parse_sets(a.set)}, cls=BenchmarkConfig)
        print(benchmark.dry_run(cfg)) if a.dry_run else benchmark.run(cfg)

    return cli.main(body, verbose=a.verbose)


if __name__ == "__main__":
    sys.exit(main())
