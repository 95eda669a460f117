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
import urllib.request
from pathlib import Path

import pyarrow.fs as pafs

RAY = os.path.join(os.path.dirname(sys.executable), "ray")  # the CLI beside this Python, whatever PATH holds
BUCKET = "s2l-test"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


# -- runs ----------------------------------------------------------------------------------------

def small_selection(demo_small, output, **extra) -> dict:
    """The settings of a small selection on the demo (3 points, 2 Train workers, 8 corpus parts of 8 rows)."""
    return {"output": str(output), "corpus.path": demo_small["train"], "text.tokenizer": demo_small["tokenizer"],
            "proxy.epochs": 1, "proxy.batch_size": 8, "proxy.num_points": 3, "proxy.workers.count": 2,
            "proxy.workers.cpus": 0.5, "proxy.lr": 3e-3, "corpus.part_rows": 8, **extra}


# -- processes ----------------------------------------------------------------------------------

def job(name: str):
    """``jobs/<name>.py`` as a module, to call its ``main(argv)`` in this process (on the session's Ray, if any)."""
    import importlib.util

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(f"s2l_{name}_job", repo / "jobs" / f"{name}.py")
    job = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(repo / "jobs"))  # for its `import _path`, which takes jobs/ off sys.path again
    spec.loader.exec_module(job)
    return job


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


def with_env(name: str, value: str) -> list[int]:
    """Processes whose environment has ``name=value`` (what a process tree was started with, whatever its processes
    became or whoever adopted them; a reused process id does not match)."""
    entry = f"{name}={value}".encode()
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            with contextlib.suppress(OSError):
                if entry in Path(f"/proc/{d}/environ").read_bytes().split(b"\0"):
                    out.append(int(d))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """Processes of session ``sid`` (the Ray head's processes and the workers its raylet starts)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True, check=True).stdout
    return [int(p) for p, s in (line.split() for line in out.splitlines()) if int(s) == sid and int(p) != sid]


def stop_session(sid: int, grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds, to the processes of session ``sid`` only (a test's cluster:
    nothing in it is kept, so Ray's agents are not given their own shutdown time)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_pids(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + grace
        while session_pids(sid) and time.time() < deadline:
            time.sleep(0.5)


# -- a Hugging Face cache, offline ------------------------------------------------------------------

HUB_MAIN, HUB_PINNED = "a" * 40, "b" * 40  # the two snapshots' commit hashes


def hub_snapshot(cache: Path, kind: str, repo: str, revision: str, files: Path, main: bool) -> Path:
    """The Hub cache's own layout: file contents in ``blobs/``, the snapshot's files symlinks to them."""
    import hashlib

    root = cache / f"{kind}--{repo.replace('/', '--')}"
    snap = root / "snapshots" / revision
    for f in sorted(p for p in files.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / f.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if main:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(revision)
    return snap


def select_offline(cache: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``jobs/select.py`` with ``HF_HUB_OFFLINE=1`` on the Hub cache ``cache``, in a local Ray of its own."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "hf-home")}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "jobs" / "select.py"), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


# A target-aware selection of chat rows with the SmolLM2 cut as the proxy, 2 Train workers
CHAT_SELECTION = ["--method", "s2l-target", "--budget", "8", "--clusters", "3", "--num-workers", "2",
                  "--set", "proxy.workers.cpus=0.5", "--set", "proxy.epochs=1", "--set", "proxy.num_points=2",
                  "--set", "proxy.batch_size=4", "--set", "proxy.lr=1e-4", "--set", "corpus.part_rows=8",
                  "--set", "text.max_length=384"]


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
    # moto keeps its buckets in the process, shared by every server it starts: each test module starts empty
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).read()
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
        yield endpoint, pafs.S3FileSystem(endpoint_override=endpoint, access_key="testing", secret_key="testing",
                                          region="us-east-1")
    finally:
        unpatch()
        server.stop()


# -- a real browser ------------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"  # Debian's package (.ci/run installs it)
_CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


_DRAWN = """c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                 for (let i = 4; i < d.length; i += 4)
                   if (d[i] != d[0] || d[i + 1] != d[1] || d[i + 2] != d[2] || d[i + 3] != d[3]) return true;
                 return false; }"""


def open_page(path, screenshot=None, timeout: float = 60.0) -> dict:
    """Open a local HTML file in headless Chromium and wait until every Bokeh document on it is idle (drawn).

    Returns the console errors and page errors, how many figures there are and how many hold a drawing
    (a canvas of more than one colour), and each DataTable's visible rows as cell texts; ``screenshot``
    saves the page.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=_CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(Path(path).resolve().as_uri())
            page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0 && "
                                   "Bokeh.documents.every(d => d.is_idle)", timeout=timeout * 1000)
            figures = page.locator(".bk-Figure")
            drawn = sum(any(c.evaluate(_DRAWN) for c in figures.nth(i).locator("canvas").all())
                        for i in range(figures.count()))
            tables = [[[cell.inner_text() for cell in r.locator(".slick-cell").all()]
                       for r in grid.locator(".slick-row").all()] for grid in page.locator(".slick-viewport").all()]
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
            return {"errors": errors, "figures": figures.count(), "drawn": drawn,
                    "tables": [t for t in tables if t]}
        finally:
            browser.close()


def wandb_records(path) -> list:
    """The records of a W&B run file (``run-<id>.wandb``, as offline mode writes it), read with wandb's own protobuf
    messages: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of chunks (CRC32, 2-byte length, type:
    1 whole, 2 first, 3 middle, 4 last; a block's last 6 bytes or fewer are padding)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def wandb_history(path) -> list[dict]:
    """Each ``log`` call of a W&B run file: ``{metric: value}``, once the file holds the run's exit record (W&B's
    service may still be writing it when ``finish()`` has returned)."""
    import json

    wait_for(lambda: any(r.WhichOneof("record_type") == "exit" for r in wandb_records(path)), 60,
             f"{path} to hold its exit record", interval=0.2)
    return [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in wandb_records(path) if r.WhichOneof("record_type") == "history"]
