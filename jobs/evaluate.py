"""Evaluate a fine-tuned model: greedy generation, exact match of the final answer, response loss.

With no arguments it evaluates runs/demo-target (written by jobs/finetune.py) on the demo's
eval.jsonl and writes runs/demo-target/eval/metrics.json and metrics.md.

    python jobs/evaluate.py
    python jobs/evaluate.py --model runs/demo-target --data my_eval.jsonl --limit 100
"""
from __future__ import annotations

import _path  # noqa: F401,I001  (first: repo root on sys.path, jobs/ off it)
import argparse
import sys

from s2l_ray import cli, pipeline
from s2l_ray.config import EvaluateConfig, load_config, parse_sets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of EvaluateConfig fields")
    p.add_argument("--model", help="HF model dir, or a jobs/finetune.py output dir (default runs/demo-target)")
    p.add_argument("--data", help="evaluation set: JSONL/Parquet file or folder (default: the demo eval.jsonl)")
    p.add_argument("--output", help="where metrics.json, metrics.md, predictions.jsonl go (default <model>/eval)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--limit", type=int, help="evaluate the first N rows only")
    p.add_argument("--batch-size", type=int, help="rows per generate() call")
    p.add_argument("--num-actors", type=int)
    p.add_argument("--verbose", action="store_true", help="Ray's own output too (worker logs, progress bars, warnings)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config field, e.g. --set text.max_length=1024 (repeatable)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    overrides = {"model": a.model, "corpus.path": a.data, "output": a.output, "max_new_tokens": a.max_new_tokens,
                 "limit": a.limit, "batch_size": a.batch_size, "actors.count": a.num_actors}

    def body() -> None:
        from s2l_ray import evaluate

        cfg = load_config(a.config, {**overrides, **parse_sets(a.set)}, cls=EvaluateConfig)
        evaluate.check(cfg)  # before Ray starts
        pipeline.ensure_ray()
        evaluate.run(cfg)

    return cli.main(body, verbose=a.verbose)


if __name__ == "__main__":
    sys.exit(main())
