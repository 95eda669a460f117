"""Scoring throughput on real proxy shapes: the batched scorer against the official one-at-a-time loop.

    python benchmarks/bench_scoring.py --model-shape pythia-70m
    python benchmarks/bench_scoring.py --model-shape tiny --rows 20000 --reference-rows 2000
    python benchmarks/bench_scoring.py --device cuda --rows 20000 --reference-rows 2000   # on a GPU machine

The model is a GPT-NeoX built from config with random weights: ``tiny`` (the demo proxy), or the
sizes of Pythia-70M / Pythia-160M with their 50,304-token vocabulary. The reference is the
official S2L loop as it is: one example at a time, ``model(input_ids, labels=...)`` with the full
LM head over every position, fp32. ``--device cuda`` runs all three on the GPU (the actor pool with one
actor per GPU, fp32). The scorer is ``scoring.score_rows`` (length buckets, LM head
and softmax on response positions only) in-process, and ``proxy.score_saved`` (the Ray Data
actor pool, start-up included). Both score the same stored rows.

Printed: examples/s of each and their ratio; the matmul FLOPs each needs per example (counted by
torch's FlopCounterMode on a sample); this machine's fp32 matmul rate (a 2048 x 2048 product,
same threads); and each one's achieved rate as a share of it.
"""
from __future__ import annotations

import _path  # noqa: F401,I001  (first: the repo root on sys.path)
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
from s2l_ray.config import CorpusConfig, DemoConfig, Placement, ScoringConfig, TextConfig
from s2l_ray.corpus import store
from s2l_ray.layout import RunDir
from s2l_ray.models import load_tokenizer, preset_config, save_model
from s2l_ray.proxy import score_saved
from s2l_ray.scoring import reference_losses, score_rows

VOCAB = {"tiny": 0, "pythia-70m": 50304, "pythia-160m": 50304}


def matmul_rate(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    """The device's fp32 matmul throughput (FLOP/s); on CPU with torch's current threads."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def counted_flops(fn) -> int:
    """Matmul FLOPs (mm, bmm, attention) that ``fn()`` runs, counted by torch."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-shape", default="pythia-70m", choices=sorted(VOCAB))
    p.add_argument("--rows", type=int, default=2000, help="examples scored by the batched scorer")
    p.add_argument("--reference-rows", type=int, default=300, help="examples scored one at a time")
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--output", default=None, help="work directory (default: a temporary one)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = p.parse_args()
    device = torch.device(a.device)

    from transformers import AutoModelForCausalLM

    from s2l_ray.corpus import normalise

    work = a.output or tempfile.mkdtemp(prefix="s2l-bench-scoring-")
    per_source = -(-a.rows // len(DemoConfig().sources))
    paths = demo.build(DemoConfig(train_per_source=per_source, eval_per_source=1), os.path.join(work, "data"))
    tok = load_tokenizer(paths["tokenizer"])
    text = TextConfig()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    run = RunDir(os.path.join(work, "run"))
    stats = store(run, CorpusConfig(path=paths["train"]), text, paths["tokenizer"], part_rows=1024)
    run.update_manifest(corpus=stats)
    n = stats["rows"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        preset_config(a.model_shape, tok, text.max_length, vocab_size=VOCAB[a.model_shape])).eval()
    ckpt_dir = os.path.join(work, "checkpoint")
    save_model(model, None, os.path.join(ckpt_dir, "model"))
    model.to(device)
    rows = pq.read_table(run.corpus_files(), columns=["id", "prompt", "response", "messages", "input_ids",
                                                      "spans"]).to_pylist()
    params = sum(p.numel() for p in model.parameters())
    print(f"corpus: {n} rows, {stats['tokens']} tokens; model {a.model_shape} ({params / 1e6:.1f}M parameters, "
          f"vocab {model.config.vocab_size}); torch threads {torch.get_num_threads()}; {os.cpu_count()} CPUs; "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}")

    ref_rows = rows[:: max(1, n // a.reference_rows)][: a.reference_rows]  # spread over every source
    norm = [normalise({k: r[k] for k in ("id", "prompt", "response")}, CorpusConfig()) for r in ref_rows]
    start = time.perf_counter()
    ref = reference_losses(model, tok, norm, text)
    sync(device)
    ref_rate = len(ref_rows) / (time.perf_counter() - start)

    ids, spans = [r["input_ids"] for r in rows], [r["spans"] for r in rows]
    score_rows(model, ids[:64], spans[:64], tok.pad_token_id, a.max_tokens, device)  # warm-up
    start = time.perf_counter()
    local = score_rows(model, ids, spans, tok.pad_token_id, a.max_tokens, device)
    local_rate = n / (time.perf_counter() - start)

    gpu = device.type == "cuda"
    actors = torch.cuda.device_count() if gpu else a.actors
    cfg = ScoringConfig(actors=Placement(count=actors, cpus=max(0.5, (os.cpu_count() - 0.5) / actors), gpus=1.0),
                        max_tokens=a.max_tokens)
    start = time.perf_counter()
    score_saved([run], {0: (0, Checkpoint.from_directory(ckpt_dir))}, cfg, gpu, "fp32")
    pipe_rate = n / (time.perf_counter() - start)
    got = pq.read_table(run.done_points()[0]["files"], partitioning=None, columns=["id", "loss"]).to_pydict()
    by_id = dict(zip(got["id"], got["loss"]))
    local_by_id = dict(zip((r["id"] for r in rows), local["loss"]))
    err = max(max(abs(by_id[r["id"]] - x), abs(local_by_id[r["id"]] - x)) for r, x in zip(ref_rows, ref))

    sample = rows[:: max(1, n // 500)][:500]
    with torch.no_grad():
        flops = counted_flops(lambda: score_rows(model, [r["input_ids"] for r in sample], [r["spans"] for r in sample],
                                                 tok.pad_token_id, a.max_tokens, device)) / len(sample)
        sample_norm = [normalise({k: r[k] for k in ("id", "prompt", "response")}, CorpusConfig()) for r in sample[:100]]
        ref_flops = counted_flops(lambda: reference_losses(model, tok, sample_norm, text)) / len(sample_norm)
    peak = matmul_rate(device)

    def share(rate: float, f: float) -> str:
        return f"{rate * f / 1e9:6.1f} GFLOP/s = {100 * rate * f / peak:3.0f}% of the matmul rate"

    print(f"official loop, one example at a time: {ref_rate:8.1f} examples/s, {ref_flops / 1e6:7.1f} MFLOP/example, "
          f"{share(ref_rate, ref_flops)}")
    print(f"score_rows in-process (batched)     : {local_rate:8.1f} examples/s, {flops / 1e6:7.1f} MFLOP/example, "
          f"{share(local_rate, flops)}; {local_rate / ref_rate:.1f}x the official loop")
    print(f"score_saved, Ray Data actor pool    : {pipe_rate:8.1f} examples/s ({actors} actors, start-up included); "
          f"{pipe_rate / ref_rate:.1f}x the official loop")
    print(f"this {a.device.upper()}'s fp32 matmul rate: {peak / 1e9:.1f} GFLOP/s; the response-only head needs "
          f"{ref_flops / flops:.2f}x fewer FLOPs, so 100% of that rate would be {peak / flops / ref_rate:.1f}x")
    print(f"max |loss difference| vs the official loop: {err:.2e}")


if __name__ == "__main__":
    main()
