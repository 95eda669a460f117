"""Helpers the end-to-end tests share: real processes (found, frozen, killed, stopped) and a moto S3 server."""
from __future__ import annotations

import contextlib
import os
import posixpath
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs

RAY = os.path.join(os.path.dirname(sys.executable), "ray")  # the CLI beside this Python, whatever PATH holds
BUCKET = "s2l-test"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


# -- processes ----------------------------------------------------------------------------------

def wait_for(cond, timeout: float, what: str, interval: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def title(pid: int) -> str:
    """The process's name as Ray sets it (``ray::Class.method``), or its argv[0]."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").strip()
    except OSError:
        return ""


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


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


# -- S3 ------------------------------------------------------------------------------------------

def fix_moto_complete_multipart():
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


def keys(fs: pafs.FileSystem, prefix: str) -> dict[str, int]:
    """Object keys (relative to prefix) and sizes under s3://<prefix>."""
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True))
    return {posixpath.relpath(i.path, prefix): i.size for i in infos if i.type == pafs.FileType.File}


@contextlib.contextmanager
def moto_s3():
    """A moto S3 server on 127.0.0.1 with the test bucket: yields (endpoint URL, pyarrow filesystem)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    unpatch = fix_moto_complete_multipart()
    endpoint = "http://%s:%d" % server.get_host_and_port()
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
        yield endpoint, pafs.S3FileSystem(endpoint_override=endpoint, access_key="testing", secret_key="testing",
                                          region="us-east-1")
    finally:
        unpatch()
        server.stop()
