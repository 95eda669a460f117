"""The cluster shape the project ships (``cluster.yaml``), on this machine: a head with no CPUs and worker nodes the
autoscaler starts on demand, through Ray's fake multi-node provider. The worker type carries a custom resource,
``gpu_node``, standing in for a GPU type; the proxy's workers and scoring actors ask for it. Storage is a moto S3
server. The selection job starts with the head alone, scales workers up and finishes; before any worker has
joined, a local path and ``use_gpu: auto`` are refused at once with one ``error:`` line.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

from helpers import BUCKET, RAY, S3_ENV, free_port, moto_s3, stop_session, wait_for, with_env

REPO = Path(__file__).resolve().parents[1]
WORKER_ID = "ffffffffffffffffffffffffffffffffffffffffffffffffff"  # the fake provider's worker node ids start so
CLUSTER_MARK = "S2L_TEST_AUTOSCALING"  # in the environment of every process of the test's cluster, and no other
pytestmark = pytest.mark.slow


def autoscaler_config(gcs: str) -> dict:
    """A fake_multinode cluster: a 0-CPU head, up to two 2-CPU workers with ``gpu_node`` started on demand."""
    return {"cluster_name": "s2l-fake", "max_workers": 2, "idle_timeout_minutes": 5, "upscaling_speed": 2.0,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": gcs},
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                "gpu.worker": {"resources": {"CPU": 2, "gpu_node": 1}, "node_config": {}, "min_workers": 0,
                               "max_workers": 2}},
            "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {},
            "cluster_synced_files": [], "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
            "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": []}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, demo_small):
    """(env for a driver on the head, S3 filesystem, address): the head alone is up."""
    import ray
    from ray._private.services import get_node_ip_address

    from s2l_ray import progress

    was_up = ray.is_initialized()
    progress.stop_console()
    ray.shutdown()
    tmp = tmp_path_factory.mktemp("autoscaling")
    with moto_s3() as (endpoint, fs):
        for name in ("train", "target", "eval"):
            with open(demo_small[name], "rb") as src, fs.open_output_stream(f"{BUCKET}/data/{name}.jsonl") as dst:
                dst.write(src.read())
        pafs.copy_files(demo_small["tokenizer"], f"{BUCKET}/tokenizer", destination_filesystem=fs)
        port = free_port()
        address = f"{get_node_ip_address()}:{port}"
        config = tmp / "autoscaler.yaml"
        config.write_text(yaml.safe_dump(autoscaler_config(address)))
        env = {**os.environ, **S3_ENV, "AWS_ENDPOINT_URL": endpoint, "RAY_AUTH_MODE": "disabled",
               "RAY_USAGE_STATS_ENABLED": "0", "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
               CLUSTER_MARK: str(port)}
        head = subprocess.Popen(
            [RAY, "start", "--head", f"--port={port}", "--num-cpus=0", "--num-gpus=0", "--include-dashboard=false",
             f"--autoscaling-config={config}", f"--ray-client-server-port={free_port()}",
             f"--temp-dir=/tmp/ray-s2l-auto-{port}", "--block"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for(lambda: "ray.head.default" in status(env, address), 120, "the autoscaling cluster's head",
                     interval=1)
            yield {**env, "RAY_ADDRESS": address}, fs, address
        finally:
            stop_session(head.pid)
            for pid in with_env(CLUSTER_MARK, str(port)):  # the nodes the autoscaler started, wherever they went
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            head.kill()
            head.wait()
            shutil.rmtree(f"/tmp/ray-s2l-auto-{port}", ignore_errors=True)
            if was_up:
                ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)


def status(env: dict, address: str) -> str:
    return subprocess.run([RAY, "status", f"--address={address}"], env=env, capture_output=True, text=True).stdout


def select(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/select.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


def s3(path: str) -> str:
    return f"s3://{BUCKET}/{path}"


SMALL = ["--data", s3("data/train.jsonl"), "--budget", "24", "--clusters", "4", "--num-workers", "2",
         "--set", f"text.tokenizer={s3('tokenizer')}", "--set", "proxy.epochs=1", "--set", "proxy.num_points=2",
         "--set", "proxy.batch_size=8", "--set", "proxy.workers.cpus=0.5", "--set", "proxy.lr=0.003",
         "--set", "proxy.workers.resources=gpu_node=0.25", "--set", "scoring.actors.resources=gpu_node=0.25",
         "--set", "corpus.piece_mb=0.004"]


def error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return errors[0]


def test_before_workers_join_local_paths_and_auto_gpu_are_refused_at_once(cluster, tmp_path):
    env, _, address = cluster
    out = tmp_path / "run"
    line = error_line(select(env, *SMALL, "--output", str(out), "--set", "proxy.use_gpu=false"))
    assert f"output {out} is a local path" in line and "no node that runs this job's work has joined" in line
    assert not out.exists()
    line = error_line(select(env, *SMALL, "--output", s3("refused")))
    assert "proxy.use_gpu=auto: no worker node has joined this cluster yet" in line
    assert "gpu.worker" not in status(env, address), "a refused job starts no worker node"


def test_select_through_s3_scales_workers_up_and_finishes(cluster):
    env, fs, address = cluster
    proc = select(env, *SMALL, "--output", s3("run"), "--target", s3("data/target.jsonl"), "--method", "s2l-target",
                  "--set", "proxy.use_gpu=false")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    manifest = json.loads(fs.open_input_stream(f"{BUCKET}/run/manifest.json").read())
    assert manifest["corpus"]["rows"] == 60 and manifest["selection"]["budgets"]["24"]["selected"] == 24
    assert all(n.startswith(WORKER_ID) for n in manifest["corpus"]["pieces_by_node"]), manifest["corpus"]
    assert "gpu.worker" in status(env, address)


def test_evaluation_on_the_autoscaling_cluster_reads_and_writes_the_bucket(cluster):
    """The proxy's last checkpoint, evaluated from the bucket by an actor pool that starts with one actor and grows as
    nodes join (the head has no CPUs, so none is clamped to what is present at start)."""
    env, fs, *_ = cluster
    points = json.loads(fs.open_input_stream(f"{BUCKET}/run/proxy/_checkpoints.json").read())["points"]
    model = max(points.values(), key=lambda p: p["step"])["path"].rstrip("/") + "/model"  # a bucket path
    proc = subprocess.run([sys.executable, "jobs/evaluate.py", "--model", model if "://" in model else f"s3://{model}",
                           "--data", s3("data/eval.jsonl"), "--output", s3("eval"), "--limit", "6",
                           "--max-new-tokens", "4", "--num-actors", "2", "--set", f"text.tokenizer={s3('tokenizer')}",
                           "--set", "use_gpu=false", "--set", "actors.resources=gpu_node=0.5"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    metrics = json.loads(fs.open_input_stream(f"{BUCKET}/eval/metrics.json").read())
    assert metrics["rows"] == 6
