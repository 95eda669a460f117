"""trajectories: pivot by idx, validation errors, NaN handling, keep_every."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s2l_ray import trajectories as tr
from s2l_ray.config import ClusterConfig
from s2l_ray.layout import TRAJECTORY_SCHEMA, RunDir, write_json_atomic, write_parquet_atomic

N, T = 1000, 5


def loss_of(idx: np.ndarray, t: int) -> np.ndarray:
    """A known loss per (example, point), to check the pivot exactly."""
    return (idx * 0.001 + t).astype(np.float32)


def write_point(run: RunDir, t: int, idx: np.ndarray, ids: list[str], loss: np.ndarray, n_files: int,
                fingerprint: str | None = "fp") -> None:
    """Point t's rows (in the given order) split over n_files files, then its done record."""
    files = []
    for f, part in enumerate(np.array_split(np.arange(len(idx)), n_files)):
        table = pa.table({
            "idx": pa.array(idx[part], pa.int64()), "id": pa.array([ids[i] for i in part], pa.string()),
            "checkpoint": pa.array(np.full(len(part), t, np.int32)),
            "step": pa.array(np.full(len(part), 10 * t, np.int64)), "loss": pa.array(loss[part], pa.float32()),
            "confidence": pa.array(np.zeros(len(part), np.float32)),
            "n_tokens": pa.array(np.ones(len(part), np.int32))}, schema=TRAJECTORY_SCHEMA)
        path = f"{run.trajectory_dir(t)}/part-{f}.parquet"
        write_parquet_atomic(run.fs, path, table)
        files.append(path)
    record = {"step": 10 * t, "files": files, "rows": len(idx)}
    if fingerprint:
        record["corpus_fingerprint"] = fingerprint
    run.mark_point_done(t, record)


def make_run(root, n: int = N, points: int = T, corpus_files: int = 3, traj_files: int = 4) -> RunDir:
    """A corpus of n rows in several parts and ``points`` points, each with rows shuffled over files."""
    run = RunDir(str(root))
    ids = [f"row-{i}" for i in range(n)]
    names = []
    for c, part in enumerate(np.array_split(np.arange(n), corpus_files)):
        table = pa.table({"idx": pa.array(part, pa.int64()), "id": [ids[i] for i in part],
                          "source": ["a" if i % 3 else "b" for i in part],
                          "prompt": [f"p{i}" for i in part], "response": [f"r{i}" for i in part]})
        write_parquet_atomic(run.fs, run.corpus_part(c), table)
        names.append(run.corpus_part(c).rsplit("/", 1)[-1])
    run.update_manifest(corpus={"files": names, "rows": n, "fingerprint": "fp"})
    rng = np.random.default_rng(1)
    for t in range(points):
        order = rng.permutation(n)
        write_point(run, t, order, [ids[i] for i in order], loss_of(order, t), traj_files)
    return run


def set_done(run: RunDir, points: dict[int, dict]) -> None:
    write_json_atomic(run.fs, run.trajectories_done, {"points": {str(t): r for t, r in points.items()}})


def test_pivot_scatters_by_idx_in_checkpoint_order(tmp_path):
    run = make_run(tmp_path)
    out = tr.load(run, ClusterConfig(), num_points=T)
    assert out.x.shape == (N, T) and out.x.dtype == np.float32
    expected = np.stack([loss_of(np.arange(N), t) for t in range(T)], axis=1)
    np.testing.assert_array_equal(out.x, expected)
    assert out.points == list(range(T)) and out.steps == [10 * t for t in range(T)]
    assert out.nan_count == 0 and out.fingerprint_checked


def test_keep_every_keeps_points_0_n_2n(tmp_path):
    run = make_run(tmp_path, points=7)
    out = tr.load(run, ClusterConfig(keep_every=3))
    assert out.points == [0, 3, 6]
    np.testing.assert_array_equal(out.x[:, 1], loss_of(np.arange(N), 3))
    with pytest.raises(tr.TrajectoryError, match="keep_every"):
        tr.load(run, ClusterConfig(keep_every=0))


def test_nan_and_inf_are_replaced_and_counted(tmp_path):
    run = make_run(tmp_path, points=2)
    ids = [f"row-{i}" for i in range(N)]
    loss = loss_of(np.arange(N), 1)
    loss[[3, 10, 500]] = [np.nan, np.inf, -np.inf]
    write_point(run, 1, np.arange(N), ids, loss, n_files=2)
    out = tr.load(run, ClusterConfig(nan_value=-1.0))
    assert out.nan_count == 3
    assert out.x[[3, 10, 500], 1].tolist() == [-1.0, -1.0, -1.0]
    assert np.isfinite(out.x).all()


def test_missing_point_is_an_error(tmp_path):
    run = make_run(tmp_path)
    done = run.done_points()
    del done[2]
    set_done(run, done)
    with pytest.raises(tr.TrajectoryError, match=r"points \[2\] of 0..4 are not done"):
        tr.load(run, ClusterConfig())
    with pytest.raises(tr.TrajectoryError, match=r"points \[5\] of 0..5 are not done"):
        tr.load(make_run(tmp_path / "b"), ClusterConfig(), num_points=6)


def test_wrong_row_count_is_an_error(tmp_path):
    run = make_run(tmp_path)
    done = run.done_points()
    path = done[1]["files"][0]
    table = pq.read_table(path)
    write_parquet_atomic(run.fs, path, table.slice(0, table.num_rows - 7))
    with pytest.raises(tr.TrajectoryError, match=f"point 1: its files hold {N - 7} rows, the corpus has {N}"):
        tr.load(run, ClusterConfig())
    done[1]["rows"] = N - 7
    set_done(run, done)
    with pytest.raises(tr.TrajectoryError, match="point 1: its record has 993 rows"):
        tr.load(run, ClusterConfig())


def test_duplicate_idx_is_an_error_naming_the_file(tmp_path):
    run = make_run(tmp_path)
    path = run.done_points()[3]["files"][2]
    table = pq.read_table(path)
    idx = table.column("idx").to_numpy().copy()
    idx[5] = idx[6]
    write_parquet_atomic(run.fs, path, table.set_column(0, "idx", pa.array(idx)))
    with pytest.raises(tr.TrajectoryError, match=r"point 3: idx .* missing while others appear twice") as e:
        tr.load(run, ClusterConfig())
    assert path in str(e.value) and str(idx[6]) in str(e.value)


def test_idx_out_of_range_is_an_error(tmp_path):
    run = make_run(tmp_path)
    path = run.done_points()[0]["files"][1]
    table = pq.read_table(path)
    idx = table.column("idx").to_numpy().copy()
    idx[0] = N + 4
    write_parquet_atomic(run.fs, path, table.set_column(0, "idx", pa.array(idx)))
    with pytest.raises(tr.TrajectoryError, match=f"{path} has idx \\[{N + 4}\\] outside"):
        tr.load(run, ClusterConfig())


def test_files_of_another_point_are_an_error(tmp_path):
    run = make_run(tmp_path)
    done = run.done_points()
    done[2]["files"] = done[1]["files"]
    set_done(run, done)
    with pytest.raises(tr.TrajectoryError, match="point 2: .* holds rows of checkpoints 1..1"):
        tr.load(run, ClusterConfig())


def test_foreign_corpus_is_detected_by_fingerprint(tmp_path):
    run = make_run(tmp_path)
    run.update_manifest(corpus={"fingerprint": "another"})
    with pytest.raises(tr.TrajectoryError, match="point 0 was scored on another corpus"):
        tr.load(run, ClusterConfig())


def test_foreign_corpus_is_detected_by_ids_without_fingerprint(tmp_path):
    run = make_run(tmp_path, points=3)
    order = np.random.default_rng(5).permutation(N)
    foreign = [f"other-{i}" for i in order]
    write_point(run, 2, order, foreign, loss_of(order, 2), n_files=3, fingerprint=None)
    with pytest.raises(tr.TrajectoryError, match="point 2: .* has id 'other-.*belong to another corpus"):
        tr.load(run, ClusterConfig())


def test_missing_file_and_column_are_errors(tmp_path):
    run = make_run(tmp_path)
    done = run.done_points()
    path = done[4]["files"][0]
    run.fs.delete_file(path)
    with pytest.raises(tr.TrajectoryError, match=f"point 4: cannot read {path}"):
        tr.load(run, ClusterConfig())
    run2 = make_run(tmp_path / "b")
    path = run2.done_points()[0]["files"][0]
    write_parquet_atomic(run2.fs, path, pq.read_table(path).drop_columns(["loss"]))
    with pytest.raises(tr.TrajectoryError, match="has no column 'loss'"):
        tr.load(run2, ClusterConfig())


def test_corpus_ids_at_reads_the_right_rows(tmp_path):
    run = make_run(tmp_path, corpus_files=4)
    got = tr.corpus_ids_at(run, np.array([0, 999, 250, 251, 500, 250]))
    assert got == {i: f"row-{i}" for i in (0, 250, 251, 500, 999)}


def test_synthetic_run_follows_the_contract(tmp_path):
    run = RunDir(str(tmp_path))
    rec = tr.write_synthetic_run(run, 2500, 4, num_sources=3, chunk_rows=1000, seed=3)
    assert rec["rows"] == 2500 and sum(rec["sources"].values()) == 2500 and len(rec["files"]) == 3
    corpus = pq.read_table(run.corpus_files())
    assert corpus.column("idx").to_pylist() == list(range(2500))
    assert corpus.column("id").to_pylist()[:2] == ["ex0000000000", "ex0000000001"]
    out = tr.load(run, ClusterConfig(), num_points=4)
    assert out.x.shape == (2500, 4) and out.fingerprint_checked and out.nan_count == 0
