"""Benchmark trajectories -> clustering -> selection -> report.html on synthetic trajectories.

Writes a synthetic run (corpus + trajectory points, chunk by chunk) into ``--output`` (a
temporary folder by default, removed afterwards), then runs the selection stages on a local
Ray and prints wall time per stage, the size of the run's report.html, and peak memory (RSS and
PSS of the driver, of all Ray processes together, and of both), sampled every 0.2 s, with the machine's load average (other
work on the machine inflates wall times). An output folder that already holds a synthetic run
of the same size is reused (generation skipped).

    python benchmarks/bench_select.py --rows 10000000 --points 12 --k 100
"""
from __future__ import annotations

import _path  # noqa: F401,I001  (first: the repo root on sys.path)
import argparse
import json
import os
import shutil
import tempfile
import threading
import time

import psutil
import pyarrow.fs as pafs

from s2l_ray import trajectories
from s2l_ray.clustering import cluster_run
from s2l_ray.config import ClusterConfig, SelectConfig
from s2l_ray.layout import RunDir, exists
from s2l_ray.report import write_html
from s2l_ray.selection.stage import select_run

GIB = 2 ** 30


class PeakMemory:
    """Background sampler of memory: this process (driver), its descendants (Ray), and both.

    RSS sums count shared memory (Ray's object store) once per process that maps it, so they
    overstate the total; PSS splits shared pages among those processes and sums to the truth.
    """

    KEYS = ("driver_rss", "ray_rss", "total_rss", "driver_pss", "ray_pss", "total_pss")

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak = interval, dict.fromkeys(self.KEYS, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        driver = me.memory_full_info()
        ray_rss = ray_pss = 0
        for p in me.children(recursive=True):
            try:
                m = p.memory_full_info()
            except psutil.Error:  # the process ended between listing and reading
                continue
            ray_rss, ray_pss = ray_rss + m.rss, ray_pss + m.pss
        now = (driver.rss, ray_rss, driver.rss + ray_rss, driver.pss, ray_pss, driver.pss + ray_pss)
        for key, value in zip(self.KEYS, now):
            self.peak[key] = max(self.peak[key], value)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "PeakMemory":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def gib(self) -> dict:
        return {k: round(v / GIB, 3) for k, v in self.peak.items()}


def reusable(run: RunDir, rows: int, points: int) -> bool:
    return run.read_manifest().get("corpus", {}).get("rows") == rows and sorted(run.done_points()) == list(range(points))


def generate(run: RunDir, args: argparse.Namespace) -> dict:
    if reusable(run, args.rows, args.points):
        return {"reused": True}
    if exists(run.fs, run.root) and run.fs.get_file_info(pafs.FileSelector(run.root)):
        raise SystemExit(f"{run.root} exists and holds something other than a {args.rows} x {args.points} run")
    with PeakMemory() as mem:
        out = trajectories.write_synthetic_run(run, args.rows, args.points, num_sources=args.sources,
                                               chunk_rows=args.chunk_rows, seed=args.seed)
    return {"seconds": out["seconds"], "peak_memory_gib": mem.gib()}


def select(run: RunDir, args: argparse.Namespace) -> dict:
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cluster_cfg = ClusterConfig(k=args.k)
    with PeakMemory() as mem:
        start = time.time()
        clusters = cluster_run(run, cluster_cfg, seed=args.seed, num_points=args.points)
        middle = time.time()
        selection = select_run(run, SelectConfig(budgets=[args.budget]), cluster_cfg, seed=args.seed)
        end = time.time()
        run.update_manifest(clusters=clusters, selection=selection)
        page = write_html(run)
        reported = time.time()
    ray.shutdown()
    return {"seconds": round(end - start, 3), "cluster_seconds": round(middle - start, 3),
            "select_seconds": round(end - middle, 3), "report_seconds": round(reported - end, 3),
            "report_bytes": run.fs.get_file_info(page).size, "cluster_timings": clusters["timings"],
            "select_timings": selection["timings"], "peak_memory_gib": mem.gib(),
            "backend": clusters["backend"], "k": clusters["k"], "sample_size": clusters["sample_size"],
            "inertia": clusters["inertia"], "selected": selection["budgets"]}


def summary(report: dict) -> str:
    """Wall time per stage and peak memory, as a small table."""
    gen, sel = report["generate"], report["select"]
    rows = [("generate (separate)", "reused" if gen.get("reused") else f"{gen['seconds']:.1f}")]
    rows += [(f"cluster: {k}", f"{v:.1f}") for k, v in sel["cluster_timings"].items()]
    rows += [(f"select: {k}", f"{v:.1f}") for k, v in sel["select_timings"].items()]
    rows += [("total, trajectories to selection", f"{sel['seconds']:.1f}"),
             (f"report.html ({sel['report_bytes'] / 2**20:.2f} MiB)", f"{sel['report_seconds']:.1f}")]
    mem = sel["peak_memory_gib"]
    lines = [f"{name:<34}{value:>8} s" for name, value in rows]
    lines.append(f"peak memory (GiB): driver RSS {mem['driver_rss']}, Ray RSS {mem['ray_rss']}, "
                 f"sum RSS {mem['total_rss']}; driver PSS {mem['driver_pss']}, sum PSS {mem['total_pss']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--points", type=int, default=12)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--sources", type=int, default=8)
    ap.add_argument("--chunk-rows", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default="", help="run folder to write (default: a temporary one, removed after)")
    args = ap.parse_args()
    root = args.output or tempfile.mkdtemp(prefix="bench_select_")
    try:
        run = RunDir(root)
        report = {"rows": args.rows, "points": args.points, "cpus": os.cpu_count(),
                  "load_average_before": os.getloadavg(), "generate": generate(run, args),
                  "select": select(run, args), "load_average_after": os.getloadavg()}
    finally:
        if not args.output:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(report, indent=2))
    print(summary(report))
    if args.output:
        with open(os.path.join(root, "bench.json"), "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
