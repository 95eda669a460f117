"""Scoring throughput: the pipeline's batched Ray Data scoring vs one example at a time.

Both score the same corpus with the same checkpoint. The reference loop is the official S2L
method (tokenise one example, forward it with labels, read the loss); the pipeline is
``scoring.score_point`` (length-bucketed batches in a Ray Data actor pool, stored token ids),
timed end to end including Ray Data's start-up, and ``scoring.score_rows`` in-process.

Scoring is compute-bound on a CPU, so the run also measures where the ceiling is: the matmul
FLOPs that batched scoring does per example (counted by torch's FlopCounterMode on a sample)
and this machine's fp32 matmul rate (a 2048 x 2048 product). Their quotient bounds the
examples/s any exact fp32 scorer of this model can reach here, and so the ratio to the reference.

    python jobs/bench_scoring.py --rows 2000 --preset tiny
"""
from __future__ import annotations

import _path  # noqa: F401,I001  (first: repo root on sys.path, jobs/ off it)
import argparse
import os
import tempfile
import time

import pyarrow.parquet as pq
import ray
import torch
from ray.train import Checkpoint
from torch.utils.flop_counter import FlopCounterMode

from s2l_ray import demo
from s2l_ray.config import CorpusConfig, DemoConfig, ScoringConfig, TextConfig
from s2l_ray.corpus import store
from s2l_ray.layout import RunDir
from s2l_ray.models import build_model, load_tokenizer, save_model
from s2l_ray.scoring import reference_losses, score_point, score_rows


def matmul_rate(size: int = 2048, repeats: int = 10) -> float:
    """This machine's fp32 matmul throughput (FLOP/s) with torch's current threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def counted_flops(fn) -> int:
    """Matmul FLOPs (mm, bmm, attention) that ``fn()`` runs, counted by torch."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2000, help="examples scored by the pipeline")
    p.add_argument("--reference-rows", type=int, default=500, help="examples scored one at a time")
    p.add_argument("--preset", default="tiny", help="model preset (tiny, small, base)")
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--output", default=None, help="work directory (default: a temporary one)")
    a = p.parse_args()

    work = a.output or tempfile.mkdtemp(prefix="s2l-bench-scoring-")
    per_source = -(-a.rows // len(DemoConfig().sources))
    paths = demo.build(DemoConfig(train_per_source=per_source, eval_per_source=1), os.path.join(work, "data"))
    tok = load_tokenizer(paths["tokenizer"])
    text = TextConfig()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    run = RunDir(os.path.join(work, "run"))
    stats = store(run, CorpusConfig(path=paths["train"]), text, paths["tokenizer"])
    run.update_manifest(corpus=stats)
    n = stats["rows"]
    model = build_model(a.preset, tok, seed=0).eval()
    ckpt_dir = os.path.join(work, "checkpoint")
    save_model(model, None, os.path.join(ckpt_dir, "model"))
    rows = pq.read_table(run.corpus_files(), columns=["id", "prompt", "response", "input_ids", "n_prompt"]).to_pylist()
    print(f"corpus: {n} rows, {stats['tokens']} tokens; model preset {a.preset}; torch threads "
          f"{torch.get_num_threads()}; {os.cpu_count()} CPUs")

    ref_rows = rows[:: max(1, n // a.reference_rows)][: a.reference_rows]  # spread over every source
    start = time.perf_counter()
    ref = reference_losses(model, ref_rows, tok, text.template, text.max_length)
    ref_rate = len(ref_rows) / (time.perf_counter() - start)

    start = time.perf_counter()
    local = score_rows(model, [r["input_ids"] for r in rows], [r["n_prompt"] for r in rows], tok.pad_token_id,
                       a.max_tokens, torch.device("cpu"))
    local_rate = n / (time.perf_counter() - start)

    cfg = ScoringConfig(num_actors=a.actors, cpus_per_actor=max(0.5, (os.cpu_count() - 0.5) / a.actors),
                        max_tokens=a.max_tokens)
    start = time.perf_counter()
    score_point(run.uri, 0, 0, Checkpoint.from_directory(ckpt_dir), cfg, False, "fp32", n)
    pipe_rate = n / (time.perf_counter() - start)
    got = pq.read_table(run.done_points()[0]["files"], partitioning=None, columns=["id", "loss"]).to_pydict()
    by_id = dict(zip(got["id"], got["loss"]))
    err = max(abs(by_id[r["id"]] - x) for r, x in zip(ref_rows, ref))
    local_by_id = dict(zip((r["id"] for r in rows), local["loss"]))
    err = max(err, max(abs(local_by_id[r["id"]] - x) for r, x in zip(ref_rows, ref)))

    sample = rows[:: max(1, n // 1000)][:1000]
    with torch.no_grad():
        flops = counted_flops(lambda: score_rows(model, [r["input_ids"] for r in sample], [r["n_prompt"] for r in sample],
                                                 tok.pad_token_id, a.max_tokens, torch.device("cpu"))) / len(sample)
    peak = matmul_rate()
    ceiling = peak / flops

    print(f"reference, one example at a time : {ref_rate:9.1f} examples/s ({len(ref_rows)} examples)")
    print(f"score_rows in-process (batched)  : {local_rate:9.1f} examples/s  ratio {local_rate / ref_rate:6.1f}x")
    print(f"pipeline score_point (Ray Data)  : {pipe_rate:9.1f} examples/s  ratio {pipe_rate / ref_rate:6.1f}x "
          f"({a.actors} actors, start-up included)")
    print(f"max |loss difference| vs reference: {err:.2e}")
    print(f"batched scoring: {flops / 1e6:.1f} MFLOP of matmul per example; this CPU's fp32 matmul rate "
          f"{peak / 1e9:.1f} GFLOP/s; in-process scoring runs at {local_rate * flops / 1e9:.1f} GFLOP/s "
          f"({100 * local_rate / ceiling:.0f}% of it)")
    print(f"ceiling at that rate: {ceiling:9.1f} examples/s = {ceiling / ref_rate:.1f}x the reference")


if __name__ == "__main__":
    main()
