"""The ingest step: one piece parsed, normalised and tokenised into a staged Arrow file, with its ids' hashes."""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import posixpath
import time
from typing import Any

import numpy as np
import pyarrow as pa

from ..config import CorpusConfig, TextConfig
from ..layout import STORED_SCHEMA, resolve
from .drops import Drops, strict_error
from .errors import CorpusError, RowError
from .files import Piece
from .readers import location, piece_records
from .schema import normalise

STAGE_BATCH = 1024  # rows per record batch of a staged piece (part writers read whole batches)

# A staged piece: the stored columns without idx and the origin (written with the parts), plus where each row is
# in the piece (``at``: a JSONL line's index in the piece, a Parquet or Arrow row's number in its file), a JSONL
# line's byte offset in its (decompressed) file, and the row's content hash.
STAGED_SCHEMA = pa.schema([f for f in STORED_SCHEMA if f.name not in ("idx", "origin", "origin_row", "origin_offset")]
                          + [pa.field("at", pa.int64()), pa.field("offset", pa.int64()),
                             pa.field("row_hash", pa.binary(16))])


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str, chat_setting: str):
    from ..models import load_tokenizer
    from ..text import chat_template

    tok = load_tokenizer(path)
    return tok, chat_template(tok, chat_setting)


def tokenize(tok: Any, chat: str | None, rows: list[dict], text: TextConfig, where: list[str]) -> dict[str, list]:
    """``text.encode`` of normalised rows."""
    from ..text import encode

    return encode(tok, [r["prompt"] for r in rows], [r["response"] for r in rows],
                  [json.loads(r["messages"]) if r["messages"] else None for r in rows],
                  template=text.template, chat=chat, max_length=text.max_length, where=where,
                  train_on_prompt=text.train_on_prompt)


def int32_lists(rows: list[list[int]]) -> pa.ListArray:
    """Python lists of ints as one Arrow list<int32> array, built from flat buffers (not row by row)."""
    lengths = np.fromiter(map(len, rows), np.int32, len(rows))
    offsets = np.zeros(len(rows) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(rows), np.int32, int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def row_hash(r: dict) -> bytes:
    return hashlib.blake2b("\x1f".join((r["id"], r["source"], r["prompt"], r["response"], r["messages"] or ""))
                           .encode(), digest_size=16).digest()


def id_hashes(ids: list[str]) -> np.ndarray:
    """An 8-byte hash of each id (uint64), the same in every process."""
    return np.frombuffer(b"".join(hashlib.blake2b(i.encode(), digest_size=8).digest() for i in ids), np.uint64)


def ingest_piece(piece: Piece, cfg: CorpusConfig, text: TextConfig, tokenizer: str, staging: str) -> dict:
    """Ray task: parse, normalise and tokenise one piece into the Arrow IPC file ``staging``.

    Returns its kept rows, its JSONL lines (blank ones included), drops, and the id hash of every kept row in
    order (for the duplicate check across pieces). Within the piece, a repeated id is dropped here.
    """
    started = time.perf_counter()
    tok, chat = _tokenizer(tokenizer, text.chat_template)
    fs, path = resolve(staging)
    drops, seen, hashes, kept_rows, tokenizing, lines = Drops(), set(), [], 0, 0.0, 0
    pending = STAGED_SCHEMA.empty_table()

    def drop(reason: str, at: int, rid: str) -> None:
        if cfg.strict:
            raise strict_error(location(piece, at), reason, rid)
        drops.add(reason, rid)

    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as sink, pa.ipc.new_file(sink, STAGED_SCHEMA) as writer:
        for chunk in piece_records(piece):
            rows, ats, offsets = [], [], []
            for at, offset, rec in chunk:
                lines = at + 1
                if rec is None:
                    continue
                try:
                    r = normalise(rec, cfg)
                except RowError as e:
                    raise CorpusError(f"{location(piece, at)}: {e}") from None
                if r["drop"]:
                    drop(r["drop"], at, r["id"])
                elif r["id"] in seen:
                    drop("duplicate_id", at, r["id"])
                else:
                    seen.add(r["id"])
                    rows.append(r)
                    ats.append(at)
                    offsets.append(offset)
            if not rows:
                continue
            tick = time.perf_counter()
            enc = tokenize(tok, chat, rows, text, [f"{piece.uri} row id {r['id']!r}" for r in rows])
            tokenizing += time.perf_counter() - tick
            keep = [i for i, n in enumerate(enc["n_response"]) if n > 0]
            for i in sorted(set(range(len(rows))) - set(keep)):
                drop("no_response_tokens", ats[i], rows[i]["id"])
            if not keep:
                continue
            kept = [rows[i] for i in keep]
            cols: dict[str, Any] = {k: [r[k] for r in kept] for k in ("id", "source", "prompt", "response", "messages")}
            cols |= {k: [enc[k][i] for i in keep] for k in ("n_response", "truncated")}
            for k in ("input_ids", "spans"):
                cols[k] = int32_lists([enc[k][i] for i in keep])
            cols["n_tokens"] = np.diff(cols["input_ids"].offsets.to_numpy())
            cols["at"] = [ats[i] for i in keep]
            cols["offset"] = [offsets[i] for i in keep]
            cols["row_hash"] = [row_hash(r) for r in kept]
            pending = pa.concat_tables([pending, pa.Table.from_pydict(cols, schema=STAGED_SCHEMA)])
            full = pending.num_rows - pending.num_rows % STAGE_BATCH
            for lo in range(0, full, STAGE_BATCH):  # whole batches: rows of batch i are [i, i + 1) * STAGE_BATCH
                writer.write_batch(pending.slice(lo, STAGE_BATCH).combine_chunks().to_batches()[0])
            pending = pending.slice(full)
            hashes.append(id_hashes(cols["id"]))
            kept_rows += len(kept)
        if pending.num_rows:
            writer.write_batch(pending.combine_chunks().to_batches()[0])
    return {"piece": piece.number, "rows": kept_rows, "lines": lines, "dropped": drops.counts, "examples": drops.examples,
            "id_hash": np.concatenate(hashes) if hashes else np.empty(0, np.uint64),
            "seconds": time.perf_counter() - started, "tokenize_seconds": tokenizing}


# the corpus stage -------------------------------------------------------------------------------

def staged_uri(run, piece: int) -> str:
    return run.uri_of("corpus", "_staging", f"piece-{piece:05d}.arrow")


def hashes_path(run, piece: int, bucket: int) -> str:
    return run.path("corpus", "_staging", f"hashes-{piece:05d}-{bucket:03d}.npy")


def ingest(piece: Piece, cfg: CorpusConfig, text: TextConfig, tokenizer: str, run_uri: str, buckets: int) -> dict:
    """Ray task: ``ingest_piece`` into the run's staging folder, and its rows' (id hash, position) records
    split by hash into ``buckets`` staged files (not returned: nothing per row passes through the driver)."""
    import io

    from ..layout import RunDir, write_bytes_atomic

    import ray

    run = RunDir(run_uri)
    stats = ingest_piece(piece, cfg, text, tokenizer, staged_uri(run, piece.number))
    stats["node"] = ray.get_runtime_context().get_node_id()
    hashes = stats.pop("id_hash")
    rec = np.empty(len(hashes), dtype=[("h", np.uint64), ("pos", np.int64)])
    rec["h"], rec["pos"] = hashes, np.arange(len(hashes))
    which = hashes % np.uint64(buckets)
    for b in range(buckets):
        buf = io.BytesIO()
        np.save(buf, rec[which == b])
        write_bytes_atomic(run.fs, hashes_path(run, piece.number, b), buf.getvalue())
    return stats


def read_staged(uri: str, lo: int, hi: int, columns: list[str] | None = None) -> pa.Table:
    """Staged rows [lo, hi) of a piece, reading only the record batches that hold them."""
    fs, path = resolve(uri)
    with fs.open_input_file(path) as f:
        reader = pa.ipc.open_file(f)
        first, last = lo // STAGE_BATCH, min(reader.num_record_batches, -(-hi // STAGE_BATCH))
        table = pa.Table.from_batches([reader.get_batch(i) for i in range(first, last)], schema=STAGED_SCHEMA)
    table = table.slice(lo - first * STAGE_BATCH, hi - lo)
    return table.select(columns) if columns else table


def read_positions(uri: str, positions: np.ndarray, columns: list[str]) -> pa.Table:
    """Staged rows at the sorted ``positions`` of a piece (``columns`` only), each record batch that holds any of
    them read once."""
    fs, path = resolve(uri)
    with fs.open_input_file(path) as f:
        reader = pa.ipc.open_file(f)
        tables = []
        for b in np.unique(positions // STAGE_BATCH):
            batch = pa.Table.from_batches([reader.get_batch(int(b))]).select(columns)
            tables.append(batch.take(positions[positions // STAGE_BATCH == b] - b * STAGE_BATCH))
    return pa.concat_tables(tables)
