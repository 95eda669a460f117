"""Faults injected into real processes: a proxy Train worker, a scoring actor and the driver get SIGKILL.

No mocks. One selection run (``jobs/select.py`` in a subprocess, with a local Ray of its own that
dies with it) takes three faults in turn; the PIDs come from the driver's process tree, where Ray
names each worker process after its actor and running method (``ray::RayTrainWorker...``,
``ray::MapWorker(MapBatches(PartScorer)).submit``), and /proc must show that name right before
the kill:

1. a Ray Train worker of the proxy TorchTrainer, mid-epoch: once trajectory point 0 (step 4 of
   the 8-step first epoch) is in the checkpoint index, every Train worker is stopped (SIGSTOP), the
   index is read again to check that the last point is not reached, and one worker is killed;
2. the Ray Data actor scoring a trajectory point, while it runs its map task on a corpus part:
   stopped when /proc names it ``...submit``, its name read again while it cannot change, killed;
3. the driver itself, once training is over and at least one point is scored but not all.

Each kill thus lands in a state that was checked while frozen, not at a moment hoped for. The
resumed proxy (trained on packed rows) must end with the same weights as an uninterrupted run of the
same command on padded rows.

The same command is then run again (with the hidden temporaries a kill inside an atomic write
would leave placed first); the last test selects once more from a copy of that run.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import descendants, job, running, title, wait_for
from s2l_ray.layout import TRAJECTORY_SCHEMA, RunDir, _temporary

REPO = Path(__file__).resolve().parents[1]
TRAIN_WORKER = "ray::RayTrainWorker"
SCORER = "ray::MapWorker(MapBatches(PartScorer))"
T = 4  # points at steps 4, 8, 12 and 16 of 2 epochs of 8 steps
COPIES = 4  # the corpus: the 60 demo rows 4 times under distinct ids (240 rows, so a part takes a while to score)


# -- processes ----------------------------------------------------------------------------------

def find(root: int, prefix: str) -> int | None:
    """A running descendant of ``root`` whose name starts with ``prefix``."""
    return next((p for p in sorted(descendants(root)) if title(p).startswith(prefix) and running(p)), None)


def frozen(pid: int, ready) -> bool:
    """SIGSTOP ``pid``; True if ``ready()`` holds while it is stopped (it stays stopped), else it goes on."""
    os.kill(pid, signal.SIGSTOP)
    if ready():
        return True
    os.kill(pid, signal.SIGCONT)
    return False


def sigkill(pid: int, prefix: str) -> str:
    """SIGKILL ``pid`` if /proc still names it ``prefix...``; wait until it is gone; returns the name it had."""
    name = title(pid)
    assert name.startswith(prefix), f"pid {pid} is {name!r}, not {prefix!r}"
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not running(pid), 30, f"pid {pid} to die")
    return name


# -- run directory checks -----------------------------------------------------------------------

def part_files(run: RunDir, t: int) -> list[str]:
    d = Path(run.trajectory_dir(t))
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def temporaries(root) -> list[str]:
    return sorted(str(p) for p in Path(root).rglob("*.tmp"))


def digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_trajectories(run: RunDir) -> None:
    """Exactly N x T rows, no duplicate (idx, checkpoint), every point's (idx, id) equal to the corpus's."""
    corpus = pq.read_table(run.corpus_files(), columns=["idx", "id"]).to_pydict()
    expected = sorted(zip(corpus["idx"], corpus["id"]))
    n = len(expected)
    done = run.done_points()
    assert sorted(done) == list(range(T))
    seen = []
    for t, rec in sorted(done.items()):
        assert rec["rows"] == n
        table = pq.read_table([run.trajectory_part(t, p) for p in range(len(run.corpus_files()))],
                              partitioning=None)
        assert table.schema == TRAJECTORY_SCHEMA and table.num_rows == n
        assert set(table.column("checkpoint").to_pylist()) == {t}
        assert sorted(zip(table.column("idx").to_pylist(), table.column("id").to_pylist())) == expected
        assert np.isfinite(table.column("loss").to_numpy()).all()
        seen += list(zip(table.column("idx").to_pylist(), table.column("checkpoint").to_pylist()))
    assert len(seen) == n * T == len(set(seen))


def check_trusted_artifacts_whole(run: RunDir) -> None:
    """Everything the indexes point to (all that a rerun trusts) is complete and readable."""
    import torch
    from safetensors.torch import load_file

    corpus = run.read_manifest()["corpus"]
    assert pq.read_table(run.corpus_files(), columns=["idx"]).num_rows == corpus["rows"]
    for t, rec in run.done_points().items():
        table = pq.read_table(rec["files"], partitioning=None)
        assert table.schema == TRAJECTORY_SCHEMA and table.num_rows == rec["rows"] == corpus["rows"], t
    for t, rec in run.proxy_checkpoints().items():
        load_file(os.path.join(rec["path"], "model", "model.safetensors"))
        state = torch.load(os.path.join(rec["path"], "state.pt"), weights_only=True)
        assert state["t"] == t and state["step"] == rec["step"]


# -- the run that takes the faults ----------------------------------------------------------------

def select_argv(data: str, tokenizer: str, out) -> list[str]:
    return ["--data", data, "--output", str(out), "--budget", "12", "--clusters", "4", "--num-workers", "2",
            "--seed", "3", "--set", f"text.tokenizer={tokenizer}", "--set", "proxy.epochs=2",
            "--set", f"proxy.num_points={T}", "--set", "proxy.batch_size=16", "--set", "proxy.workers.cpus=0.5",
            "--set", "proxy.lr=0.003", "--set", "proxy.packed=true"]


@pytest.fixture(scope="module")
def faults(demo_small, tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    rows = [json.loads(line) for line in open(demo_small["train"])]
    data = base / "corpus.jsonl"
    data.write_text("".join(json.dumps({**r, "id": f"c{k}-{i}"}) + "\n" for k in range(COPIES)
                            for i, r in enumerate(rows)))
    out = base / "run"
    run = RunDir(str(out))
    argv = select_argv(str(data), demo_small["tokenizer"], out)
    cmd = [sys.executable, "jobs/select.py", *argv]
    # RAY_ADDRESS=local: a Ray of its own (never another test's or user's cluster); it dies with the driver
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_USAGE_STATS_ENABLED": "0"}
    log_path = base / "first.log"
    events: dict = {}
    started = time.time()

    def alive() -> bool:
        assert first.poll() is None, f"the first run ended by itself:\n{log_path.read_text()[-4000:]}"
        return True

    with open(log_path, "w") as log:
        first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        tree: set[int] = set()
        try:
            # 1. a proxy Train worker, mid-epoch: every worker stopped once point 0 is in the checkpoint index
            wait_for(lambda: alive() and 0 in run.proxy_checkpoints(), 500, "trajectory point 0's checkpoint",
                     interval=0.01)
            workers = [p for p in sorted(descendants(first.pid)) if title(p).startswith(TRAIN_WORKER) and running(p)]
            assert len(workers) == 2, f"Train workers: {workers}"
            for p in workers:
                os.kill(p, signal.SIGSTOP)
            index = sorted(run.proxy_checkpoints())  # no worker can train on: the last point is not coming
            assert T - 1 not in index, f"training reached its last point before the workers were stopped: {index}"
            events["train"] = {"index_at_kill": index, "title": sigkill(workers[0], TRAIN_WORKER),
                               "at": round(time.time() - started, 1)}
            os.kill(workers[1], signal.SIGCONT)

            # 2. the scoring actor, while it runs a map task (its process is named <class>.submit meanwhile)
            scorer = wait_for(lambda: alive() and find(first.pid, SCORER), 300, "a scoring actor")
            wait_for(lambda: alive() and frozen(scorer, lambda: title(scorer).endswith(".submit")), 300,
                     "the scoring actor stopped inside its map task", interval=0.002)
            t = min(set(run.proxy_checkpoints()) - set(run.done_points()))  # points are scored in order
            events["scorer"] = {"t": t, "parts_before": part_files(run, t), "title": sigkill(scorer, SCORER),
                                "killed": time.time(), "at": round(time.time() - started, 1)}

            # 3. the driver, once training is over and the point of fault 2 is scored, but not every point
            def midrun() -> bool:
                alive()
                done, ckpts = run.done_points(), run.proxy_checkpoints()
                assert len(done) < T, "every point was scored before the driver could be killed mid-run"
                return len(ckpts) == T and t in done

            wait_for(midrun, 400, "training to end and the killed scorer's point to be done", interval=0.01)
            tree = descendants(first.pid)
            sigkill(first.pid, sys.executable)
            events["driver"] = {"at": round(time.time() - started, 1)}
            first.wait(30)
        finally:
            if first.poll() is None:
                tree |= descendants(first.pid)
                first.kill()
                first.wait(30)
            # what is left of its Ray (GCS and raylet go with the driver, workers within seconds, Ray's
            # agents only after a minute) is killed too, as if the machine had been lost
            for p in tree:
                if running(p) and ("ray" in title(p) or title(p).startswith(sys.executable)):
                    os.kill(p, signal.SIGKILL)

    done = run.done_points()
    at_kill = {
        "done": {t: {f: (os.path.getmtime(f), digest(f)) for f in rec["files"]} for t, rec in done.items()},
        "checkpoints": run.proxy_checkpoints(),
        "started_points": [t for t in range(T) if t not in done and Path(run.trajectory_dir(t)).exists()],
        "temporaries": temporaries(out),
        "manifest_proxy": run.read_manifest().get("proxy"),
    }
    check_trusted_artifacts_whole(run)
    # a kill landing inside an atomic write (a millisecond) leaves its hidden temporary; plant what it
    # would leave, beside the index files and in a finished point's folder: the rerun must remove them
    at_kill["planted"] = [_temporary(run.manifest), _temporary(run.trajectories_done),
                          _temporary(run.trajectory_part(min(done), 0))]
    for path in at_kill["planted"]:
        Path(path).write_bytes(b"torn")
    rerun_started = time.time()
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    events["rerun_seconds"] = round(time.time() - rerun_started, 1)
    print(f"fault run: {events}; at the driver's kill: done {sorted(done)}, started {at_kill['started_points']}, "
          f"temporaries {at_kill['temporaries']}")
    return run, argv, events, at_kill, rerun, log_path


def rerun_ok(faults) -> None:
    rerun = faults[4]
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-4000:]


def test_train_worker_killed_mid_epoch_training_resumes_exactly(faults, ray_local, tmp_path):
    run, argv, events, at_kill, _, _ = faults
    rerun_ok(faults)
    assert events["train"]["title"].startswith(TRAIN_WORKER)
    last = max(events["train"]["index_at_kill"])
    assert last < T - 1, "the worker must die while points remain to train"
    # Ray Train restarted the worker group within the first run and trained to the end from the last
    # reported checkpoint: points after it come from an attempt that began at its step, not at 0
    ckpts = at_kill["checkpoints"]
    steps = run.read_manifest()["proxy"]["plan"]["point_steps"]
    assert sorted(ckpts) == list(range(T)) and [ckpts[t]["step"] for t in range(T)] == steps
    assert [ckpts[t]["start_step"] for t in range(T)] == [0] * (last + 1) + [steps[last]] * (T - 1 - last)
    assert steps[last] % (steps[-1] // 2) != 0 or last > 0  # resumed from a point inside an epoch
    check_trajectories(run)
    # the resumed run continued with exactly the batches of an uninterrupted run of the same command, whose rows
    # are padded where the resumed run's were packed
    from safetensors.torch import load_file

    from s2l_ray import pipeline
    from s2l_ray.config import load_config

    flags = dict(zip(argv[::2], argv[1::2]))
    sets = [v for k, v in zip(argv[::2], argv[1::2]) if k == "--set"]
    reference = tmp_path / "uninterrupted"
    cfg = load_config(None, {"corpus.path": flags["--data"], "output": str(reference), "proxy.workers.count": 2,
                             **dict(kv.split("=", 1) for kv in sets), "proxy.packed": False})
    manifest = pipeline.select(replace(cfg, select=replace(cfg.select, budgets=[12]), seed=3,
                                       cluster=replace(cfg.cluster, k=4)))
    assert manifest["proxy"]["trained"]
    ref = RunDir(str(reference))
    a = load_file(os.path.join(ckpts[T - 1]["path"], "model", "model.safetensors"))
    b = load_file(os.path.join(ref.proxy_checkpoints()[T - 1]["path"], "model", "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    for t in range(T):
        la = pq.read_table(run.done_points()[t]["files"], partitioning=None).column("loss").to_numpy()
        lb = pq.read_table(ref.done_points()[t]["files"], partitioning=None).column("loss").to_numpy()
        np.testing.assert_allclose(la, lb, rtol=0, atol=1e-5)


def test_scoring_actor_killed_midway_loses_and_duplicates_nothing(faults):
    import torch

    from s2l_ray.models import load_model
    from s2l_ray.scoring import score_rows

    run, _, events, at_kill, _, _ = faults
    rerun_ok(faults)
    ev = events["scorer"]
    t = ev["t"]
    assert ev["title"] == f"{SCORER}.submit"  # killed inside its map task
    # the point was completed by the first run itself (Ray restarted the actor, Ray Data retried the
    # task): its part was written after the kill, and nothing was redone by the rerun
    assert t in at_kill["done"]
    files = run.done_points()[t]["files"]
    assert all(os.path.getmtime(f) > ev["killed"] for f in files)
    assert part_files(run, t) == [os.path.basename(f) for f in files]  # no torn part, no temporary
    check_trajectories(run)
    # the rewritten part holds the checkpoint's own losses
    model = load_model(os.path.join(at_kill["checkpoints"][t]["path"], "model")).eval()
    src = pq.read_table(run.corpus_files(), columns=["input_ids", "spans"])
    ref = score_rows(model, src.column("input_ids").to_pylist(), src.column("spans").to_pylist(),
                     model.config.pad_token_id or 0, 8192, torch.device("cpu"))["loss"]
    got = pq.read_table(files, partitioning=None).sort_by("idx")
    np.testing.assert_allclose(got.column("loss").to_numpy(), ref, rtol=0, atol=1e-5)


def test_driver_killed_midrun_rerun_completes_and_redoes_only_the_points_in_hand(faults):
    run, _, _, at_kill, _, _ = faults
    rerun_ok(faults)
    done_before = sorted(at_kill["done"])
    assert 1 <= len(done_before) < T
    assert at_kill["manifest_proxy"] is None  # the first run never finished its proxy stage
    stats = run.read_manifest()["proxy"]
    # every point finished before the kill is reused as it is: same files, bytes and mtimes
    assert stats["reused_points"] == done_before
    for t, files in at_kill["done"].items():
        assert {f: (os.path.getmtime(f), digest(f)) for f in files} == files
    # the other points are scored from their saved checkpoints, without training again; of those, only
    # what the one scoring actor had in hand had begun (and was lost) when the driver died: the point after
    # the last one done, and the next one, which the actor starts while the previous point is recorded
    assert not stats["trained"]
    assert sorted(s["t"] for s in stats["scored"]) == [t for t in range(T) if t not in done_before]
    first = max(done_before) + 1
    assert at_kill["started_points"] == list(range(first, first + len(at_kill["started_points"])))
    assert len(at_kill["started_points"]) <= 2
    check_trajectories(run)
    # nothing torn or temporary is left: each point's folder holds exactly its parts
    for t in range(T):
        assert part_files(run, t) == [os.path.basename(f) for f in run.done_points()[t]["files"]]
    assert temporaries(run.uri) == [] and not any(os.path.exists(p) for p in at_kill["planted"])
    assert pq.read_table(run.selection()).num_rows == 12


def test_same_seed_and_inputs_select_the_same_rows(faults, ray_local, tmp_path):
    """Clusters and selection computed again into a second output dir from a copy of the run are identical."""
    run_a, argv, _, _, _, _ = faults
    rerun_ok(faults)
    out_b = tmp_path / "run-b"
    derived = {"clusters.parquet", "selection.parquet", "selected.jsonl", "report.png"}
    shutil.copytree(run_a.uri, out_b, ignore=lambda d, names: derived & set(names) if Path(d) == Path(run_a.uri)
                    else set())
    run_b = RunDir(str(out_b))
    manifest = run_b.read_manifest()
    for key in ("clusters", "selection"):
        manifest.pop(key, None)
    for key in ("clusters", "selection"):
        manifest["stages"].pop(key, None)
    Path(run_b.manifest).write_text(json.dumps(manifest))
    select = job("select")  # jobs/select.py's own main, in this process, with the same arguments
    argv_b = list(argv)
    argv_b[argv_b.index("--output") + 1] = str(out_b)
    scored = {str(f): os.path.getmtime(f) for f in out_b.glob("trajectories/checkpoint=*/*.parquet")}
    assert len(scored) == T * len(run_b.corpus_files())
    assert select.main(argv_b) == 0
    # every point reused: nothing trained or scored again, the record of how they were made kept
    assert run_b.read_manifest()["proxy"] == manifest["proxy"]
    assert {f: os.path.getmtime(f) for f in scored} == scored
    ids_a = pq.read_table(run_a.selection(), columns=["id"]).column("id")
    ids_b = pq.read_table(run_b.selection(), columns=["id"]).column("id")
    assert len(ids_a) == 12 and ids_a.to_pylist() == ids_b.to_pylist()
    assert Path(run_a.selected_jsonl()).read_bytes() == Path(run_b.selected_jsonl()).read_bytes()
    assert pq.read_table(run_a.clusters).equals(pq.read_table(run_b.clusters))
