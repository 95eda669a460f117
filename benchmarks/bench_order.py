"""Does the training order still depend on how the corpus file is sorted? One selection on the demo
mixture written source by source, one on the same rows shuffled; per source, the mean loss at each
trajectory point in both, and the source purity of the global k-means clusters.

    python benchmarks/bench_order.py                      # 20,000 rows (10 sources x 2,000), 1 epoch, 4 points, K=20
    python benchmarks/bench_order.py --per-source 500 --output runs/bench-order-small

With the training order independent of storage order, the two runs differ only by chance (the
rows' positions in the permutation differ), so the sorted-minus-shuffled differences are small
and have no pattern by source position.
"""
from __future__ import annotations

import _path  # noqa: F401,I001  (first: the repo root on sys.path)
import argparse
import json
import os
import random
import sys

import numpy as np
import pyarrow.parquet as pq


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-source", type=int, default=2000, help="training rows per demo source")
    p.add_argument("--output", default="runs/bench-order")
    p.add_argument("--points", type=int, default=4)
    p.add_argument("--clusters", type=int, default=20)
    a = p.parse_args(argv)

    from s2l_ray import demo, pipeline
    from s2l_ray.config import DemoConfig, load_config
    from s2l_ray.layout import RunDir

    paths = demo.build(DemoConfig(train_per_source=a.per_source), os.path.join(a.output, "data"))
    lines = open(paths["train"]).read().splitlines()
    shuffled = os.path.join(a.output, "data", "shuffled.jsonl")
    random.Random(0).shuffle(lines)
    with open(shuffled, "w") as f:
        f.write("\n".join(lines) + "\n")
    results = {}
    for name, data in (("sorted", paths["train"]), ("shuffled", shuffled)):
        out = os.path.join(a.output, name)
        pipeline.select(load_config(None, {
            "output": out, "corpus.path": data, "text.tokenizer": paths["tokenizer"], "proxy.epochs": 1,
            "proxy.num_points": a.points, "proxy.workers.cpus": 0.5, "proxy.lr": 3e-3, "cluster.k": a.clusters,
            "select.budgets": "0.1"}))
        run = RunDir(out)
        corpus = pq.read_table(run.corpus_files(), columns=["id", "source"]).to_pandas().set_index("id")
        losses = {t: pq.read_table(rec["files"], partitioning=None, columns=["id", "loss"]).to_pandas()
                  .set_index("id")["loss"] for t, rec in sorted(run.done_points().items())}
        clusters = pq.read_table(run.clusters, columns=["id", "cluster"]).to_pandas().set_index("id")["cluster"]
        table = corpus.join(clusters)
        purity = table.groupby("cluster")["source"].agg(lambda s: s.value_counts().iloc[0]).sum() / len(table)
        results[name] = {"purity": float(purity),
                         "loss": {t: corpus.join(l).groupby("source")["loss"].mean().to_dict()
                                  for t, l in losses.items()}}
    order = list(dict.fromkeys(json.loads(line)["source"] for line in open(paths["train"])))
    print(f"source purity of {a.clusters} global clusters: sorted {results['sorted']['purity']:.3f}, "
          f"shuffled {results['shuffled']['purity']:.3f}")
    print("mean loss, sorted minus shuffled input (sources in the sorted file's order):")
    print("| source | " + " | ".join(f"point {t}" for t in range(a.points)) + " |")
    print("|---|" + "---:|" * a.points)
    for s in order:
        diffs = [results["sorted"]["loss"][t][s] - results["shuffled"]["loss"][t][s] for t in range(a.points)]
        print(f"| {s} | " + " | ".join(f"{d:+.3f}" for d in diffs) + " |")
    spread = [np.std([results["sorted"]["loss"][t][s] - results["shuffled"]["loss"][t][s] for s in order])
              for t in range(a.points)]
    print("spread (std over sources) of the differences per point: " + ", ".join(f"{x:.3f}" for x in spread))
    with open(os.path.join(a.output, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
