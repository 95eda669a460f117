"""Read, pivot and validate the trajectory table.

The long table (one row per example and trajectory point, ``layout.TRAJECTORY_SCHEMA``) becomes
a dense float32 matrix ``[N, T']``: row i is the trajectory of corpus row ``idx == i``, column j
the j-th kept point. Only ``idx`` and ``loss`` are read, one file at a time, so memory stays at
the matrix (4 bytes per example and point) plus one point's column (5 bytes per example) and one
file's two columns.

Checks, each raising TrajectoryError naming the point and file at fault:
every point 0..T-1 is done; a point has exactly N rows, each idx in [0, N) exactly once; its
files carry no other point's rows (Parquet statistics); its record's ``corpus_fingerprint``
equals the manifest's; and the ids of a sample of its rows (the first ID_SAMPLE_ROWS rows of one
of its files, a different file for each point) equal the corpus ids at those idx, so
trajectories of another corpus are caught even when a record carries no fingerprint.

A synthetic-run writer (corpus + trajectories, written in chunks) serves benchmarks and tests.
"""
from __future__ import annotations

import hashlib
import posixpath
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import ClusterConfig
from .layout import CORPUS_SCHEMA, TRAJECTORY_SCHEMA, RunDir, write_parquet_atomic

ID_SAMPLE_ROWS = 256  # rows per point whose ids are checked against the corpus


class TrajectoryError(ValueError):
    """The trajectory table is incomplete, inconsistent, or belongs to another corpus."""


@dataclass
class Trajectories:
    """The dense trajectory matrix and where it came from."""

    x: np.ndarray  # [N, T'] float32; row i is corpus row idx == i
    points: list[int]  # the kept trajectory points, in order
    steps: list[int]  # the proxy training step of each kept point
    nan_count: int  # non-finite (or null) losses replaced by ClusterConfig.nan_value
    fingerprint_checked: bool  # every kept point's record carried the corpus fingerprint


def kept_points(num_points: int, keep_every: int) -> list[int]:
    """Points 0, n, 2n, ... (the official code's ``num_loss_ckpts`` subsampling)."""
    if keep_every < 1:
        raise TrajectoryError(f"cluster.keep_every must be >= 1, got {keep_every}")
    return list(range(0, num_points, keep_every))


def check_done(done: dict[int, dict], num_points: int | None) -> int:
    """The number of points T; every point 0..T-1 must be done and no other."""
    if not done:
        raise TrajectoryError("no trajectory point is done (trajectories/_done.json lists none)")
    if num_points is None:
        num_points = max(done) + 1
    expected = set(range(num_points))
    missing, extra = sorted(expected - set(done)), sorted(set(done) - expected)
    if missing:
        raise TrajectoryError(f"trajectory points {missing} of 0..{num_points - 1} are not done")
    if extra:
        raise TrajectoryError(f"trajectory points {extra} are done but only 0..{num_points - 1} are expected")
    return num_points


def _corpus_record(run: RunDir) -> tuple[int, str | None]:
    corpus = run.read_manifest().get("corpus", {})
    if not corpus.get("files") or "rows" not in corpus:
        raise TrajectoryError(f"{run.manifest}: no stored corpus recorded (corpus.files / corpus.rows)")
    return int(corpus["rows"]), corpus.get("fingerprint")


def _check_record(t: int, rec: dict, n: int, fingerprint: str | None) -> None:
    if not rec.get("files"):
        raise TrajectoryError(f"trajectory point {t}: its record lists no files")
    if rec.get("rows") != n:
        raise TrajectoryError(f"trajectory point {t}: its record has {rec.get('rows')} rows, the corpus {n}")
    got = rec.get("corpus_fingerprint")
    if got is not None and fingerprint is not None and got != fingerprint:
        raise TrajectoryError(f"trajectory point {t} was scored on another corpus (fingerprint {got}, "
                              f"manifest corpus.fingerprint {fingerprint}); score it again")


def _open(run: RunDir, path: str, t: int) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path, filesystem=run.fs)
    except (OSError, pa.ArrowInvalid) as e:
        raise TrajectoryError(f"trajectory point {t}: cannot read {path}: {e}") from None


def _check_file(pf: pq.ParquetFile, path: str, t: int) -> None:
    """The file has ``idx`` and ``loss``, and its ``checkpoint`` statistics say it holds point t only."""
    names = pf.schema_arrow.names
    for col in ("idx", "loss"):
        if col not in names:
            raise TrajectoryError(f"trajectory point {t}: {path} has no column {col!r} (columns: {names})")
    if "checkpoint" not in names:
        return
    j = names.index("checkpoint")
    for r in range(pf.metadata.num_row_groups):
        st = pf.metadata.row_group(r).column(j).statistics
        if st is not None and st.has_min_max and (st.min != t or st.max != t):
            raise TrajectoryError(f"trajectory point {t}: {path} holds rows of checkpoints {st.min}..{st.max}")


def _read_columns(pf: pq.ParquetFile, path: str, t: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    table = pf.read(columns=["idx", "loss"])
    idx_col = table.column("idx")
    if idx_col.null_count:
        raise TrajectoryError(f"trajectory point {t}: {path} has {idx_col.null_count} null idx values")
    idx = idx_col.to_numpy().astype(np.int64, copy=False)
    loss = table.column("loss").to_numpy().astype(np.float32, copy=False)  # nulls become NaN
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        bad = idx[(idx < 0) | (idx >= n)][:5].tolist()
        raise TrajectoryError(f"trajectory point {t}: {path} has idx {bad} outside the corpus's 0..{n - 1}")
    return idx, loss


def _find_duplicates(run: RunDir, t: int, files: list[str]) -> str:
    """Diagnosis on the error path only: the first file holding a repeated idx."""
    seen: set[int] = set()
    for path in files:
        idx = pq.read_table(path, columns=["idx"], filesystem=run.fs).column("idx").to_numpy()
        uniq, counts = np.unique(idx, return_counts=True)
        again = np.concatenate([uniq[counts > 1], uniq[np.isin(uniq, list(seen))]])
        if len(again):
            return f"{path} repeats idx {sorted(again[:5].tolist())}"
        seen.update(uniq.tolist())
    return "repeated idx"


def _read_point(run: RunDir, t: int, files: list[str], col: np.ndarray, seen: np.ndarray) -> None:
    """Scatter point t's losses into ``col`` (length N) by idx, checking that every idx appears once."""
    n = len(col)
    seen[:] = False
    rows = 0
    for path in files:
        pf = _open(run, path, t)
        _check_file(pf, path, t)
        idx, loss = _read_columns(pf, path, t, n)
        col[idx] = loss
        seen[idx] = True
        rows += len(idx)
    if rows != n:
        raise TrajectoryError(f"trajectory point {t}: its files hold {rows} rows, the corpus has {n}")
    if not seen.all():
        missing = np.flatnonzero(~seen)[:5].tolist()
        raise TrajectoryError(f"trajectory point {t}: idx {missing} missing while others appear twice "
                              f"({_find_duplicates(run, t, files)})")


def _replace_non_finite(col: np.ndarray, value: float) -> int:
    """Set NaN/inf (and null) losses to ``value``; returns how many there were."""
    bad = ~np.isfinite(col)
    count = int(np.count_nonzero(bad))
    if count:
        col[bad] = value
    return count


def _id_samples(run: RunDir, t: int, files: list[str]) -> list[tuple[int, int, str, str]]:
    """(t, idx, id, file) of the first ID_SAMPLE_ROWS rows of file ``t mod len(files)`` of point t."""
    path = files[t % len(files)]
    pf = _open(run, path, t)
    if "id" not in pf.schema_arrow.names:
        raise TrajectoryError(f"trajectory point {t}: {path} has no column 'id'")
    for batch in pf.iter_batches(batch_size=ID_SAMPLE_ROWS, columns=["idx", "id"]):
        return [(t, int(i), rid, path) for i, rid in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())]
    return []


def corpus_ids_at(run: RunDir, positions: np.ndarray) -> dict[int, str]:
    """The corpus ids at the given idx, reading only the row groups that hold them."""
    want = np.unique(np.asarray(positions, dtype=np.int64))
    out: dict[int, str] = {}
    start = 0
    for path in run.corpus_files():
        pf = pq.ParquetFile(path, filesystem=run.fs)
        rg_rows = np.array([pf.metadata.row_group(r).num_rows for r in range(pf.metadata.num_row_groups)], np.int64)
        bounds = start + np.concatenate([[0], np.cumsum(rg_rows)])
        here = want[(want >= bounds[0]) & (want < bounds[-1])]
        if len(here):
            rg_of = np.searchsorted(bounds, here, side="right") - 1
            groups = np.unique(rg_of)
            table = pf.read_row_groups(groups.tolist(), columns=["idx", "id"])
            table_start = np.zeros(len(rg_rows), np.int64)
            table_start[groups] = np.concatenate([[0], np.cumsum(rg_rows[groups])[:-1]])
            pos = pa.array(table_start[rg_of] + here - bounds[rg_of])
            idx = table.column("idx").take(pos).to_numpy()
            if not np.array_equal(idx, here):
                raise TrajectoryError(f"{path}: corpus rows are not in idx order (expected idx {here[:3].tolist()}, "
                                      f"found {idx[:3].tolist()})")
            out.update(zip(here.tolist(), table.column("id").take(pos).to_pylist()))
        start = int(bounds[-1])
    return out


def _check_ids(run: RunDir, samples: list[tuple[int, int, str, str]]) -> None:
    """Every sampled (point, idx, id, file) must match the corpus id at idx."""
    corpus = corpus_ids_at(run, np.array([s[1] for s in samples], dtype=np.int64))
    for t, i, rid, path in samples:
        if corpus.get(i) != rid:
            raise TrajectoryError(f"trajectory point {t}: {path} has id {rid!r} at idx {i}, the corpus "
                                  f"{corpus.get(i)!r}: these trajectories belong to another corpus")


def load(run: RunDir, cfg: ClusterConfig, num_points: int | None = None) -> Trajectories:
    """Validate the trajectory table and pivot its kept points into a dense [N, T'] matrix.

    ``num_points`` is T (the proxy's ``num_points``); None takes it from the done points, which
    must then be 0..max without gaps.
    """
    if not np.isfinite(cfg.nan_value):
        raise TrajectoryError(f"cluster.nan_value must be a finite number, got {cfg.nan_value}")
    n, fingerprint = _corpus_record(run)
    done = run.done_points()
    points = kept_points(check_done(done, num_points), cfg.keep_every)
    for t in points:
        _check_record(t, done[t], n, fingerprint)
    x = np.empty((n, len(points)), dtype=np.float32)
    col, seen = np.empty(n, np.float32), np.empty(n, bool)  # one point, contiguous: fast scatter
    nan_count = 0
    for j, t in enumerate(points):
        files = list(done[t]["files"])
        _check_ids(run, _id_samples(run, t, files))
        _read_point(run, t, files, col, seen)
        nan_count += _replace_non_finite(col, cfg.nan_value)
        x[:, j] = col
    return Trajectories(x=x, points=points, steps=[int(done[t]["step"]) for t in points], nan_count=nan_count,
                        fingerprint_checked=fingerprint is not None and all(
                            done[t].get("corpus_fingerprint") == fingerprint for t in points))


# Synthetic runs, for benchmarks and tests ---------------------------------------------------------

def numbered_strings(prefix: str, start: int, n: int, width: int = 10) -> pa.StringArray:
    """``prefix`` + zero-padded numbers start..start+n-1, built without Python string objects."""
    nums = np.arange(start, start + n, dtype=np.int64)
    digits = (nums[:, None] // 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)) % 10 + ord("0")
    head = np.broadcast_to(np.frombuffer(prefix.encode(), dtype=np.uint8), (n, len(prefix)))
    data = np.concatenate([head, digits.astype(np.uint8)], axis=1).ravel()
    offsets = np.arange(0, n + 1, dtype=np.int32) * (len(prefix) + width)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))


def synthetic_losses(rng: np.random.Generator, patterns: np.ndarray, n: int, noise: float) -> np.ndarray:
    """n rows drawn from latent trajectory shapes ``patterns`` [P, T] plus Gaussian noise."""
    which = rng.integers(0, len(patterns), n)
    return patterns[which] + rng.normal(0.0, noise, (n, patterns.shape[1])).astype(np.float32)


def latent_patterns(num_patterns: int, num_points: int, seed: int) -> np.ndarray:
    """Decaying loss curves ``a * exp(-r * s) + c`` over s in [0, 1], one per pattern."""
    rng = np.random.default_rng(seed)
    s = np.linspace(0.0, 1.0, num_points)
    a, r, c = (rng.uniform(lo, hi, (num_patterns, 1)) for lo, hi in ((0.5, 4.0), (0.5, 6.0), (0.1, 2.0)))
    return (a * np.exp(-r * s) + c).astype(np.float32)


def write_synthetic_run(run: RunDir, rows: int, num_points: int, *, num_sources: int = 4,
                        num_patterns: int = 20, noise: float = 0.05, chunk_rows: int = 1_000_000,
                        seed: int = 0) -> dict:
    """Write a corpus and its trajectory points following the layout contract, chunk by chunk.

    Source i holds a share proportional to i+1 (sources of unequal sizes); point t has step
    100 (t+1). Returns the corpus record written to the manifest plus ``seconds``.
    """
    start_time = time.time()
    run.ensure()
    patterns = latent_patterns(num_patterns, num_points, seed)
    key = f"synthetic:{rows}:{num_points}:{num_sources}:{num_patterns}:{noise}:{seed}"
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:32]
    weights = np.arange(1, num_sources + 1, dtype=np.float64)
    sources = pa.array([f"source{i}" for i in range(num_sources)])
    files, point_files = [], {t: [] for t in range(num_points)}
    source_counts = np.zeros(num_sources, dtype=np.int64)
    for c, start in enumerate(range(0, rows, chunk_rows)):
        n = min(chunk_rows, rows - start)
        rng = np.random.default_rng([seed, c])
        src = rng.choice(num_sources, n, p=weights / weights.sum())
        source_counts += np.bincount(src, minlength=num_sources)
        idx, ids = pa.array(np.arange(start, start + n, dtype=np.int64)), numbered_strings("ex", start, n)
        write_parquet_atomic(run.fs, run.corpus_part(c), pa.table({
            "idx": idx, "id": ids, "source": sources.take(pa.array(src)),
            "prompt": numbered_strings("question ", start, n), "response": numbered_strings("answer ", start, n)},
            schema=CORPUS_SCHEMA))
        files.append(posixpath.basename(run.corpus_part(c)))
        x = synthetic_losses(rng, patterns, n, noise)
        for t in range(num_points):
            path = posixpath.join(run.trajectory_dir(t), f"part-{c:05d}.parquet")
            write_parquet_atomic(run.fs, path, _point_table(idx, ids, t, 100 * (t + 1), x[:, t]))
            point_files[t].append(path)
    record = {"files": files, "rows": rows, "fingerprint": fingerprint,
              "sources": {s: int(k) for s, k in zip(sources.to_pylist(), source_counts)}}
    run.update_manifest(corpus=record)
    for t in range(num_points):
        run.mark_point_done(t, {"step": 100 * (t + 1), "files": point_files[t], "rows": rows,
                                "corpus_fingerprint": fingerprint})
    return {**record, "seconds": round(time.time() - start_time, 3)}


def _point_table(idx: pa.Array, ids: pa.Array, t: int, step: int, loss: np.ndarray) -> pa.Table:
    n = len(idx)
    cols = {"idx": idx, "id": ids, "checkpoint": pa.array(np.full(n, t, np.int32)),
            "step": pa.array(np.full(n, step, np.int64)), "loss": pa.array(np.ascontiguousarray(loss)),
            "confidence": pa.array(np.exp(-loss)), "n_tokens": pa.array(np.full(n, 16, np.int32))}
    return pa.table({f.name: cols[f.name] for f in TRAJECTORY_SCHEMA}, schema=TRAJECTORY_SCHEMA)
