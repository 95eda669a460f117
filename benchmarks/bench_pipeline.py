"""The whole selection at size: each stage's wall time next to the pure compute it contains.

    python benchmarks/bench_pipeline.py                  # 200,000 generated rows, tiny proxy, 1 epoch, 6 points
    python benchmarks/bench_pipeline.py --rows 20000

One ``pipeline.select`` on N templated word problems (``demo.write_word_problems``) on a local
Ray with every core. Compute is measured inside the same run: the corpus stage's tokenisation
(in its ingest tasks), the proxy's training steps (per worker) and scoring forward passes (per
corpus part), and clustering's fit and assignment. What the wall time adds on top is Ray's
orchestration, I/O, start-up and idle cores; the compute is summed over processes, and divided by
the cores it could have run on at best ("packed").
"""
from __future__ import annotations

import _path  # noqa: F401,I001  (first: the repo root on sys.path)
import argparse
import os
import shutil
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--output", default="runs/bench-pipeline")
    p.add_argument("--points", type=int, default=6)
    p.add_argument("--epochs", type=int, default=1)
    a = p.parse_args(argv)

    import ray

    from s2l_ray import demo, pipeline
    from s2l_ray.config import DemoConfig, load_config

    os.makedirs(a.output, exist_ok=True)
    tokenizer = demo.build(DemoConfig(), os.path.join(a.output, "demo"))["tokenizer"]
    data = os.path.join(a.output, f"rows-{a.rows}.jsonl")
    if not os.path.exists(data):
        demo.write_word_problems(data, a.rows)
    out = os.path.join(a.output, "run")
    shutil.rmtree(out, ignore_errors=True)
    cores = os.cpu_count()
    ray.init(num_cpus=cores, include_dashboard=False)
    started = time.time()
    m = pipeline.select(load_config(None, {
        "output": out, "corpus.path": data, "text.tokenizer": tokenizer, "proxy.epochs": a.epochs,
        "proxy.num_points": a.points, "proxy.workers.cpus": 0.5, "proxy.lr": 3e-3, "cluster.k": 100,
        "select.budgets": "0.1"}))
    wall = time.time() - started
    ray.shutdown()
    st, proxy, clusters = m["stages"], m["proxy"], m["clusters"]["timings"]
    rows = [("corpus", st["corpus"]["seconds"], m["corpus"]["tokenize_seconds"], "tokenisation in the ingest tasks"),
            ("proxy", st["proxy"]["seconds"], proxy["train_compute_seconds"] + proxy["score_compute_seconds"],
             f"training steps {proxy['train_compute_seconds']:.0f}s (both workers) + scoring forward passes "
             f"{proxy['score_compute_seconds']:.0f}s"),
            ("clusters", st["clusters"]["seconds"], clusters["fit"] + clusters["assign"], "k-means fit and assignment"),
            ("selection", st["selection"]["seconds"], m["selection"]["timings"]["select"], "Algorithm 1")]
    print(f"{m['corpus']['rows']:,} rows, {a.epochs} epoch(s), {a.points} points, {cores} cores; "
          f"end to end {wall:.0f}s")
    print("| stage | wall (s) | compute (s, summed) | compute packed on the cores (s) | wall / packed | compute |")
    print("|---|---:|---:|---:|---:|---|")
    total = 0.0
    for name, w, c, what in rows:
        total += c
        print(f"| {name} | {w:.1f} | {c:.1f} | {c / cores:.1f} | {w / max(c / cores, 1e-9):.2f} | {what} |")
    print(f"| **end to end** | {wall:.1f} | {total:.1f} | {total / cores:.1f} | {wall / (total / cores):.2f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
