"""Reading one piece a chunk at a time: raw records with where each is (the file's own line or row)."""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..config import CorpusConfig
from ..layout import resolve
from .errors import CorpusError
from .files import Piece, discover, plan_pieces

CHUNK_ROWS = 4096  # rows parsed and tokenised at a time inside a piece


def _aligned_start(f: Any, start: int) -> int:
    """The first line start at or after ``start`` (a line that began before belongs to the previous piece)."""
    if start == 0:
        return 0
    f.seek(start - 1)
    pos = start - 1
    while buf := f.read(1 << 16):
        nl = buf.find(b"\n")
        if nl >= 0:
            return pos + nl + 1
        pos += len(buf)
    return pos


def location(piece: Piece, at: int) -> str:
    """A row's location for messages: ``file:line`` for JSONL (``at`` is the line's index in the piece;
    the lines before the piece are counted only now, when an error or a strict check needs them),
    else ``file row r`` (``at`` is the file's row number)."""
    if piece.fmt != "jsonl":
        return f"{piece.uri} row {at}"
    before = 0
    if piece.start > 0:
        fs, path = resolve(piece.uri)
        with fs.open_input_file(path) as f:
            left = _aligned_start(f, piece.start)
            f.seek(0)
            while left > 0 and (buf := f.read(min(left, 1 << 22))):
                before += buf.count(b"\n")
                left -= len(buf)
    return f"{piece.uri}:{before + at + 1}"


def json_lines(piece: Piece) -> Iterator[list[tuple[int, int, bytes]]]:
    """Chunks of (index in the piece, byte offset in the file, raw line) of the lines of a JSONL piece that start in
    [start, end)."""
    fs, path = resolve(piece.uri)
    whole = piece.end < 0
    f = fs.open_input_stream(path, compression="gzip" if path.endswith(".gz") else None) if whole \
        else fs.open_input_file(path)
    with f:
        pos = 0 if whole else _aligned_start(f, piece.start)
        if not whole:
            f.seek(pos)
        rows: list[tuple[int, int, bytes]] = []
        rest, n = b"", 0
        while whole or pos < piece.end:
            buf = f.read(1 << 22)
            lines = (rest + buf).split(b"\n")
            rest = lines.pop()
            if not buf and rest:  # a last line with no newline after it (none after a final newline)
                lines.append(rest)
            for raw in lines:
                if not whole and pos >= piece.end:
                    break
                rows.append((n, pos, raw))
                n += 1
                pos += len(raw) + 1
            if len(rows) >= CHUNK_ROWS or not buf:
                yield rows
                rows = []
            if not buf:
                break
        if rows:
            yield rows


def piece_records(piece: Piece) -> Iterator[list[tuple[int, int, Any]]]:
    """Chunks of (at, offset, record) of a piece: ``at`` locates each row for ``location``, ``offset`` is a JSONL line's
    byte offset (-1 for Parquet and Arrow rows); a blank JSONL line comes as record None (it counts as a line)."""
    if piece.fmt == "jsonl":
        for chunk in json_lines(piece):
            out = []
            for at, offset, raw in chunk:
                if not raw.strip():
                    out.append((at, offset, None))
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise CorpusError(f"{location(piece, at)}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
                try:
                    out.append((at, offset, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{location(piece, at)}: malformed JSON ({e.msg} at column {e.colno})") from None
            yield out
        return
    fs, path = resolve(piece.uri)
    if piece.fmt == "json":
        yield from _array_records(piece)
        return
    if piece.fmt == "parquet":
        try:
            pf = pq.ParquetFile(fs.open_input_file(path))
        except (pa.ArrowInvalid, OSError) as e:
            raise CorpusError(f"{piece.uri}: not a readable Parquet file ({e})") from None
        batches = pf.iter_batches(batch_size=CHUNK_ROWS, row_groups=range(piece.start, piece.end))
    else:
        try:
            batches = pa.ipc.open_stream(fs.open_input_stream(path))
        except (pa.ArrowInvalid, OSError) as e:
            raise CorpusError(f"{piece.uri}: not a readable Arrow shard ({e})") from None
    row = piece.first_row
    for b in batches:
        rows = b.to_pylist()
        yield [(r, -1, rec) for r, rec in zip(range(row, row + len(rows)), rows)]
        row += len(rows)


def read_json_array(uri: str) -> list:
    """The records of a file holding one JSON array (gzipped or not)."""
    fs, path = resolve(uri)
    with fs.open_input_stream(path, compression="gzip" if path.endswith(".gz") else None) as f:
        raw = f.read()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorpusError(f"{uri}: malformed JSON array ({e})") from None
    if not isinstance(data, list):
        raise CorpusError(f"{uri}: expected a JSON array of records or JSON lines")
    return data


def _array_records(piece: Piece) -> Iterator[list[tuple[int, int, Any]]]:
    """Chunks of (row, -1, record) of a file holding one JSON array."""
    data = read_json_array(piece.uri)
    for lo in range(0, len(data), CHUNK_ROWS):
        yield [(i, -1, rec) for i, rec in enumerate(data[lo:lo + CHUNK_ROWS], lo)]


def records(cfg: CorpusConfig) -> Iterator[tuple[str, Any]]:
    """Every raw record of the corpus in input order, with where it is (``file:line`` or ``file row r``);
    in this process, for small inputs (evaluation sets) and checks."""
    fmt, files = discover(cfg)
    for piece in plan_pieces(fmt, files, 1 << 62):
        for chunk in piece_records(piece):
            for at, _, rec in chunk:
                if rec is not None:
                    yield location(piece, at), rec
