"""Every ``benchmarks/bench_*.py`` through its command line at a tiny size, from an empty working directory (as on a
fresh checkout: nothing cached, no earlier output), so that no benchmark the README gives can rot unseen."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def bench(name: str, args: list[str], cwd: Path, timeout: int = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each job starts its own local Ray
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def test_bench_corpus(tmp_path):
    out = bench("bench_corpus.py", ["--rows", "3000", "--raw-rows", "1000", "--piece-mb", "0.1",
                                    "--output", "out"], tmp_path)
    assert "wrote 3,000 rows" in out and "corpus stage: 3,000 rows" in out and "% of it" in out


def test_bench_select(tmp_path):
    out = bench("bench_select.py", ["--rows", "20000", "--points", "4", "--k", "8", "--chunk-rows", "5000"],
                tmp_path)
    assert "report.html (" in out and "total, trajectories to selection" in out


def test_bench_scoring(tmp_path):
    out = bench("bench_scoring.py", ["--model-shape", "tiny", "--rows", "200", "--reference-rows", "40",
                                     "--actors", "1"], tmp_path)
    assert "official loop" in out


def test_bench_order(tmp_path):
    out = bench("bench_order.py", ["--per-source", "30", "--clusters", "4", "--points", "2", "--output", "out"],
                tmp_path)
    assert "purity" in out


def test_bench_pipeline(tmp_path):
    out = bench("bench_pipeline.py", ["--rows", "600", "--points", "2", "--output", "out"], tmp_path)
    assert "end to end" in out


def test_bench_train(tmp_path):
    """The in-process padded and packed steps (``--finetune`` and ``--select`` are plain ``finetune.run`` and
    ``pipeline.select`` calls, two each, left out here for the suite's time)."""
    out = bench("bench_train.py", ["--steps", "2", "--shapes", "tiny", "--long-rows", "64", "--per-source", "8",
                                   "--no-finetune", "--no-select", "--output", "out"], tmp_path)
    assert "packed/padded" in out and "real-token share" in out
    losses = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "max |loss difference|" in line]
    assert len(losses) == 2 and max(losses) < 1e-5  # packed and padded steps agree
