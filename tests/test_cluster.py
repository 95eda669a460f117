"""Two Ray nodes that share no disk, on this machine: select, fine-tune and evaluate end to end through S3.

The head is a plain ``ray start --head``. The second node's processes run in a mount namespace of
their own (``unshare -m``) with an empty, private tmpfs over the folders this test writes to
(pytest's temporary folders and the repo's ``runs/``), so no local path of the head is visible
there; a moto S3 server on loopback is the only storage both see. The second node has the custom
resource ``node2``, and the proxy workers, scoring actors, fine-tuning workers and evaluation
actors ask for it, so they all run there: anything that reached for the head's disk would fail.
Jobs go in with ``ray job submit`` as on a real cluster.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from helpers import BUCKET, RAY, S3_ENV, descendants, free_port, keys, moto_s3, running, stop_session, title, wait_for

REPO = Path(__file__).resolve().parents[1]
PIN = "node2=1"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, demo_small):
    """(dashboard address, env for `ray job submit`, S3 filesystem, node 2's process, hidden folders, what the
    head's runs/ and the run records in its test folders were before)."""
    import ray

    from s2l_ray import progress

    was_up = ray.is_initialized()
    progress.stop_console()  # it polls the local Ray, which goes now
    ray.shutdown()
    with moto_s3() as (endpoint, fs):
        env = {**os.environ, **S3_ENV, "AWS_ENDPOINT_URL": endpoint, "RAY_AUTH_MODE": "disabled",
               "RAY_USAGE_STATS_ENABLED": "0"}
        for name in ("train", "eval", "target"):
            with open(demo_small[name], "rb") as src, fs.open_output_stream(f"{BUCKET}/data/{name}.jsonl") as dst:
                dst.write(src.read())
        pafs.copy_files(demo_small["tokenizer"], f"{BUCKET}/tokenizer", destination_filesystem=fs)
        hidden = [str(tmp_path_factory.getbasetemp()), str(REPO / "runs")]
        os.makedirs(hidden[1], exist_ok=True)
        before = (sorted(os.listdir(hidden[1])), records(hidden[0]))  # earlier tests' runs live there too
        port, dash = free_port(), free_port()
        head = subprocess.Popen(
            [RAY, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={free_port()}",
             f"--ray-client-server-port={free_port()}", f"--temp-dir=/tmp/ray-s2l-head-{port}", "--block"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        mounts = " && ".join(f"mount -t tmpfs tmpfs {d}" for d in hidden)
        node2 = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             f"{mounts} && exec {RAY} start --address=127.0.0.1:{port} --num-cpus=2 --resources='{{\"node2\": 100}}' "
             f"--dashboard-agent-listen-port={free_port()} --temp-dir=/tmp/ray-s2l-node2-{port} --block"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            def both_up() -> bool:
                out = subprocess.run([RAY, "status", f"--address=127.0.0.1:{port}"], env=env, capture_output=True,
                                     text=True).stdout
                return "node2" in out and len(re.findall(r"node_[0-9a-f]+", out)) >= 2

            wait_for(both_up, 300, "the two Ray nodes", interval=2)
            yield f"http://127.0.0.1:{dash}", env, fs, node2, hidden, before
        finally:
            for proc in (node2, head):
                stop_session(proc.pid)
                proc.kill()  # the session's leader, `ray start --block`, which stop_session leaves
                proc.wait()
            if was_up:
                ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)


def submit(cluster, args: list[str], job: str = "", timeout: int = 900) -> subprocess.CompletedProcess:
    address, env, *_ = cluster
    cmd = [RAY, "job", "submit", f"--address={address}", f"--submission-id={job or 's2l-' + uuid.uuid4().hex[:8]}",
           f"--working-dir={REPO}", "--", sys.executable, *args]
    for _ in range(6):  # the head's job agent can register a little after its dashboard answers
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0 or "No available agent to submit job" not in proc.stdout + proc.stderr:
            return proc
        time.sleep(5)
    return proc


def s3(path: str) -> str:
    return f"s3://{BUCKET}/{path}"


SELECT = ["jobs/select.py", "--data", s3("data/train.jsonl"), "--target", s3("data/target.jsonl"),
          "--method", "s2l-target", "--budget", "24", "--clusters", "4",
          "--num-workers", "2", "--set", f"text.tokenizer={s3('tokenizer')}", "--set", "proxy.epochs=1",
          "--set", "proxy.num_points=2", "--set", "proxy.batch_size=8", "--set", "proxy.workers.cpus=0.5",
          "--set", "proxy.lr=0.003", "--set", f"proxy.workers.resources={PIN}", "--set", f"scoring.actors.resources={PIN}",
          "--set", "corpus.piece_mb=0.004"]  # the 15 kB corpus in 4 pieces, read on both nodes


def finetune_args(out: str, stage: int, *extra: str) -> list[str]:
    return ["jobs/finetune.py", "--data", s3("run"), "--output", s3(out), "--zero-stage", str(stage),
            "--num-workers", "2", "--epochs", "2", "--micro-batch-size", "2", "--set", "preset=tiny",
            "--set", "lr=0.001", "--set", f"text.tokenizer={s3('tokenizer')}", "--set", "workers.cpus=0.5",
            "--set", f"workers.resources={PIN}", *extra]


@pytest.fixture(scope="module")
def selected(cluster):
    """The selection job, and what `ray job logs` shows of it."""
    address, env, *_ = cluster
    job = f"s2l-select-{uuid.uuid4().hex[:8]}"
    proc = submit(cluster, [*SELECT, "--output", s3("run")], job=job)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    stored = subprocess.run([RAY, "job", "logs", f"--address={address}", job], env=env, capture_output=True,
                            text=True, timeout=120)
    assert stored.returncode == 0, stored.stderr[-2000:]
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", stored.stdout)  # without colour and cursor codes


def test_select_writes_everything_to_the_bucket_from_the_second_node(cluster, selected):
    fs = cluster[2]
    objects = keys(fs, f"{BUCKET}/run")
    for name in ("manifest.json", "clusters.parquet", "centroids.parquet", "selection.parquet", "selected.jsonl",
                 "report.png", "report.html", "corpus/part-00000.parquet", "trajectories/_done.json", "proxy/_checkpoints.json",
                 "selected.original.jsonl", "selected.trl.parquet", "dataset_info.json", "axolotl.yaml",
                 "trajectories/checkpoint=1/part-00000.parquet", "target/manifest.json", "target/corpus/part-00000.parquet",
                 "target/trajectories/checkpoint=0/part-00000.parquet", "target/trajectories/checkpoint=1/part-00000.parquet"):
        assert objects.get(name, 0) > 0, f"{name} missing: {sorted(objects)}"
    assert len([k for k in objects if k.endswith("/model/model.safetensors")]) == 2  # Ray Train's checkpoints
    manifest = json.loads(fs.open_input_stream(f"{BUCKET}/run/manifest.json").read())
    assert manifest["corpus"]["rows"] == 60 and manifest["clusters"]["k"] == 4
    info = json.loads(fs.open_input_stream(f"{BUCKET}/run/dataset_info.json").read())
    assert info["s2l_selected"]["cloud_file_name"] == s3("run/selected.original.jsonl")  # LLaMA-Factory reads S3
    train = fs.open_input_stream(f"{BUCKET}/data/train.jsonl").read().split(b"\n")
    picked = pq.read_table(f"{BUCKET}/run/selection.parquet", filesystem=fs).to_pylist()
    assert fs.open_input_stream(f"{BUCKET}/run/selected.original.jsonl").read().split(b"\n")[:-1] == \
        [train[r["row"]] for r in picked] and {r["file"] for r in picked} == {s3("data/train.jsonl")}
    assert manifest["selection"]["method"] == "s2l-target" and manifest["selection"]["target_rows"] == 50
    assert manifest["corpus"]["pieces"] >= 3 and len(manifest["corpus"]["pieces_by_node"]) == 2  # ingest on both
    # every stage's progress in `ray job logs`: the project's lines, each once, also those of the workers on node 2
    stamp = r"\[s2l \d\d:\d\d:\d\d\] "
    for pattern in (stamp + r"corpus: 60 rows in 1 parts \(\d pieces read\), 3 sources",
                    stamp + "proxy: 2 trajectory points over 1 epochs, 2 workers, fp32, padded rows",
                    r"\[proxy \d\d:\d\d:\d\d\] point 1/2 at step 2/4, training loss",
                    r"\[scoring \d\d:\d\d:\d\d\] point 0: 110 rows scored",
                    r"\[scoring \d\d:\d\d:\d\d\] point 1: 110 rows scored", stamp + "target: 50 examples from "
                    + re.escape(s3("data/target.jsonl")), stamp + "clusters: 4 clusters", stamp + "done",
                    r"budget 24: 24 examples -> " + re.escape(s3("run/selected.jsonl")),
                    r"report:       " + re.escape(s3("run/report.html")),
                    r"next: python jobs/finetune.py --data " + re.escape(s3("run"))):
        assert len(re.findall(pattern, selected)) == 1, f"{pattern!r} not once in `ray job logs`"
    assert "RayTrainWorker" not in selected and "core_worker" not in selected  # Ray's own output: --verbose
    assert_nothing_local(cluster)


def records(folder: str) -> list[Path]:
    """The run records (manifest, fine-tuning and evaluation records) anywhere under ``folder``."""
    return sorted(p for p in Path(folder).rglob("*") if p.name in ("manifest.json", "finetune.json", "metrics.json"))


def assert_nothing_local(cluster) -> None:
    """No output on the head's disk (the test's folders, the repo's runs/, Ray Train's ~/ray_results) and
    nothing at all in the second node's private folders."""
    *_, node2, hidden, (runs_before, records_before) = cluster
    raylet = next(p for p in descendants(node2.pid) if running(p) and "raylet" in title(p))
    for d in hidden:
        seen_by_node2 = Path(f"/proc/{raylet}/root{d}")  # the folder as node 2's processes see it
        assert sorted(p.name for p in seen_by_node2.iterdir()) == [], d
    assert sorted(os.listdir(hidden[1])) == runs_before
    assert records(hidden[0]) == records_before
    results = Path.home() / "ray_results"
    assert not results.is_dir() or not list(results.glob("train*"))


def test_a_local_output_is_refused_before_work_starts(cluster, tmp_path):
    proc = submit(cluster, [*SELECT, "--output", str(tmp_path / "local-run")])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert re.search(r"error: output \S*local-run is a local path that node [\d.]+ \([0-9a-f]{12}\) cannot see",
                     out), out[-3000:]
    assert "proxy: " not in out  # refused before the corpus or the proxy started


@pytest.fixture(scope="module")
def tuned(cluster, selected):
    """ZeRO-2 with checkpoints, one of its workers killed once a checkpoint is in the bucket (frozen with SIGSTOP
    first, to check that the export has not happened yet): its record. (That a resumed run equals an uninterrupted
    one is tests/test_finetune.py's; here it resumes from what the bucket holds.)"""
    address, env, fs, node2, *_ = cluster
    job = f"s2l-{uuid.uuid4().hex[:8]}"
    since = time.time()
    submitted = subprocess.Popen([RAY, "job", "submit", f"--address={address}", f"--submission-id={job}",
                                  f"--working-dir={REPO}", "--", sys.executable,
                                  *finetune_args("target2", 2, "--checkpoint-every", "2")],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def checkpointed() -> bool:  # registered by Ray Train's controller, not just uploaded: it resumes from that
        assert submitted.poll() is None, submitted.stdout.read()[-4000:]
        snapshot = f"{BUCKET}/target2/train/checkpoint_manager_snapshot.json"
        if fs.get_file_info(snapshot).type.name == "NotFound":
            return False
        return bool(json.loads(fs.open_input_stream(snapshot).read()).get("checkpoint_results"))

    wait_for(checkpointed, 600, "a fine-tuning checkpoint recorded in the bucket", interval=0.2)
    workers = [p for p in sorted(descendants(node2.pid)) if title(p).startswith("ray::RayTrainWorker") and running(p)
               and psutil.Process(p).create_time() > since]  # this job's, not a finished job's exiting ones
    assert len(workers) == 2, workers
    for p in workers:
        os.kill(p, signal.SIGSTOP)
    assert fs.get_file_info(f"{BUCKET}/target2/trainer_state.json").type.name == "NotFound", \
        "the run finished before its workers were stopped"
    killed = title(workers[0])
    os.kill(workers[0], signal.SIGKILL)
    os.kill(workers[1], signal.SIGCONT)
    output, _ = submitted.communicate(timeout=900)
    assert submitted.returncode == 0, output[-4000:]
    record = json.loads(fs.open_input_stream(f"{BUCKET}/target2/finetune.json").read())
    assert len(record["attempts"]) == 2, f"killed {workers[0]} ({killed}); no restart:\n{output[-6000:]}"
    return record


def test_fine_tuning_on_the_second_node_exports_to_the_bucket_and_resumes_from_it(cluster, tuned):
    fs = cluster[2]
    objects = keys(fs, f"{BUCKET}/target2")
    assert tuned["status"] == "done" and tuned["model"] == s3("target2/model")
    for name in ("model/config.json", "model/model.safetensors", "model/tokenizer.json", "trainer_state.json",
                 "finetune.json", "corpus/part-00000.parquet"):
        assert objects.get(name, 0) > 0, f"{name} missing: {sorted(objects)}"
    assert tuned["attempts"][0] == 0 and tuned["attempts"][1] > 0  # the second from the bucket's checkpoint
    assert [e["step"] for e in tuned["log"] if "loss" in e] == list(range(1, tuned["plan"]["total_steps"] + 1))
    assert_nothing_local(cluster)


def test_evaluation_reads_the_model_from_the_bucket_and_writes_its_metrics_there(cluster, tuned):
    fs = cluster[2]
    proc = submit(cluster, ["jobs/evaluate.py", "--model", s3("target2"), "--data", s3("data/eval.jsonl"),
                            "--limit", "6", "--max-new-tokens", "8", "--num-actors", "1",
                            "--set", f"text.tokenizer={s3('tokenizer')}", "--set", f"actors.resources={PIN}"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    metrics = json.loads(fs.open_input_stream(f"{BUCKET}/target2/eval/metrics.json").read())
    assert metrics["rows"] == 6 and metrics["model"] == s3("target2/model")
    assert {"metrics.json", "metrics.md", "predictions.jsonl"} <= set(keys(fs, f"{BUCKET}/target2/eval"))
    assert_nothing_local(cluster)
