"""trajectories: per-part reading in idx order, validation errors, NaN handling, keep_every, features."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s2l_ray import trajectories as tr
from s2l_ray.config import ClusterConfig
from s2l_ray.layout import TRAJECTORY_SCHEMA, RunDir, write_json_atomic, write_parquet_atomic

N, T, PARTS = 1000, 5, 3


def loss_of(idx: np.ndarray, t: int) -> np.ndarray:
    """A known loss per (example, point), to check the pivot exactly."""
    return (idx * 0.001 + t).astype(np.float32)


def point_table(idx: np.ndarray, ids: list[str], t: int, loss: np.ndarray, conf: np.ndarray | None = None) -> pa.Table:
    n = len(idx)
    return pa.table({
        "idx": pa.array(idx, pa.int64()), "id": pa.array(ids, pa.string()),
        "checkpoint": pa.array(np.full(n, t, np.int32)), "step": pa.array(np.full(n, 10 * t, np.int64)),
        "loss": pa.array(loss, pa.float32()),
        "confidence": pa.array(np.exp(-loss) if conf is None else conf, pa.float32()),
        "n_tokens": pa.array(np.ones(n, np.int32))}, schema=TRAJECTORY_SCHEMA)


def parts_of(n: int) -> list[np.ndarray]:
    return np.array_split(np.arange(n), PARTS)


def write_point(run: RunDir, t: int, ids: list[str], loss: np.ndarray, fingerprint: str | None = "fp",
                conf: np.ndarray | None = None) -> None:
    """Point t's rows, one file per corpus part in idx order, then its done record."""
    files = []
    for c, part in enumerate(parts_of(len(ids))):
        path = run.trajectory_part(t, c)
        write_parquet_atomic(run.fs, path, point_table(part, [ids[i] for i in part], t, loss[part],
                                                       None if conf is None else conf[part]))
        files.append(path)
    record = {"step": 10 * t, "files": files, "rows": len(ids)}
    if fingerprint:
        record["corpus_fingerprint"] = fingerprint
    run.mark_point_done(t, record)


def make_run(root, n: int = N, points: int = T) -> RunDir:
    """A corpus of n rows in PARTS parts and ``points`` trajectory points."""
    run = RunDir(str(root))
    ids = [f"row-{i}" for i in range(n)]
    names = []
    for c, part in enumerate(parts_of(n)):
        table = pa.table({"idx": pa.array(part, pa.int64()), "id": [ids[i] for i in part],
                          "source": ["a" if i % 3 else "b" for i in part],
                          "prompt": [f"p{i}" for i in part], "response": [f"r{i}" for i in part],
                          "messages": pa.nulls(len(part), pa.string())})
        write_parquet_atomic(run.fs, run.corpus_part(c), table)
        names.append(run.corpus_part(c).rsplit("/", 1)[-1])
    run.update_manifest(corpus={"files": names, "part_rows": [len(p) for p in parts_of(n)], "rows": n,
                                "fingerprint": "fp"})
    for t in range(points):
        write_point(run, t, ids, loss_of(np.arange(n), t))
    return run


def matrix(run: RunDir, cfg: ClusterConfig, num_points: int | None = None, column: str = "loss"):
    """The whole [N, T'] matrix read part by part in this process, the plan and the replaced count."""
    plan = tr.plan(run, cfg, num_points)
    blocks = [tr.read_part(run, plan, j, (column,)) for j in range(len(plan.parts))]
    return np.concatenate([b[0][column] for b in blocks]), plan, sum(b[1] for b in blocks)


def set_done(run: RunDir, points: dict[int, dict]) -> None:
    write_json_atomic(run.fs, run.trajectories_done, {"points": {str(t): r for t, r in points.items()}})


def rewrite(path: str, fn) -> None:
    pq.write_table(fn(pq.read_table(path)), path)


def test_parts_read_in_idx_and_checkpoint_order(tmp_path):
    run = make_run(tmp_path)
    x, plan, replaced = matrix(run, ClusterConfig(), num_points=T)
    assert x.shape == (N, T) and x.dtype == np.float32
    expected = np.stack([loss_of(np.arange(N), t) for t in range(T)], axis=1)
    np.testing.assert_array_equal(x, expected)
    assert plan.points == tuple(range(T)) and plan.steps == tuple(10 * t for t in range(T))
    assert [p.start for p in plan.parts] == [0, 334, 667] and sum(p.rows for p in plan.parts) == N
    assert replaced == 0 and plan.fingerprint_checked


def test_keep_every_keeps_points_0_n_2n(tmp_path):
    run = make_run(tmp_path, points=7)
    x, plan, _ = matrix(run, ClusterConfig(keep_every=3))
    assert plan.points == (0, 3, 6)
    np.testing.assert_array_equal(x[:, 1], loss_of(np.arange(N), 3))
    with pytest.raises(tr.TrajectoryError, match="keep_every"):
        tr.plan(run, ClusterConfig(keep_every=0))


def test_nan_and_inf_are_replaced_and_counted(tmp_path):
    run = make_run(tmp_path, points=2)
    ids = [f"row-{i}" for i in range(N)]
    loss = loss_of(np.arange(N), 1)
    loss[[3, 10, 500]] = [np.nan, np.inf, -np.inf]
    write_point(run, 1, ids, loss)
    x, _, replaced = matrix(run, ClusterConfig(nan_value=-1.0))
    assert replaced == 3
    assert x[[3, 10, 500], 1].tolist() == [-1.0, -1.0, -1.0]
    assert np.isfinite(x).all()
    with pytest.raises(tr.TrajectoryError, match="nan_value must be a finite number"):
        tr.plan(run, ClusterConfig(nan_value=float("nan")))


def test_missing_point_is_an_error(tmp_path):
    run = make_run(tmp_path)
    done = run.done_points()
    del done[2]
    set_done(run, done)
    with pytest.raises(tr.TrajectoryError, match=r"points \[2\] of 0..4 are not done"):
        tr.plan(run, ClusterConfig())
    with pytest.raises(tr.TrajectoryError, match=r"points \[5\] of 0..5 are not done"):
        tr.plan(make_run(tmp_path / "b"), ClusterConfig(), num_points=6)


def test_wrong_row_count_is_an_error(tmp_path):
    run = make_run(tmp_path)
    done = run.done_points()
    path = done[1]["files"][0]
    rewrite(path, lambda t: t.slice(0, t.num_rows - 7))
    plan = tr.plan(run, ClusterConfig())
    with pytest.raises(tr.TrajectoryError, match=f"point 1: {path} has 327 rows, corpus part .* 334"):
        tr.read_part(run, plan, 0)
    done[1]["rows"] = N - 7
    set_done(run, done)
    with pytest.raises(tr.TrajectoryError, match="point 1: its record has 993 rows"):
        tr.plan(run, ClusterConfig())


def test_record_must_list_one_file_per_corpus_part(tmp_path):
    run = make_run(tmp_path)
    done = run.done_points()
    done[2]["files"] = done[2]["files"][:2]
    set_done(run, done)
    with pytest.raises(tr.TrajectoryError, match=r"point 2: its record lists 2 files, not one per corpus part \(3\)"):
        tr.plan(run, ClusterConfig())


@pytest.mark.parametrize("edit, row", [(lambda i: i.__setitem__(5, i[6]), 5),  # duplicate
                                       (lambda i: i.__setitem__(0, N + 4), 0),  # out of range
                                       (lambda i: i.__setitem__(slice(3, 5), i[4:2:-1]), 3)])  # out of order
def test_idx_not_the_parts_rows_in_order_is_an_error_naming_file_and_row(tmp_path, edit, row):
    run = make_run(tmp_path)
    path = run.done_points()[3]["files"][1]

    def change(table):
        idx = table.column("idx").to_numpy().copy()
        edit(idx)
        return table.set_column(0, "idx", pa.array(idx))

    rewrite(path, change)
    plan = tr.plan(run, ClusterConfig())
    with pytest.raises(tr.TrajectoryError, match=f"point 3: {path} row {row} has idx .*, expected {334 + row}"):
        tr.read_part(run, plan, 1)


def test_files_of_another_point_are_an_error(tmp_path):
    run = make_run(tmp_path)
    src, dst = run.trajectory_part(1, 0), run.trajectory_part(2, 0)
    rewrite(dst, lambda _: pq.read_table(src))
    plan = tr.plan(run, ClusterConfig())
    with pytest.raises(tr.TrajectoryError, match="point 2: .* holds rows of checkpoints 1..1"):
        tr.read_part(run, plan, 0)


def test_foreign_corpus_is_detected_by_fingerprint(tmp_path):
    run = make_run(tmp_path)
    run.update_manifest(corpus={"fingerprint": "another"})
    with pytest.raises(tr.TrajectoryError, match="point 0 was scored on another corpus"):
        tr.plan(run, ClusterConfig())


def test_foreign_corpus_is_detected_by_ids_without_fingerprint(tmp_path):
    run = make_run(tmp_path, points=3)
    write_point(run, 2, [f"other-{i}" for i in range(N)], loss_of(np.arange(N), 2), fingerprint=None)
    plan = tr.plan(run, ClusterConfig())
    assert not plan.fingerprint_checked
    with pytest.raises(tr.TrajectoryError, match="point 2: .* has id 'other-667' at idx 667, the corpus 'row-667'.*"
                                                 "belong to another corpus"):
        tr.read_part(run, plan, 2)  # part j checks the ids of point j mod T


def test_missing_file_and_column_are_errors(tmp_path):
    run = make_run(tmp_path)
    path = run.done_points()[4]["files"][0]
    run.fs.delete_file(path)
    plan = tr.plan(run, ClusterConfig())
    with pytest.raises(tr.TrajectoryError, match=f"point 4: cannot read {path}"):
        tr.read_part(run, plan, 0)
    run2 = make_run(tmp_path / "b")
    path = run2.done_points()[0]["files"][0]
    rewrite(path, lambda t: t.drop_columns(["loss"]))
    with pytest.raises(tr.TrajectoryError, match="has no column 'loss'"):
        tr.read_part(run2, tr.plan(run2, ClusterConfig()), 0)


def test_features_follow_their_definitions(ray_local, tmp_path):
    run = make_run(tmp_path, points=4)
    ids = [f"row-{i}" for i in range(N)]
    rng = np.random.default_rng(0)
    loss = rng.uniform(0.5, 3.0, (N, 4)).astype(np.float32)
    conf = rng.uniform(0.0, 1.0, (N, 4)).astype(np.float32)
    conf[7, 2] = np.nan
    for t in range(4):
        write_point(run, t, ids, loss[:, t], conf=conf[:, t])
    plan = tr.plan(run, ClusterConfig(nan_value=0.0))
    got, replaced = tr.features(plan, sorted(tr.FEATURES))
    assert replaced == 1
    conf[7, 2] = 0.0
    np.testing.assert_array_equal(got["last_loss"], loss[:, 3])
    np.testing.assert_allclose(got["learnability"], loss[:, 0] - loss[:, 3], rtol=1e-6)
    np.testing.assert_allclose(got["confidence_mean"], conf.mean(1), rtol=1e-5)
    np.testing.assert_allclose(got["confidence_std"], conf.std(1), rtol=1e-4, atol=1e-6)
    with pytest.raises(tr.TrajectoryError, match="unknown trajectory features"):
        tr.features(plan, ["loss_slope"])


def test_gather_returns_rows_in_the_order_asked(ray_local, tmp_path):
    run = make_run(tmp_path)
    plan = tr.plan(run, ClusterConfig())
    positions = np.array([999, 0, 334, 333, 500, 0])
    x = tr.gather(plan, positions)
    np.testing.assert_array_equal(x, np.stack([loss_of(positions, t) for t in range(T)], axis=1))


def test_synthetic_run_follows_the_contract(tmp_path):
    run = RunDir(str(tmp_path))
    rec = tr.write_synthetic_run(run, 2500, 4, num_sources=3, chunk_rows=1000, seed=3)
    assert rec["rows"] == 2500 and sum(rec["sources"].values()) == 2500 and len(rec["files"]) == 3
    corpus = pq.read_table(run.corpus_files())
    assert corpus.column("idx").to_pylist() == list(range(2500))
    assert corpus.column("id").to_pylist()[:2] == ["ex0000000000", "ex0000000001"]
    x, plan, replaced = matrix(run, ClusterConfig(), num_points=4)
    assert x.shape == (2500, 4) and plan.fingerprint_checked and replaced == 0
