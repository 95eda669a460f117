"""The run directory: every artifact's path and Parquet schema, the manifest, atomic writes.

This module is the contract between stages. A run directory may be a local path or any
pyarrow filesystem URI (``s3://bucket/run``)::

    <run>/
      manifest.json                 config, corpus fingerprint, versions, counts, timings
      corpus/part-<n>.parquet       normalised corpus (STORED_SCHEMA), rows in idx order
      proxy/                        Ray Train storage: proxy checkpoints
      trajectories/checkpoint=<t>/  TRAJECTORY_SCHEMA, one folder per trajectory point
      trajectories/_done.json       finished trajectory points and their files
      embeddings/part-<n>.parquet   embedding_schema(): the final checkpoint's mean-pooled hidden states
                                    (written only for a method that needs them: embedding-target)
      target/                       the target examples (select.target), a run directory of its own:
                                    manifest.json, corpus/, trajectories/, embeddings/ as above
      clusters.parquet              CLUSTERS_SCHEMA
      centroids.parquet             CENTROIDS_SCHEMA: the k-means centroids (to place target examples)
      selection.parquet             SELECTION_SCHEMA (selection-<budget>.parquet when several)
      selected.jsonl                the selected corpus rows, normalised: what jobs/finetune.py reads
      selected.original.jsonl       the selected rows as the user gave them (.parquet for Parquet or datasets input)
      selected.trl.parquet          the selected rows in TRL's SFTTrainer formats (prompt/completion or messages)
      dataset_info.json, axolotl.yaml   LLaMA-Factory's and axolotl's dataset entries for the original rows
      report.png                    cluster-mean trajectories and cluster sizes
"""
from __future__ import annotations

import contextlib
import itertools
import json
import posixpath
import re
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

CORPUS_SCHEMA = pa.schema([
    ("idx", pa.int64()),  # position in the stored corpus: 0..N-1 in file order
    ("id", pa.string()),
    ("source", pa.string()),
    ("prompt", pa.string()),  # a chat row's last asking turn
    ("response", pa.string()),  # a chat row's last assistant turn
    ("messages", pa.string()),  # a chat row's turns as JSON [{role, content}]; null for a prompt/response row
])
# The stored corpus: the contract's columns plus the tokenised text under the proxy's tokenizer
# (text.encode: the ids, and the [start, end) token spans that carry labels, flattened).
# Each row keeps its origin: the input file's number in the manifest's ``corpus.inputs`` (``{uri, format, records}``,
# records: the file's lines or rows, dropped ones included), the line (JSONL, 0-based, blank lines counted) or row
# (JSON array, Parquet, Arrow) in it, and a JSONL line's byte offset (-1 otherwise).
STORED_SCHEMA = pa.schema(list(CORPUS_SCHEMA) + [
    pa.field("input_ids", pa.list_(pa.int32())), pa.field("spans", pa.list_(pa.int32())),
    pa.field("n_tokens", pa.int32()), pa.field("n_response", pa.int32()), pa.field("truncated", pa.bool_()),
    pa.field("origin", pa.int32()), pa.field("origin_row", pa.int64()), pa.field("origin_offset", pa.int64())])
TRAJECTORY_SCHEMA = pa.schema([
    ("idx", pa.int64()),  # the row's position in the stored corpus
    ("id", pa.string()),
    ("checkpoint", pa.int32()),
    ("step", pa.int64()),
    ("loss", pa.float32()),  # mean cross-entropy over the response tokens
    ("confidence", pa.float32()),  # mean probability of the gold response tokens
    ("n_tokens", pa.int32()),  # response tokens scored
])
CLUSTERS_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source", pa.string()),
    ("cluster", pa.int32()),
    ("distance", pa.float32()),
])
CENTROIDS_SCHEMA = pa.schema([
    ("cluster", pa.int32()),
    ("source", pa.string()),  # the source whose k-means it belongs to; null for one k-means over all rows
    ("centroid", pa.list_(pa.float32())),  # over the kept trajectory points
])
SELECTION_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source", pa.string()),
    ("cluster", pa.int32()),
    ("method", pa.string()),
    ("budget", pa.int64()),
    ("file", pa.string()),  # the input file the row came from (null for a corpus stored without origins)
    ("row", pa.int64()),  # its line (JSONL, 0-based, blank lines counted) or row (Parquet, Arrow) in that file
])


def embedding_schema(dim: int) -> pa.Schema:
    """``embeddings/part-<n>.parquet``: a row's mean-pooled last hidden state (``dim``: the model's hidden size)."""
    return pa.schema([("idx", pa.int64()), ("id", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])


def stage_key(*parts: Any) -> str:
    """The key a stage records for what it was made from (configs, fingerprints, upstream keys)."""
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class LayoutError(RuntimeError):
    """A run directory is missing, inconsistent, or belongs to other inputs."""


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it for a local path or URI.

    Every URI the project opens goes through here (``FileSystem.from_uri``). For ``s3://`` that
    reads the standard AWS settings from the environment of the process: credentials
    (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile or an instance role), ``AWS_REGION``,
    and an S3-compatible endpoint from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (e.g.
    ``http://minio:9000``; pyarrow 26 honours these in ``from_uri``, not in a bare
    ``S3FileSystem()``). Set them wherever the driver and the Ray workers start. The returned
    filesystem pickles its endpoint and region, not credentials from the environment.
    """
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    import os

    return pafs.LocalFileSystem(), os.path.abspath(uri)


def absolute(path: str) -> str:
    """A local path made absolute (Ray workers do not run in the driver's directory); a URI or "" as it is."""
    import os

    return path if not path or "://" in path else os.path.abspath(path)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _temporary(path: str) -> str:
    """The hidden name an atomic write uses before moving the file to ``path``."""
    return posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")


_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")


def remove_temporaries(fs: pafs.FileSystem, folder: str) -> list[str]:
    """Delete what atomic writes killed midway left under ``folder`` (their hidden temporaries); returns them.

    No reader ever opens these names, so they are clutter rather than a risk; call this only
    while nothing writes into ``folder``.
    """
    found = [i.path for i in fs.get_file_info(pafs.FileSelector(folder, recursive=True, allow_not_found=True))
             if i.type == pafs.FileType.File and _TEMPORARY.match(posixpath.basename(i.path))]
    for path in found:
        fs.delete_file(path)
    return found


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a file so that readers see either the old or the whole new content."""
    parent = posixpath.dirname(path)
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = _temporary(path)
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)  # os.replace: atomic on one filesystem
    else:  # object stores publish an object only when its upload completes
        with fs.open_output_stream(path) as f:
            f.write(data)


def write_parquet_atomic(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_bytes_atomic(fs, path, sink.getvalue().to_pybytes())


@contextlib.contextmanager
def open_output_atomic(fs: pafs.FileSystem, path: str):
    """A stream for large outputs: written to a temporary name, moved to ``path`` only on success."""
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = _temporary(path)
    try:
        with fs.open_output_stream(tmp) as f:
            yield f
        fs.move(tmp, path)  # local: os.replace; object stores: copy then delete (the key appears whole)
    finally:
        if exists(fs, tmp):
            fs.delete_file(tmp)


def read_json(fs: pafs.FileSystem, path: str, default: Any = None) -> Any:
    if not exists(fs, path):
        return default
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def write_json_atomic(fs: pafs.FileSystem, path: str, obj: Any) -> None:
    write_bytes_atomic(fs, path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


class RunDir:
    """Paths of one run directory and helpers to read and write its artifacts."""

    def __init__(self, uri: str):
        import os

        # local paths become absolute: Ray workers do not share the driver's working directory
        self.uri = uri.rstrip("/") if "://" in uri else os.path.abspath(uri)
        self.fs, self.root = resolve(self.uri)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def uri_of(self, *parts: str) -> str:
        """A path as a URI (or local path) that Ray and pyarrow readers accept."""
        return posixpath.join(self.uri, *parts)

    # artifact paths
    @property
    def manifest(self) -> str:
        return self.path("manifest.json")

    @property
    def corpus_dir(self) -> str:
        return self.path("corpus")

    def corpus_part(self, n: int) -> str:
        return self.path("corpus", f"part-{n:05d}.parquet")

    def corpus_files(self) -> list[str]:
        """The stored corpus's part files in idx order (recorded in the manifest when complete)."""
        return [self.path("corpus", f) for f in self.read_manifest().get("corpus", {}).get("files", [])]

    def corpus_parts(self, corpus: dict | None = None) -> list[tuple[int, int, int, str]]:
        """(number, first idx, rows, path) of each stored corpus part, from the manifest (no file is opened), or from
        its corpus record ``corpus`` when the caller has read it."""
        corpus = self.read_manifest().get("corpus", {}) if corpus is None else corpus
        files, rows = corpus.get("files", []), corpus.get("part_rows", [])
        if not files or len(rows) != len(files):
            raise LayoutError(f"{self.manifest}: no stored corpus recorded (corpus.files and corpus.part_rows)")
        starts = [0, *itertools.accumulate(rows)][:-1]
        return [(int(f.removeprefix("part-").removesuffix(".parquet")), s, r, self.path("corpus", f))
                for f, s, r in zip(files, starts, rows)]

    @property
    def proxy_dir(self) -> str:
        return self.path("proxy")

    @property
    def checkpoints_index(self) -> str:
        """Proxy checkpoints persisted so far: ``{"points": {t: {"step", "path"}}}``."""
        return self.path("proxy", "_checkpoints.json")

    def proxy_checkpoints(self) -> dict[int, dict]:
        return self._points(self.checkpoints_index)

    def mark_checkpoint(self, t: int, record: dict) -> None:
        self._mark_point(self.checkpoints_index, t, record)

    @property
    def trajectories_dir(self) -> str:
        return self.path("trajectories")

    def trajectory_dir(self, t: int) -> str:
        return self.path("trajectories", f"checkpoint={t}")

    def trajectory_part(self, t: int, part: int) -> str:
        """Point t's losses for the rows of corpus part ``part``."""
        return self.path("trajectories", f"checkpoint={t}", f"part-{part:05d}.parquet")

    @property
    def trajectories_done(self) -> str:
        return self.path("trajectories", "_done.json")

    def embedding_part(self, part: int) -> str:
        """Corpus part ``part``'s embeddings (``embeddings`` stage)."""
        return self.path("embeddings", f"part-{part:05d}.parquet")

    @property
    def target(self) -> RunDir:
        """The target examples' own run directory (corpus, trajectories and embeddings stored alike)."""
        return RunDir(self.uri_of("target"))

    @property
    def clusters(self) -> str:
        return self.path("clusters.parquet")

    @property
    def centroids(self) -> str:
        return self.path("centroids.parquet")

    def selection(self, budget: int | None = None) -> str:
        return self.path("selection.parquet" if budget is None else f"selection-{budget}.parquet")

    def selected_jsonl(self, budget: int | None = None) -> str:
        return self.selected_as(budget, "jsonl")

    def selected_as(self, budget: int | None, suffix: str) -> str:
        """A budget's selected rows in one form: ``jsonl`` (normalised, what fine-tuning reads), ``original.jsonl`` /
        ``original.parquet`` (the user's own rows), ``trl.parquet`` (TRL's formats)."""
        return self.path(f"selected.{suffix}" if budget is None else f"selected-{budget}.{suffix}")

    def axolotl_yaml(self, budget: int | None = None) -> str:
        return self.path("axolotl.yaml" if budget is None else f"axolotl-{budget}.yaml")

    @property
    def dataset_info(self) -> str:
        """LLaMA-Factory's ``dataset_info.json``: an entry per budget for the original rows."""
        return self.path("dataset_info.json")

    @property
    def report(self) -> str:
        return self.path("report.png")

    def ensure(self) -> None:
        self.fs.create_dir(self.root, recursive=True)

    def remove_temporaries(self) -> list[str]:
        """Delete the temporaries of atomic writes that an interrupted run left anywhere in the run directory."""
        return remove_temporaries(self.fs, self.root)

    # manifest
    def read_manifest(self) -> dict:
        return read_json(self.fs, self.manifest, default={})

    def update_manifest(self, *, merge: bool = True, **fields: Any) -> dict:
        """Set top-level ``fields`` of manifest.json; with ``merge``, dict values are merged one level deep."""
        m = self.read_manifest()
        for k, v in fields.items():
            if merge and isinstance(v, dict) and isinstance(m.get(k), dict):
                m[k] = {**m[k], **v}
            else:
                m[k] = v
        write_json_atomic(self.fs, self.manifest, m)
        return m

    # trajectory bookkeeping
    def done_points(self) -> dict[int, dict]:
        """Finished trajectory points: ``{t: {"step": ..., "files": [...], "rows": ...}}``.

        A record should also hold ``corpus_fingerprint`` (the manifest's ``corpus.fingerprint`` when
        the point was scored): trajectories.plan refuses points scored on another corpus.
        """
        return self._points(self.trajectories_done)

    def mark_point_done(self, t: int, record: dict) -> None:
        self._mark_point(self.trajectories_done, t, record)

    def _points(self, index: str) -> dict[int, dict]:
        raw = read_json(self.fs, index, default={})
        return {int(t): v for t, v in raw.get("points", {}).items()}

    def _mark_point(self, index: str, t: int, record: dict) -> None:
        raw = read_json(self.fs, index, default={})
        raw.setdefault("points", {})[str(t)] = record
        write_json_atomic(self.fs, index, raw)
