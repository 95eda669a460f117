"""Read an SFT corpus in parallel pieces, normalise, tokenise and validate it into ``<run>/corpus/``.

Inputs: JSONL (gzip too), Parquet, a ``datasets.save_to_disk`` directory, or a folder of shards,
on a local path or any pyarrow filesystem URI. Rows are prompt/response pairs, or conversations
in a ``messages`` column (``{role, content}``) or ShareGPT ``conversations`` (``{from, value}``).

The input is cut into pieces: byte ranges of a JSONL file aligned to line starts, groups of a
Parquet file's row groups, the Arrow shards of a ``datasets`` directory (a gzip file is one
piece). Each piece is a Ray task that parses, normalises and tokenises its rows a chunk at a
time (memory bounded by the chunk, whatever the file size) and stages them; errors name the
file's own line (JSONL) or row (Parquet, Arrow). Each piece also stages an 8-byte hash of every
row's id, split into hash buckets; one task per bucket finds the repeated ids across pieces, and
part-writer tasks cut the staged rows into ``part_rows``-row parts in input order, so the parts,
``idx`` and fingerprint do not depend on how the input was cut, and nothing per row passes
through the driver. Rows with an empty prompt or response, a duplicate id (the first is kept) or no response
token left after truncation are dropped and counted (``corpus.strict`` makes each an error);
malformed JSON, bad UTF-8 and missing or mistyped fields are always errors.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import json
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .config import CorpusConfig, TextConfig
from .layout import STORED_SCHEMA, exists, resolve, write_parquet_atomic
from .progress import Progress

JSONL_EXT = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_EXT = (".parquet",)
CHUNK_ROWS = 4096  # rows parsed and tokenised at a time inside a piece
STAGE_BATCH = 1024  # rows per record batch of a staged piece (part writers read whole batches)
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
         "model": "assistant", "system": "system", "tool": "tool", "function": "tool", "ipython": "tool"}
# Column pairs of other tools' schemas, read when the default prompt/response columns are absent:
# GSM8K (question, answer), MATH (problem, solution), Alpaca and MathInstruct (instruction, output).
SCHEMAS = (("question", "answer"), ("problem", "solution"), ("instruction", "output"))
DROP_REASONS = ("empty_prompt", "empty_response", "duplicate_id", "no_response_tokens")
# A staged piece: the stored columns without idx and the origin (written with the parts), plus where each row is
# in the piece (``at``: a JSONL line's index in the piece, a Parquet or Arrow row's number in its file), a JSONL
# line's byte offset in its (decompressed) file, and the row's content hash.
STAGED_SCHEMA = pa.schema([f for f in STORED_SCHEMA if f.name not in ("idx", "origin", "origin_row", "origin_offset")]
                          + [pa.field("at", pa.int64()), pa.field("offset", pa.int64()),
                             pa.field("row_hash", pa.binary(16))])


class CorpusError(ValueError):
    """The corpus is missing, empty or malformed; the message names the file, row and field."""


# finding the input -----------------------------------------------------------------------------

def discover(cfg: CorpusConfig) -> tuple[str, list[str]]:
    """The corpus format and its files (as URIs or absolute local paths; a ``datasets`` dir as itself)."""
    if not cfg.path:
        raise CorpusError("no corpus path given")
    fs, root = resolve(cfg.path)
    info = fs.get_file_info(root)
    prefix = cfg.path.split("://")[0] + "://" if "://" in cfg.path else ""

    def uri(p: str) -> str:
        return prefix + p if prefix else p

    if info.type == pafs.FileType.NotFound:
        raise CorpusError(f"corpus path does not exist: {cfg.path}")
    if info.type == pafs.FileType.File:
        files = [root]
    else:
        if cfg.format in ("auto", "hf") and any(exists(fs, posixpath.join(root, n))
                                                for n in ("dataset_info.json", "dataset_dict.json", "state.json")):
            return "hf", [cfg.path]
        sel = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        files = sorted(f.path for f in sel if f.type == pafs.FileType.File
                       and not posixpath.basename(f.path).startswith((".", "_"))
                       and f.path.endswith(JSONL_EXT + PARQUET_EXT))
        if not files:
            raise CorpusError(f"{cfg.path}: folder holds no .jsonl, .json or .parquet files")
    fmt = cfg.format
    if fmt == "auto":
        kinds = {"parquet" if f.endswith(PARQUET_EXT) else "jsonl" if f.endswith(JSONL_EXT) else "?" for f in files}
        if kinds == {"?"} or len(kinds) != 1:
            raise CorpusError(f"{cfg.path}: cannot tell the format from the file names {files[:3]}; "
                              "set corpus.format to jsonl, parquet or hf")
        fmt = kinds.pop()
    if fmt not in ("jsonl", "parquet", "hf"):
        raise CorpusError(f"corpus.format must be auto, jsonl, parquet or hf, not {fmt!r}")
    return fmt, [uri(f) for f in files]


def input_fingerprint(cfg: CorpusConfig) -> str:
    """A cheap fingerprint of the input files (paths, sizes, modification times) and the settings that decide the
    stored rows (``piece_mb``, how the input is split for reading, does not)."""
    fmt, files = discover(cfg)
    parts = [fmt, json.dumps({k: v for k, v in cfg.__dict__.items() if k != "piece_mb"}, sort_keys=True)]
    for f in files:
        fs, path = resolve(f)
        if fmt == "hf":
            infos = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File]
        else:
            infos = [fs.get_file_info(path)]
        parts += [f"{i.path}:{i.size}:{i.mtime_ns}" for i in sorted(infos, key=lambda i: i.path)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Piece:
    """One unit of parallel reading: a JSONL byte range, Parquet row groups, or an Arrow shard."""

    number: int
    uri: str
    fmt: str  # jsonl | parquet | arrow
    start: int = 0  # jsonl: first byte; parquet: first row group
    end: int = -1  # jsonl: end byte (-1: to the end, gzip); parquet: end row group
    first_row: int = 0  # parquet: the file's row number of the piece's first row


def _hf_shards(uri: str) -> list[str]:
    """The Arrow shard files of a ``datasets.save_to_disk`` directory (its train split for a dict)."""
    fs, root = resolve(uri)
    prefix = uri.split("://")[0] + "://" if "://" in uri else ""
    from .layout import read_json

    splits = read_json(fs, posixpath.join(root, "dataset_dict.json"))
    if splits is not None:
        if "train" not in splits.get("splits", []):
            raise CorpusError(f"{uri}: dataset dict has no 'train' split (splits: {splits.get('splits')})")
        root = posixpath.join(root, "train")
    state = read_json(fs, posixpath.join(root, "state.json"))
    if not state or not state.get("_data_files"):
        raise CorpusError(f"{uri}: not a datasets.save_to_disk directory (no state.json listing its data files)")
    return [prefix + posixpath.join(root, f["filename"]) for f in state["_data_files"]]


def plan_pieces(fmt: str, files: list[str], piece_bytes: int) -> list[Piece]:
    """Cut the input files into pieces of about ``piece_bytes`` (input bytes; uncompressed for Parquet)."""
    pieces: list[Piece] = []

    def add(**kw: Any) -> None:
        pieces.append(Piece(number=len(pieces), **kw))

    for uri in files:
        fs, path = resolve(uri)
        if fmt == "hf":
            for shard in _hf_shards(uri):
                add(uri=shard, fmt="arrow")
        elif fmt == "parquet":
            try:
                meta = pq.ParquetFile(fs.open_input_file(path)).metadata
            except (pa.ArrowInvalid, OSError) as e:
                raise CorpusError(f"{uri}: not a readable Parquet file ({e})") from None
            start, row, size, first = 0, 0, 0, 0
            for g in range(meta.num_row_groups):
                size += meta.row_group(g).total_byte_size
                row += meta.row_group(g).num_rows
                if size >= piece_bytes or g == meta.num_row_groups - 1:
                    add(uri=uri, fmt="parquet", start=start, end=g + 1, first_row=first)
                    start, size, first = g + 1, 0, row
        elif _json_array(fs, path):  # one JSON array (MathInstruct's own file, Alpaca's): read whole, in one task
            add(uri=uri, fmt="json")
        elif path.endswith(".gz"):
            add(uri=uri, fmt="jsonl")
        else:
            size = fs.get_file_info(path).size
            for s in range(0, max(size, 1), piece_bytes):
                add(uri=uri, fmt="jsonl", start=s, end=min(s + piece_bytes, size))
    return pieces


def _json_array(fs: Any, path: str) -> bool:
    """Whether a ``.json`` file holds one JSON array rather than JSON lines (its first non-blank byte is ``[``); a
    ``.jsonl`` file is always JSON lines."""
    if not path.endswith((".json", ".json.gz")):
        return False
    with fs.open_input_stream(path, compression="gzip" if path.endswith(".gz") else None) as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


# reading one piece ------------------------------------------------------------------------------

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


def _where(piece: Piece, at: int) -> str:
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


def _records(piece: Piece) -> Iterator[list[tuple[int, int, Any]]]:
    """Chunks of (at, offset, record) of a piece: ``at`` locates each row for ``_where``, ``offset`` is a JSONL line's
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
                    raise CorpusError(f"{_where(piece, at)}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
                try:
                    out.append((at, offset, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{_where(piece, at)}: malformed JSON ({e.msg} at column {e.colno})") from None
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
        for chunk in _records(piece):
            for at, _, rec in chunk:
                if rec is not None:
                    yield _where(piece, at), rec


# normalising one row ----------------------------------------------------------------------------

class RowError(ValueError):
    """A malformed record; the caller adds where it is."""


def row_id(source: str, prompt: str, response: str) -> str:
    """The id derived from a row's content when the corpus gives none (``response``: a chat row's JSON)."""
    return hashlib.sha1("\x1f".join((source, prompt, response)).encode()).hexdigest()[:20]


def _conversation(turns: Any, col: str) -> list[dict]:
    """``{role, content}`` turns of a messages or ShareGPT (``{from, value}``) column."""
    if not isinstance(turns, list) or not turns or not all(isinstance(m, dict) for m in turns):
        raise RowError(f"field {col!r} must be a non-empty list of {{role, content}} (or ShareGPT {{from, value}}) "
                       "objects")
    out = []
    for i, m in enumerate(turns):
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role not in ROLES:
            raise RowError(f"field {col!r} turn {i} has role {role!r}; expected one of {sorted(ROLES)}")
        if not isinstance(content, str):
            raise RowError(f"field {col!r} turn {i} content must be a string, got {type(content).__name__}")
        out.append({"role": ROLES[role], "content": content})
    return out


def _chat_drop(conv: list[dict]) -> str | None:
    answers = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
    if not answers or any(not conv[i]["content"].strip() for i in answers):
        return "empty_response"
    asks = [m for m in conv if m["role"] != "assistant"]
    if not any(m["role"] != "assistant" for m in conv[:answers[0]]) or any(not m["content"].strip() for m in asks):
        return "empty_prompt"
    return None


def columns_of(rec: dict, cfg: CorpusConfig) -> dict[str, str]:
    """The columns of ``rec`` that ``normalise`` reads: ``{"messages": col}`` for a chat row (a ``corpus.messages``
    or ``conversations`` column, and no prompt column), else ``{"prompt", "response"}`` (with the default names
    absent, the first pair of ``SCHEMAS`` present) and, for Alpaca's ``instruction``, its ``"query"`` column
    ``input`` when the row has one."""
    chat_col = next((c for c in (cfg.messages, "conversations") if rec.get(c) is not None), None)
    if chat_col is not None and cfg.prompt not in rec:
        return {"messages": chat_col}
    pcol, rcol = cfg.prompt, cfg.response
    if pcol not in rec and (pcol, rcol) == ("prompt", "response"):  # another tool's own schema
        pcol, rcol = next(((a, b) for a, b in SCHEMAS if a in rec and b in rec), (pcol, rcol))
    return {"prompt": pcol, "response": rcol} | ({"query": "input"} if pcol == "instruction" and "input" in rec else {})


def normalise(rec: Any, cfg: CorpusConfig) -> dict:
    """One record as ``{id, source, prompt, response, messages, drop}``: ``messages`` the JSON of a chat
    row's turns (else None); ``drop`` the reason the row is dropped (empty prompt or response) or None.
    A malformed record raises RowError.

    A chat row (a ``corpus.messages`` or ``conversations`` column, and no prompt column) has as
    ``prompt`` and ``response`` its last asking turn before its last assistant turn, and that turn.
    With the default column names and no ``prompt`` column, the pairs of ``SCHEMAS`` are tried.
    """
    if not isinstance(rec, dict):
        raise RowError(f"expected a JSON object, got {type(rec).__name__}")
    cols = columns_of(rec, cfg)
    messages = drop = None
    if "messages" in cols:
        chat_col = cols["messages"]
        conv = _conversation(rec[chat_col], chat_col)
        drop = _chat_drop(conv)
        answers = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
        last = answers[-1] if answers else len(conv)
        prompt = next((m["content"] for m in reversed(conv[:last]) if m["role"] != "assistant"), "")
        response = conv[last]["content"] if answers else ""
        messages = json.dumps(conv, ensure_ascii=False)
    else:
        pcol, rcol = cols["prompt"], cols["response"]
        for col in (pcol, rcol):
            if col not in rec:
                raise RowError(f"missing field {col!r} (fields: {sorted(rec)}); set corpus.prompt / corpus.response "
                               f"to map columns, or give a {cfg.messages!r} chat column")
        prompt, response = rec[pcol], rec[rcol]
        for name, val in ((pcol, prompt), (rcol, response)):
            if not isinstance(val, str):
                raise RowError(f"field {name!r} must be a string, got {type(val).__name__}")
        if "query" in cols and isinstance(rec[cols["query"]], str) and rec[cols["query"]]:
            prompt = f"{prompt}\n{rec[cols['query']]}"  # Alpaca: the instruction, a newline, its input (as LLaMA-Factory)
        drop = "empty_prompt" if not prompt.strip() else "empty_response" if not response.strip() else None
    source = rec.get(cfg.source)
    source = cfg.default_source if source is None or source == "" else str(source)
    rid = rec.get(cfg.id)
    rid = row_id(source, "" if messages else prompt, messages or response) if rid is None or rid == "" else str(rid)
    return {"id": rid, "source": source, "prompt": prompt, "response": response, "messages": messages, "drop": drop}


def normalised(cfg: CorpusConfig) -> Iterator[tuple[str, dict]]:
    """``(where, normalised row)`` of every record in input order, in this process (``records``)."""
    for where, rec in records(cfg):
        try:
            yield where, normalise(rec, cfg)
        except RowError as e:
            raise CorpusError(f"{where}: {e}") from None


def check_records(cfg: CorpusConfig) -> None:
    """Read the whole corpus once and raise its first malformed record's CorpusError, if any."""
    for _ in normalised(cfg):
        pass


def sample_texts(cfg: CorpusConfig, n: int, seed: int) -> list[str]:
    """The text of a uniform sample of at most n rows (reservoir sampling over one pass, which also
    checks every record), for training a tokenizer on the corpus."""
    rng = np.random.default_rng(seed)
    sample: list[str] = []
    for i, (_, r) in enumerate(normalised(cfg)):
        text = "\n".join(m["content"] for m in json.loads(r["messages"])) if r["messages"] else \
            r["prompt"] + "\n" + r["response"]
        if len(sample) < n:
            sample.append(text)
        elif (j := rng.integers(0, i + 1)) < n:
            sample[j] = text
    if not sample:
        raise CorpusError(f"{cfg.path}: the corpus is empty")
    return sample


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str, chat_setting: str):
    from .models import load_tokenizer
    from .text import chat_template

    tok = load_tokenizer(path)
    return tok, chat_template(tok, chat_setting)


def tokenize(tok: Any, chat: str | None, rows: list[dict], text: TextConfig, where: list[str]) -> dict[str, list]:
    """``text.encode`` of normalised rows."""
    from .text import encode

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


def _row_hash(r: dict) -> bytes:
    return hashlib.blake2b("\x1f".join((r["id"], r["source"], r["prompt"], r["response"], r["messages"] or ""))
                           .encode(), digest_size=16).digest()


def id_hashes(ids: list[str]) -> np.ndarray:
    """An 8-byte hash of each id (uint64), the same in every process."""
    return np.frombuffer(b"".join(hashlib.blake2b(i.encode(), digest_size=8).digest() for i in ids), np.uint64)


class Drops:
    """Rows dropped per reason: counts and the first few ids."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(DROP_REASONS, 0)
        self.examples: dict[str, list[str]] = {r: [] for r in DROP_REASONS}

    def add(self, reason: str, rid: str, n: int = 1) -> None:
        self.counts[reason] += n
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(rid)

    def merge(self, counts: dict, examples: dict) -> None:
        for r in DROP_REASONS:
            self.counts[r] += counts[r]
            self.examples[r] = (self.examples[r] + examples[r])[:5]


STRICT_MESSAGES = {
    "empty_prompt": "the prompt is empty", "empty_response": "the response is empty", "duplicate_id": "duplicate id",
    "no_response_tokens": "no response token is left after truncation to text.max_length (raise it or shorten the "
                          "prompt)"}


def strict_error(where: str, reason: str, rid: str) -> CorpusError:
    return CorpusError(f"{where}: {STRICT_MESSAGES[reason]} (id {rid!r}); corpus.strict is true (false drops such "
                       "rows and counts them)")


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
            raise strict_error(_where(piece, at), reason, rid)
        drops.add(reason, rid)

    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as sink, pa.ipc.new_file(sink, STAGED_SCHEMA) as writer:
        for chunk in _records(piece):
            rows, ats, offsets = [], [], []
            for at, offset, rec in chunk:
                lines = at + 1
                if rec is None:
                    continue
                try:
                    r = normalise(rec, cfg)
                except RowError as e:
                    raise CorpusError(f"{_where(piece, at)}: {e}") from None
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
            cols["row_hash"] = [_row_hash(r) for r in kept]
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

def _staged(run, piece: int) -> str:
    return run.uri_of("corpus", "_staging", f"piece-{piece:05d}.arrow")


def _hashes(run, piece: int, bucket: int) -> str:
    return run.path("corpus", "_staging", f"hashes-{piece:05d}-{bucket:03d}.npy")


def _ingest(piece: Piece, cfg: CorpusConfig, text: TextConfig, tokenizer: str, run_uri: str, buckets: int) -> dict:
    """Ray task: ``ingest_piece`` into the run's staging folder, and its rows' (id hash, position) records
    split by hash into ``buckets`` staged files (not returned: nothing per row passes through the driver)."""
    import io

    from .layout import RunDir, write_bytes_atomic

    import ray

    run = RunDir(run_uri)
    stats = ingest_piece(piece, cfg, text, tokenizer, _staged(run, piece.number))
    stats["node"] = ray.get_runtime_context().get_node_id()
    hashes = stats.pop("id_hash")
    rec = np.empty(len(hashes), dtype=[("h", np.uint64), ("pos", np.int64)])
    rec["h"], rec["pos"] = hashes, np.arange(len(hashes))
    which = hashes % np.uint64(buckets)
    for b in range(buckets):
        buf = io.BytesIO()
        np.save(buf, rec[which == b])
        write_bytes_atomic(run.fs, _hashes(run, piece.number, b), buf.getvalue())
    return stats


def _read_staged(uri: str, lo: int, hi: int, columns: list[str] | None = None) -> pa.Table:
    """Staged rows [lo, hi) of a piece, reading only the record batches that hold them."""
    fs, path = resolve(uri)
    with fs.open_input_file(path) as f:
        reader = pa.ipc.open_file(f)
        first, last = lo // STAGE_BATCH, min(reader.num_record_batches, -(-hi // STAGE_BATCH))
        table = pa.Table.from_batches([reader.get_batch(i) for i in range(first, last)], schema=STAGED_SCHEMA)
    table = table.slice(lo - first * STAGE_BATCH, hi - lo)
    return table.select(columns) if columns else table


def _read_positions(uri: str, positions: np.ndarray, columns: list[str]) -> pa.Table:
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


def _duplicates(pieces: list[Piece], run_uri: str, strict: bool, bucket: int) -> list[tuple[int, int, str]]:
    """Ray task: among one bucket's id hashes from every piece, ``(piece, position, id)`` of each row whose
    id an earlier row already has; equal hashes are confirmed on the staged ids (read once per piece)."""
    import io

    from .layout import RunDir

    run = RunDir(run_uri)
    buckets = []
    for p in range(len(pieces)):
        with run.fs.open_input_stream(_hashes(run, p, bucket)) as f:
            buckets.append(np.load(io.BytesIO(f.read())))
    piece_of = np.concatenate([np.full(len(b), p, np.int64) for p, b in enumerate(buckets)])
    rec = np.concatenate(buckets)
    order = np.lexsort((rec["pos"], piece_of, rec["h"]))  # by hash, then input order
    h = rec["h"][order]
    same = np.flatnonzero(h[1:] == h[:-1])
    members = order[np.unique(np.concatenate([same, same + 1]))]  # rows sharing a hash, by hash then input order
    staged: dict[tuple[int, int], dict] = {}
    for p in np.unique(piece_of[members]):
        pos = np.sort(rec["pos"][members[piece_of[members] == p]]).astype(np.int64)
        for q, row in zip(pos, _read_positions(_staged(run, int(p)), pos, ["id", "at"]).to_pylist()):
            staged[int(p), int(q)] = row
    out: list[tuple[int, int, str]] = []
    first: dict[tuple[int, str], tuple[int, int]] = {}
    for i in members:
        p, pos = int(piece_of[i]), int(rec["pos"][i])
        row = staged[p, pos]
        if (int(rec["h"][i]), row["id"]) not in first:
            first[int(rec["h"][i]), row["id"]] = (p, row["at"])
        elif strict:
            fp, fat = first[int(rec["h"][i]), row["id"]]
            raise CorpusError(f"{_where(pieces[p], row['at'])}: {STRICT_MESSAGES['duplicate_id']} {row['id']!r}, "
                              f"first at {_where(pieces[fp], fat)}; corpus.strict is true (false drops such rows "
                              "and counts them)")
        else:
            out.append((p, pos, row["id"]))
    return out


def _write_part(run_uri: str, n: int, start: int, segments: list[tuple[int, int, int, list[int]]],
                origins: dict[int, tuple[int, int]]) -> dict:
    """Ray task: corpus part n (global rows from ``start``) from staged piece segments
    ``(piece, lo, hi, dropped positions)``, each row with its origin (``origins[piece]``: the input's number and, for
    JSONL, the file's line number of the piece's first line); returns its statistics and content digest."""
    from .layout import RunDir

    run = RunDir(run_uri)
    tables = []
    for p, lo, hi, dropped in segments:
        t = _read_staged(_staged(run, p), lo, hi)
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


def _segments(kept: list[int], drops: dict[int, list[int]], part_rows: int) -> list[tuple[int, list]]:
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


def _map_in_order(task, calls, on_result=None) -> list:
    """``task.remote(*args)`` for each ``args`` in ``calls``, at most two per cluster CPU (as it is now) in flight; the results
    in order, so the first failing call in input order is the one raised (``on_result`` sees them as they come). On a failure nothing more is
    submitted and the calls in flight are waited for, so that none still writes when the caller cleans up.
    They are not cancelled: ``ray.cancel`` racing a task's completion aborts the owner process in Ray 2.x
    ("Tried to complete task that was not pending", ray-project/ray#54846)."""
    import ray

    results, flight = [], collections.deque()
    try:
        def take() -> None:
            results.append(ray.get(flight.popleft()))
            if on_result is not None:
                on_result(results)

        for args in calls:
            flight.append(task.remote(*args))
            if len(flight) >= max(2, 2 * int(ray.cluster_resources().get("CPU", 0))):  # nodes may join meanwhile
                take()
        while flight:
            take()
    except BaseException:
        if flight:  # ray.wait refuses num_returns=0, which would hide the error
            ray.wait(list(flight), num_returns=len(flight))
        raise
    return results


def store(run, cfg: CorpusConfig, text: TextConfig, tokenizer: str, part_rows: int = 8192,
          piece_bytes: int = 32 << 20) -> dict:
    """Read, normalise, tokenise and validate the corpus into ``<run>/corpus/``; returns its statistics.

    Pieces of about ``piece_bytes`` are ingested by Ray tasks (spread over the cluster), then
    cut into parts of ``part_rows`` rows with ``idx`` in input order. Nothing is recorded unless
    the whole corpus is valid; a failed attempt leaves no corpus files.
    """
    import ray

    def clear() -> None:
        if exists(run.fs, run.corpus_dir):
            run.fs.delete_dir(run.corpus_dir)

    fmt, files = discover(cfg)
    pieces = plan_pieces(fmt, files, piece_bytes)
    buckets = max(1, min(len(pieces), 32))
    ingest = ray.remote(_ingest).options(num_cpus=1, scheduling_strategy="SPREAD")
    clear()
    try:
        results = _map_in_order(ingest, ((p, cfg, text, tokenizer, run.uri, buckets) for p in pieces),
                                Progress(len(pieces), "pieces", "corpus", lambda rs: f"{sum(r['rows'] for r in rs):,} rows"))
        find = ray.remote(_duplicates).options(num_cpus=1, scheduling_strategy="SPREAD")
        found = sorted(f for fs in _map_in_order(find, ((pieces, run.uri, cfg.strict, b) for b in range(buckets)))
                       for f in fs)
        drops: dict[int, list[int]] = {}
        dropped = Drops()
        for r in results:
            dropped.merge(r["dropped"], r["examples"])
        for p, pos, rid in found:  # the ids came with the positions: nothing is read here
            drops.setdefault(p, []).append(pos)
            dropped.add("duplicate_id", rid)
        inputs, origins = input_origins(pieces, results)
        write = ray.remote(_write_part).options(num_cpus=1, scheduling_strategy="SPREAD")
        parts = _map_in_order(write, ((run.uri, n, start, segs, {p: origins[p] for p, *_ in segs}) for n, (start, segs)
                                      in enumerate(_segments([r["rows"] for r in results], drops, part_rows))))
        if not parts:
            raise CorpusError(f"{cfg.path}: the corpus is empty" + (
                f" (every row was dropped: {_drop_summary(dropped)})" if sum(dropped.counts.values()) else ""))
        run.fs.delete_dir(run.path("corpus", "_staging"))
    except BaseException:
        clear()
        raise
    sources: dict[str, int] = {}
    for part in parts:
        for s, c in part["sources"].items():
            sources[s] = sources.get(s, 0) + c
    nodes: dict[str, int] = {}
    for r in results:
        nodes[r["node"]] = nodes.get(r["node"], 0) + 1
    return {"rows": sum(p["rows"] for p in parts), "pieces": len(pieces), "pieces_by_node": nodes, "inputs": inputs,
            "ingest_seconds": round(sum(r["seconds"] for r in results), 3),
            "tokenize_seconds": round(sum(r["tokenize_seconds"] for r in results), 3),
            "files": [posixpath.basename(run.corpus_part(p["part"])) for p in parts],
            "part_rows": [p["rows"] for p in parts],
            "tokens": sum(p["tokens"] for p in parts), "truncated": sum(p["truncated"] for p in parts),
            "sources": dict(sorted(sources.items())),
            "dropped": dropped.counts, "dropped_ids": {k: v for k, v in dropped.examples.items() if v},
            "fingerprint": hashlib.sha256("".join(p["digest"] for p in parts).encode()).hexdigest()[:32]}


def _drop_summary(d: Drops) -> str:
    return ", ".join(f"{n} {reason.replace('_', ' ')} (ids {d.examples[reason]})"
                     for reason, n in d.counts.items() if n)


def drop_summary(stats: dict) -> str:
    """One line on the rows a corpus stage dropped, or "" when none was."""
    d = Drops()
    d.merge(stats["dropped"], {r: stats["dropped_ids"].get(r, []) for r in DROP_REASONS})
    return _drop_summary(d)
