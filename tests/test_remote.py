"""The whole selection with the corpus and the run directory on S3: a moto S3 server on loopback.

Endpoint and credentials reach the driver and every Ray worker through the standard AWS
environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), set before a fresh Ray starts.
"""
import json
import os
import posixpath
import socket
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
BUCKET = "s2l-test"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fix_moto_complete_multipart():
    """moto 5.2.1 answers CompleteMultipartUpload with root <CompleteMultipartUploadResponse>; real S3
    (and Arrow's check for errors embedded in a 200 reply) uses <CompleteMultipartUploadResult>, so every
    pyarrow upload fails against it (getmoto/moto#10055, fixed in later moto). Rename the root in place."""
    from moto.s3.responses import S3Response

    original = S3Response._key_response_post

    def patched(self, *args, **kwargs):
        status, headers, body = original(self, *args, **kwargs)
        if isinstance(body, bytes) and b"<CompleteMultipartUploadResponse" in body:
            body = body.replace(b"CompleteMultipartUploadResponse", b"CompleteMultipartUploadResult")
        elif isinstance(body, str) and "<CompleteMultipartUploadResponse" in body:
            body = body.replace("CompleteMultipartUploadResponse", "CompleteMultipartUploadResult")
        return status, headers, body

    S3Response._key_response_post = patched
    return lambda: setattr(S3Response, "_key_response_post", original)


@pytest.fixture
def s3(tmp_path):
    """A moto S3 server on 127.0.0.1, the AWS env pointing at it, a fresh Ray that inherits that env,
    and the working directory moved to an empty folder (to catch local writes meant for S3)."""
    import ray
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    unpatch = _fix_moto_complete_multipart()
    host, port = server.get_host_and_port()
    env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    cwd = os.getcwd()
    was_up = ray.is_initialized()
    ray.shutdown()
    os.environ.update(env)
    work = tmp_path / "cwd"
    work.mkdir()
    os.chdir(work)
    try:
        import boto3

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
        fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}")  # AWS_ENDPOINT_URL: pyarrow's from_uri honours it
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield fs, work
    finally:
        ray.shutdown()
        os.chdir(cwd)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        unpatch()
        server.stop()
        if was_up:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)


def keys(fs: pafs.FileSystem, prefix: str) -> dict[str, int]:
    """Object keys (relative to prefix) and sizes under s3://<prefix>."""
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True))
    return {posixpath.relpath(i.path, prefix): i.size for i in infos if i.type == pafs.FileType.File}


def test_select_reads_and_writes_s3(s3, demo_small):
    from s2l_ray import pipeline
    from s2l_ray.config import load_config

    fs, work = s3
    with open(demo_small["train"], "rb") as src, fs.open_output_stream(f"{BUCKET}/data/train.jsonl") as dst:
        dst.write(src.read())  # a folder of shards on S3, here one
    cfg = load_config(None, {
        "corpus.path": f"s3://{BUCKET}/data/", "output": f"s3://{BUCKET}/run", "seed": 3,
        "text.tokenizer": demo_small["tokenizer"], "proxy.preset": "tiny", "proxy.epochs": 1,
        "proxy.num_points": 2, "proxy.batch_size": 8, "proxy.num_workers": 1, "proxy.cpus_per_worker": 0.5,
        "proxy.lr": 3e-3, "cluster.k": 4, "select.budgets": "12"})
    manifest = pipeline.select(cfg)

    objects = keys(fs, f"{BUCKET}/run")
    for name in ("manifest.json", "clusters.parquet", "selection.parquet", "selected.jsonl", "report.png",
                 "corpus/part-00000.parquet", "trajectories/_done.json", "proxy/_checkpoints.json",
                 "trajectories/checkpoint=0/part-00000.parquet", "trajectories/checkpoint=1/part-00000.parquet"):
        assert objects.get(name, 0) > 0, f"s3://{BUCKET}/run/{name} missing; objects: {sorted(objects)}"
    # Ray Train's storage: both trajectory checkpoints persisted under proxy/ on S3
    ckpts = {k for k in objects if k.startswith("proxy/proxy-") and k.endswith("/model/model.safetensors")}
    assert len(ckpts) == 2, sorted(objects)
    index = json.loads(fs.open_input_stream(f"{BUCKET}/run/proxy/_checkpoints.json").read())
    assert all(p["path"].startswith(f"{BUCKET}/run/proxy/") for p in index["points"].values())
    done = json.loads(fs.open_input_stream(f"{BUCKET}/run/trajectories/_done.json").read())
    assert all(f.startswith(f"{BUCKET}/run/trajectories/") for p in done["points"].values() for f in p["files"])

    assert manifest["corpus"]["rows"] == 60 and manifest["clusters"]["k"] == 4
    sel = pq.read_table(f"{BUCKET}/run/selection.parquet", filesystem=fs)
    assert sel.num_rows == 12 == len(set(sel.column("id").to_pylist()))
    rows = [json.loads(x) for x in fs.open_input_stream(f"{BUCKET}/run/selected.jsonl").read().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(sel.column("id").to_pylist())
    assert pq.read_table(f"{BUCKET}/run/clusters.parquet", filesystem=fs).num_rows == 60
    assert objects["report.png"] > 10_000

    # nothing landed on local disk in place of S3: not in the working directory of the driver and
    # the Ray workers, not in the repo, not in Ray Train's default local storage
    assert list(work.iterdir()) == []
    assert not (REPO / "s3:").exists() and not (REPO / BUCKET).exists()
    assert manifest["proxy"]["trained"]
    train_run = next(iter(ckpts)).split("/")[1]  # proxy-<time>-<pid>
    assert not (Path.home() / "ray_results" / train_run).exists()
