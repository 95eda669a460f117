"""jobs/select.py end to end, submitted with `ray job submit` to a local Ray head started here."""
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """Processes of session ``sid`` (the Ray head's processes and the workers its raylet starts)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True, check=True).stdout
    return [int(p) for p, s in (line.split() for line in out.splitlines()) if int(s) == sid and int(p) != sid]


def stop_session(sid: int, grace: float = 20.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds, to the processes of session ``sid`` only."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_pids(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + grace
        while session_pids(sid) and time.time() < deadline:
            time.sleep(0.5)


@pytest.fixture
def ray_head(tmp_path):
    """A fresh single-node Ray head (the session's local Ray is paused meanwhile).

    Its ports are all free ones (the dashboard agent's default 52365 is taken by any other Ray
    on the machine, and then no job can be submitted), and it runs in a session of its own so
    that teardown stops its processes only, not every Ray on the machine as `ray stop` would.
    """
    import ray

    was_up = ray.is_initialized()
    ray.shutdown()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    port, dash = free_port(), free_port()
    temp = f"/tmp/ray-s2l-{port}"
    start = subprocess.Popen(
        ["ray", "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={free_port()}",
         f"--ray-client-server-port={free_port()}", f"--temp-dir={temp}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = start.communicate(timeout=300)
        assert start.returncode == 0, output[-3000:]
        yield f"http://127.0.0.1:{dash}", env
    finally:
        stop_session(start.pid)
        if was_up:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)


def test_select_job_submitted_to_a_ray_head(ray_head, demo_small, tmp_path):
    address, env = ray_head
    out = tmp_path / "run"
    job_id = f"s2l-test-{uuid.uuid4().hex[:8]}"
    cmd = ["ray", "job", "submit", f"--address={address}", f"--submission-id={job_id}", f"--working-dir={REPO}", "--",
           "python", "jobs/select.py", "--data", demo_small["train"], "--output", str(out), "--budget", "12",
           "--clusters", "4", "--num-workers", "2", "--seed", "3",
           "--set", f"text.tokenizer={demo_small['tokenizer']}", "--set", "proxy.epochs=1",
           "--set", "proxy.num_points=2", "--set", "proxy.batch_size=8", "--set", "proxy.cpus_per_worker=0.5",
           "--set", "proxy.lr=0.003"]
    started = time.time()
    for _ in range(6):  # on a loaded machine the head's job agent can register after its dashboard answers
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        logs = proc.stdout + proc.stderr
        if proc.returncode == 0 or "No available agent to submit job" not in logs:
            break
        time.sleep(5)
    assert proc.returncode == 0, logs[-4000:]
    assert "next: python jobs/finetune.py" in logs  # `ray job submit` follows the job's output to its end
    # what `ray job logs <id>` shows of the finished job: every stage's progress and the summary
    stored = subprocess.run(["ray", "job", "logs", f"--address={address}", job_id], env=env, capture_output=True,
                            text=True, timeout=120)
    assert stored.returncode == 0, stored.stderr[-2000:]
    job_logs = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", stored.stdout)  # colour and cursor codes
    stamp = r"\[s2l \d\d:\d\d:\d\d\] "
    for pattern in (stamp + r"corpus: 60 rows in 1 parts \(1 pieces read\), 3 sources", stamp + "proxy: 2 trajectory points over 1 epochs, 2 workers",
                    r"Started training worker group of size 2",  # Ray Train
                    r"\(RayTrainWorker pid=\d+\) \[proxy\] point 1/2 at step 2/4 train_loss=",
                    r"\(RayTrainWorker pid=\d+\) \[proxy\] point 2/2 at step 4/4",
                    r"Dataset \S+ execution finished in",  # Ray Data
                    r"\[scoring\] point 0: 60 rows scored", r"\[scoring\] point 1: 60 rows scored",
                    stamp + "proxy: trajectories complete", stamp + "clusters: 4 clusters",
                    stamp + "done", r"budget 12: 12 examples -> " + re.escape(str(out / "selected.jsonl")),
                    r"next: python jobs/finetune.py --data " + re.escape(str(out))):
        assert re.search(pattern, job_logs), f"{pattern!r} missing from `ray job logs {job_id}`"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["corpus"]["rows"] == 60 and manifest["clusters"]["k"] == 4
    sel = pq.read_table(out / "selection.parquet")
    assert sel.num_rows == 12 == len(set(sel.column("id").to_pylist()))
    corpus_ids = set(pq.read_table(out / "corpus", columns=["id"]).column("id").to_pylist())
    assert set(sel.column("id").to_pylist()) <= corpus_ids
    rows = [json.loads(x) for x in (out / "selected.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(sel.column("id").to_pylist())
    assert {"prompt", "response", "source"} <= set(rows[0])
    assert pq.read_table(out / "clusters.parquet").num_rows == 60
    assert (out / "report.png").stat().st_size > 10_000
    print(f"job took {time.time() - started:.0f}s")


def _select(args: list[str], cwd, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "select.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("data,extra,message", [
    ("bad.jsonl", ["--set", "text.tokenizer=/nonexistent/tokenizer"], r"bad\.jsonl:2: malformed JSON"),
    ("bad.jsonl", ["--proxy-model", "/nonexistent/model"], r"bad\.jsonl:2: malformed JSON"),
    ("bad.jsonl", [], r"bad\.jsonl:2: malformed JSON"),
    ("missing.jsonl", [], r"corpus path does not exist: .*missing\.jsonl"),
    ("missing.jsonl", ["--proxy-model", "/nonexistent/model"], r"corpus path does not exist"),
    ("good.jsonl", ["--set", "text.tokenizer=/nonexistent/tokenizer"], r"tokenizer directory does not exist"),
])
def test_bad_input_gives_one_error_line_whatever_else_is_given(tmp_path, data, extra, message):
    """Data errors are reported first, before any model or tokenizer error, with or without them."""
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p2"\n')
    (tmp_path / "good.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    proc = _select(["--data", str(tmp_path / data), "--output", str(tmp_path / "r"), *extra], tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and re.search(message, errors[0]), proc.stderr[-2000:]


def test_unknown_config_key_is_refused(tmp_path):
    proc = _select(["--set", "proxy.epoch=2"], tmp_path)
    assert proc.returncode == 2 and "unknown key 'proxy.epoch'" in proc.stderr and "epochs" in proc.stderr


@pytest.mark.slow
def test_data_alone_trains_a_tokenizer_and_runs_the_whole_selection(tmp_path, demo_small):
    """`python jobs/select.py --data X.jsonl`: no model, no tokenizer, no other flag (output: ./runs/demo)."""
    rows = [json.loads(line) for line in open(demo_small["train"])]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({**r, "prompt": f"{r['prompt']} (case {k})"}) + "\n"
                            for k in range(4) for r in rows))  # 240 rows: room for the default K=100
    proc = _select(["--data", str(data)], tmp_path, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    out = tmp_path / "runs" / "demo"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["text"]["tokenizer"] == str(out / "tokenizer") and not manifest["demo"]
    assert (out / "tokenizer" / "tokenizer.json").is_file() and manifest["clusters"]["k"] == 100
    assert manifest["selection"]["budgets"] == {"24": manifest["selection"]["budgets"]["24"]}
    assert f"next: python jobs/finetune.py --data {out} --model /path/to/your/target-model" in proc.stdout
