"""The part step: staged rows cut into ``part_rows``-row corpus parts in input order, each row with its origin."""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..layout import STORED_SCHEMA, RunDir, write_parquet_atomic
from .files import Piece
from .staging import read_staged, staged_uri

def write_part(run_uri: str, n: int, start: int, segments: list[tuple[int, int, int, list[int]]],
                origins: dict[int, tuple[int, int]]) -> dict:
    """Ray task: corpus part n (global rows from ``start``) from staged piece segments
    ``(piece, lo, hi, dropped positions)``, each row with its origin (``origins[piece]``: the input's number and, for
    JSONL, the file's line number of the piece's first line); returns its statistics and content digest."""
    run = RunDir(run_uri)
    tables = []
    for p, lo, hi, dropped in segments:
        t = read_staged(staged_uri(run, p), lo, hi)
        if dropped:
            t = t.filter(pa.array(~np.isin(np.arange(lo, hi), dropped)))
        source, first_line = origins[p]
        tables.append(t.append_column("origin", pa.array(np.full(t.num_rows, source, np.int32)))
                      .append_column("origin_row", pc.add(t.column("at"), first_line)))
    t = pa.concat_tables(tables)
    digest = hashlib.sha256(b"".join(t.column("row_hash").to_pylist())).hexdigest()
    stored = t.drop_columns(["at", "row_hash"]).rename_columns({"offset": "origin_offset"}).add_column(
        0, "idx", pa.array(np.arange(start, start + t.num_rows, dtype=np.int64)))
    write_parquet_atomic(run.fs, run.corpus_part(n), stored.select(STORED_SCHEMA.names).cast(STORED_SCHEMA))
    return {"part": n, "rows": t.num_rows, "digest": digest, "tokens": int(pc.sum(t.column("n_tokens")).as_py() or 0),
            "truncated": int(pc.sum(t.column("truncated")).as_py() or 0),
            "sources": {s["values"]: s["counts"] for s in pc.value_counts(t.column("source")).to_pylist()}}


def plan_parts(kept: list[int], drops: dict[int, list[int]], part_rows: int) -> list[tuple[int, list]]:
    """For each part of ``part_rows`` rows (the last shorter): its first global row and its piece
    segments ``(piece, staged lo, staged hi, dropped positions in it)``; ``kept[p]`` counts piece
    p's staged rows, ``drops[p]`` lists the staged positions dropped as later duplicates."""
    final = [k - len(drops.get(p, ())) for p, k in enumerate(kept)]
    offsets = np.concatenate([[0], np.cumsum(final)]).astype(np.int64)
    total = int(offsets[-1])

    def staged_pos(p: int, f: int) -> int:  # staged position of piece p's f-th kept row
        d = np.asarray(sorted(drops.get(p, ())), np.int64)
        return f + int(np.searchsorted(d - np.arange(len(d)), f, side="right"))

    parts = []
    for start in range(0, total, part_rows):
        end = min(start + part_rows, total)
        segs = []
        for p in range(int(np.searchsorted(offsets, start, side="right")) - 1, len(kept)):
            if offsets[p] >= end:
                break
            f0, f1 = max(start, offsets[p]) - offsets[p], min(end, offsets[p + 1]) - offsets[p]
            if f0 < f1:
                lo, hi = staged_pos(p, int(f0)), staged_pos(p, int(f1) - 1) + 1
                segs.append((p, lo, hi, [d for d in drops.get(p, ()) if lo <= d < hi]))
        parts.append((start, segs))
    return parts


def input_origins(pieces: list[Piece], results: list[dict]) -> tuple[list[dict], dict[int, tuple[int, int]]]:
    """The input files (``{uri, format, records}``: jsonl, jsonl.gz, json, parquet or arrow; the lines or rows the
    file holds, dropped ones included) in corpus order, and per piece its file's number and, for JSONL, the file's
    line number of its first line (the lines of the file's earlier pieces, which each ingest task counted)."""
    inputs: list[dict] = []
    number: dict[str, int] = {}
    origins, lines = {}, 0
    for piece, r in zip(pieces, results):
        if piece.uri not in number:
            number[piece.uri] = len(inputs)
            fmt = "jsonl.gz" if piece.fmt == "jsonl" and piece.uri.endswith(".gz") else piece.fmt
            inputs.append({"uri": piece.uri, "format": fmt, "records": 0})
            lines = 0
        origins[piece.number] = (number[piece.uri], lines if piece.fmt == "jsonl" else 0)
        lines += r["lines"]
        entry = inputs[number[piece.uri]]  # a Parquet or Arrow piece counts up to its last row's number in the file
        entry["records"] = lines if piece.fmt == "jsonl" else max(entry["records"], r["lines"])
    return inputs, origins
