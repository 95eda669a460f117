"""The corpus stage at size: N rows in one JSONL file, ingested in parallel pieces, against the raw
tokenisation rate of this machine.

    python benchmarks/bench_corpus.py                    # 1,000,000 rows
    python benchmarks/bench_corpus.py --rows 10000000

Writes N GSM8K-like rows (about 250 bytes each) as one file, stores it with ``corpus.store`` on a
local Ray (every core), and prints: wall time and rows/s of the corpus stage; peak memory (PSS)
of the driver, of the largest Ray process, and of all Ray processes together (sampled every
0.2 s); and, in the same run, the raw rate: the fast tokenizer batch-encoding the same texts in
one process on all cores, with the ratio of the two.
"""
from __future__ import annotations

import _path  # noqa: F401,I001  (first: the repo root on sys.path)
import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time


def pss(pid: int) -> int:
    """Proportional set size in bytes (shared pages split between their users), 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MemorySampler(threading.Thread):
    """Peak PSS of this process, of the largest Ray process and of all Ray processes together."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop, self.driver, self.largest, self.ray_total = threading.Event(), 0, 0, 0

    def run(self) -> None:
        import psutil

        me = os.getpid()
        while not self.stop.is_set():
            rays = [p.pid for p in psutil.process_iter(["cmdline"])
                    if p.pid != me and any("ray" in part for part in (p.info["cmdline"] or [])[:2])]
            sizes = [pss(p) for p in rays]
            self.driver = max(self.driver, pss(me))
            self.largest = max([self.largest, *sizes])
            self.ray_total = max(self.ray_total, sum(sizes))
            time.sleep(0.2)


def raw_rate(tokenizer_dir: str, texts: list[str]) -> float:
    """Rows/s of the fast tokenizer batch-encoding ``texts`` in this process (its Rust threads on every core)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    from s2l_ray.models import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    tok(texts[:1000])
    start = time.time()
    for i in range(0, len(texts), 8192):
        tok(texts[i:i + 8192])
    return len(texts) / (time.time() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--output", default="runs/bench-corpus")
    p.add_argument("--piece-mb", type=float, default=32.0)
    p.add_argument("--raw-rows", type=int, default=200_000, help="rows the raw tokenisation rate is measured on")
    a = p.parse_args(argv)

    import ray

    from s2l_ray import demo
    from s2l_ray.config import CorpusConfig, DemoConfig, TextConfig
    from s2l_ray.corpus import store
    from s2l_ray.layout import RunDir

    os.makedirs(a.output, exist_ok=True)
    tokenizer = demo.build(DemoConfig(), os.path.join(a.output, "demo"))["tokenizer"]
    data = os.path.join(a.output, f"rows-{a.rows}.jsonl")
    if not os.path.exists(data):  # in a child process, so that the driver's memory below is the stage's alone
        t0 = time.time()
        write = "import sys; from s2l_ray import demo; demo.write_word_problems(sys.argv[1], int(sys.argv[2]))"
        subprocess.run([sys.executable, "-c", write, data, str(a.rows)], check=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        print(f"wrote {a.rows:,} rows, {os.path.getsize(data) / 2**20:.0f} MiB, in {time.time() - t0:.1f}s")
    run = RunDir(os.path.join(a.output, "run"))
    shutil.rmtree(run.root, ignore_errors=True)
    ray.init(include_dashboard=False)
    sampler = MemorySampler()
    sampler.start()
    t0 = time.time()
    stats = store(run, CorpusConfig(path=data), TextConfig(), tokenizer, piece_bytes=int(a.piece_mb * 2**20))
    wall = time.time() - t0
    sampler.stop.set()
    sampler.join()
    order = training_order_cost(run, stats)
    ray.shutdown()
    rate = stats["rows"] / wall
    template = TextConfig().template
    texts = []
    with open(data) as f:
        for _, line in zip(range(a.raw_rows), f):
            r = json.loads(line)
            texts.append(template.format(prompt=r["prompt"]) + r["response"])
    raw = raw_rate(tokenizer, texts)
    gib = 2**30
    print(f"corpus stage: {stats['rows']:,} rows in {len(stats['files'])} parts from {stats['pieces']} pieces, "
          f"{wall:.1f}s, {rate:,.0f} rows/s")
    print(f"peak memory (PSS): driver {sampler.driver / gib:.2f} GiB, largest Ray process "
          f"{sampler.largest / gib:.2f} GiB, all Ray processes {sampler.ray_total / gib:.2f} GiB")
    print(f"raw tokenisation, one process, all {os.cpu_count()} cores: {raw:,.0f} rows/s; "
          f"ingest at {100 * rate / raw:.0f}% of it")
    print(f"training order (batches): the stored corpus into the object store {order['load']:.1f}s "
          f"({order['bytes'] / 2**20:.0f} MiB); an epoch's permutation {1000 * order['permutation']:.0f} ms; "
          f"one worker's batches of 16 assembled at {order['rate']:,.0f} rows/s ({order['rows']:,} rows)")
    return 0


def training_order_cost(run, stats: dict) -> dict:
    """What the seeded per-epoch permutation costs on this corpus: loading it into the object store once,
    drawing one epoch's permutation, and assembling one worker's batches (as the proxy's workers do)."""
    import ray

    from s2l_ray import batches

    t0 = time.time()
    data = batches.load(run.uri, [run.path("corpus", f) for f in stats["files"]], stats["part_rows"])
    rows = batches.Rows(data)
    load = time.time() - t0
    t0 = time.time()
    positions = batches.epoch_positions(data.n, 0, 0, 0, 2)
    permutation = time.time() - t0
    t0 = time.time()
    n = sum(len(ids) for ids, _ in batches.iterate(rows, positions[:200_000], 16))
    size = sum(sum(a.nbytes for a in part) for part in ray.get(list(data.refs)))
    del rows
    return {"load": load, "permutation": permutation, "rate": n / (time.time() - t0), "rows": n, "bytes": size}


if __name__ == "__main__":
    sys.exit(main())
