"""Run S2L selection: corpus -> proxy training + loss trajectories -> clusters -> selected subset.

With no arguments it runs the built-in maths demo on a local Ray instance (CPU is fine):

    python jobs/select.py
    python jobs/select.py --data corpus.jsonl --target my_task.jsonl --method s2l-target --output runs/mine
    ray job submit --working-dir . -- python jobs/select.py --config configs/paper_mathinstruct.yaml
"""
from __future__ import annotations

import _path  # noqa: F401,I001  (first: repo root on sys.path, jobs/ off it)
import argparse
import os
import sys

from s2l_ray import cli, pipeline
from s2l_ray.config import load_config, parse_sets
from s2l_ray.selection.methods import METHODS

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--data", help="corpus: JSONL/Parquet file, folder of shards, datasets dir, or URI")
    p.add_argument("--output", help="run directory (local path or URI such as s3://bucket/run)")
    p.add_argument("--budget", help="subset size: a count (3000) or a fraction (0.1); comma-separate several")
    p.add_argument("--method", choices=sorted(METHODS),
                   help="selection method (default s2l); the others rank or sample from the same trajectories")
    p.add_argument("--target", help="a few hundred examples of your target task (any corpus format or URI), "
                                     "never trained on: for s2l-target, embedding-target, random-target-sources")
    p.add_argument("--seed", type=int)
    p.add_argument("--clusters", type=int, help="K for k-means")
    p.add_argument("--num-workers", type=int, help="Ray Train workers for the proxy")
    p.add_argument("--proxy-model", help="the proxy causal LM: a model dir, URI or Hub id ORG/NAME[@REV] "
                                         "(default: a fresh tiny preset)")
    p.add_argument("--checkpoints", nargs="+", metavar="DIR",
                   help="your own checkpoints instead of a proxy run: model dirs, or a training output whose "
                        "checkpoint-N folders are used in step order (local or URIs)")
    p.add_argument("--losses", nargs="+", metavar="PATH",
                   help="the official S2L code's losses.pt files instead of a proxy run: files, or folders whose "
                        "checkpoint-N folders hold them (the corpus must be the data file they were computed on)")
    p.add_argument("--verbose", action="store_true", help="Ray's own output too (worker logs, progress bars, warnings)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config field, e.g. --set proxy.epochs=2 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="check the config and print the plan; read and run nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    overrides = {"corpus.path": a.data, "output": a.output, "select.budgets": a.budget, "select.method": a.method,
                 "select.target": a.target,
                 "seed": a.seed, "cluster.k": a.clusters, "proxy.workers.count": a.num_workers,
                 "proxy.model": a.proxy_model, "proxy.checkpoints": a.checkpoints,
                 "proxy.losses": a.losses}
    config = a.config
    if config is None and a.data is None:
        config = DEMO_CONFIG
        print(f"no --config or --data: running the built-in demo ({DEMO_CONFIG})", flush=True)
    def body() -> None:
        cfg = load_config(config, {**overrides, **parse_sets(a.set)})
        print(pipeline.dry_run(cfg)) if a.dry_run else pipeline.select(cfg)

    return cli.main(body, verbose=a.verbose)


if __name__ == "__main__":
    sys.exit(main())
