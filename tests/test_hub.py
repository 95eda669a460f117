"""Hub ids, offline: a Hugging Face cache built here (``models--org--name/snapshots/<hash>`` with ``refs/main``
holding the hash; ``datasets--org--name`` likewise), read with ``HF_HUB_OFFLINE=1`` through ``jobs/select.py``, with
the imported SmolLM2 cut as the model: the latest and a pinned revision resolve and are recorded, a missing revision
and an unknown name are one ``error:`` line, and a local folder of the same name wins."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAIN, PINNED = "a" * 40, "b" * 40
pytestmark = pytest.mark.slow


def snapshot(cache: Path, kind: str, repo: str, revision: str, files: Path, main: bool) -> Path:
    """The Hub cache's own layout: file contents in ``blobs/``, the snapshot's files symlinks to them."""
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


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, smollm2_proxy, demo_small):
    cache = tmp_path_factory.mktemp("hf-cache")
    snapshot(cache, "models", "org/smol", MAIN, Path(smollm2_proxy), main=True)
    snapshot(cache, "models", "org/smol", PINNED, Path(smollm2_proxy), main=False)
    data = tmp_path_factory.mktemp("hub-data")
    (data / "data").mkdir()
    rows = open(demo_small["train"]).readlines()
    (data / "data" / "train.jsonl").write_text("".join(rows[::5] + rows[1::5]))  # 24 rows, 8 of each source
    (data / "README.md").write_text("# a dataset card, not data\n")
    snapshot(cache, "datasets", "org/mix", MAIN, data, main=True)
    return cache


def select(cache: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "hf-home")}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(REPO / "jobs" / "select.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


SMALL = ["--budget", "12", "--clusters", "3", "--num-workers", "1", "--set", "proxy.epochs=1",
         "--set", "proxy.num_points=2", "--set", "proxy.batch_size=8", "--set", "proxy.lr=1e-4",
         "--set", "text.max_length=128", "--set", "corpus.part_rows=32"]


def error_line(proc: subprocess.CompletedProcess) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_hub_ids_resolve_offline_pinned_and_recorded(hub_cache, tmp_path):
    proc = select(hub_cache, tmp_path, "--data", "org/mix", "--proxy-model", f"org/smol@{PINNED}",
                  "--output", str(tmp_path / "run"), *SMALL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["hub"] == {
        "corpus.path": {"id": "org/mix", "repo_type": "dataset", "revision": MAIN},
        "proxy.model": {"id": "org/smol", "repo_type": "model", "revision": PINNED}}
    assert manifest["config"]["proxy"]["model"].endswith(f"models--org--smol/snapshots/{PINNED}")
    assert [i["uri"] for i in manifest["corpus"]["inputs"]] == [
        str(hub_cache / "datasets--org--mix" / "snapshots" / MAIN / "data" / "train.jsonl")]  # the card is no data
    # the latest revision is another snapshot (its tokenizer too): refused like any other input, never mixed
    proc = select(hub_cache, tmp_path, "--data", "org/mix", "--proxy-model", "org/smol",
                  "--output", str(tmp_path / "run"), *SMALL)
    assert "holds trajectories of another" in error_line(proc)


@pytest.mark.parametrize("args,message", [
    (["--proxy-model", "org/smol@" + "c" * 40], r"proxy\.model 'org/smol@c+' is neither a local path nor a Hub model "
                                                r"that resolves offline"),
    (["--proxy-model", "org/absent"], r"proxy\.model 'org/absent' is neither a local path nor a Hub model"),
    (["--set", "text.tokenizer=org/absent"], r"text\.tokenizer 'org/absent' is neither a local path nor a Hub model"),
])
def test_a_hub_id_that_does_not_resolve_is_one_error(hub_cache, demo_small, tmp_path, args, message):
    proc = select(hub_cache, tmp_path, "--data", demo_small["train"], "--output", str(tmp_path / "run"), *args, *SMALL)
    assert re.search(message, error_line(proc))
    assert not (tmp_path / "run").exists()


def test_a_local_folder_of_the_same_name_wins(hub_cache, smollm2_proxy, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from s2l_ray import hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read from the environment when it was imported
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.chdir(tmp_path)
    path, record = hub.resolve("org/smol", "proxy.model")
    assert record == {"id": "org/smol", "repo_type": "model", "revision": MAIN} and path.endswith(MAIN)
    shutil.copytree(smollm2_proxy, tmp_path / "org" / "smol")
    assert hub.resolve("org/smol", "proxy.model") == ("org/smol", None)  # read as the local folder it is
