"""Every ``benchmarks/bench_*.py`` through its command line at a tiny size, from an empty working directory (as on a
fresh checkout: nothing cached, no earlier output), so that no benchmark the README gives can rot unseen.

The commands are started as soon as the session's tests are collected (``start``, from conftest), one after
another at the lowest CPU priority (``nice -n 19``), so that they run in the CPU time the other tests leave idle
(Ray's start-up waits, polling); these tests come last and wait for each command to end."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

COMMANDS = {
    "corpus": ["bench_corpus.py", "--rows", "3000", "--raw-rows", "1000", "--piece-mb", "0.1", "--output", "out"],
    "select": ["bench_select.py", "--rows", "20000", "--points", "4", "--k", "8", "--chunk-rows", "5000"],
    "scoring": ["bench_scoring.py", "--model-shape", "tiny", "--rows", "200", "--reference-rows", "40", "--actors", "1"],
    "order": ["bench_order.py", "--per-source", "30", "--clusters", "4", "--points", "2", "--output", "out"],
    "pipeline": ["bench_pipeline.py", "--rows", "600", "--points", "2", "--output", "out"],
    # the in-process padded and packed steps (``--finetune`` and ``--select`` are plain ``finetune.run`` and
    # ``pipeline.select`` calls, two each, left out here for the suite's time)
    "train": ["bench_train.py", "--steps", "2", "--shapes", "tiny", "--long-rows", "64", "--per-source", "8",
              "--no-finetune", "--no-select", "--output", "out"],
}
_done: dict[str, subprocess.CompletedProcess] = {}
_ended = threading.Condition()
_state: dict = {}  # the folder the commands run in; the command running now


def start() -> None:
    """Run every command, one after another in a thread, each in an empty folder of its own, in a local Ray of its
    own (never the session's)."""
    root = _state["root"] = tempfile.mkdtemp(prefix="s2l-bench-smoke-")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def run_all() -> None:
        for name, (script, *args) in COMMANDS.items():
            cwd = Path(root) / name
            cwd.mkdir()
            cmd = ["nice", "-n", "19", sys.executable, str(REPO / "benchmarks" / script), *args]
            proc = _state["running"] = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                        text=True, env=env, start_new_session=True)
            out, err = proc.communicate()
            with _ended:
                _done[name] = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
                _ended.notify_all()

    threading.Thread(target=run_all, name="bench-smoke", daemon=True).start()


def stop() -> None:
    """At the session's end: the command still running (a session cut short) is killed, the folder removed."""
    if (proc := _state.get("running")) is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    shutil.rmtree(_state.get("root", ""), ignore_errors=True)


def bench(name: str) -> str:
    """The command's standard output, once it has ended with status 0."""
    with _ended:
        assert _ended.wait_for(lambda: name in _done, timeout=3600), f"bench_{name}.py did not end within an hour"
    proc = _done[name]
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def test_bench_corpus():
    out = bench("corpus")
    assert "wrote 3,000 rows" in out and "corpus stage: 3,000 rows" in out and "% of it" in out


def test_bench_select():
    out = bench("select")
    assert "report.html (" in out and "total, trajectories to selection" in out


def test_bench_scoring():
    assert "official loop" in bench("scoring")


def test_bench_order():
    assert "purity" in bench("order")


def test_bench_pipeline():
    assert "end to end" in bench("pipeline")


def test_bench_train():
    out = bench("train")
    assert "packed/padded" in out and "real-token share" in out
    losses = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "max |loss difference|" in line]
    assert len(losses) == 2 and max(losses) < 1e-5  # packed and padded steps agree
