"""Read an SFT corpus into a normalised Ray Dataset, validate it, and store it in the run directory.

Inputs: JSONL, Parquet, a ``datasets.save_to_disk`` directory, or a folder of shards, on a
local path or any pyarrow filesystem URI. Each file is read by one Ray task that streams it
in chunks, so errors name the file and the line (JSONL) or row (Parquet, datasets) at fault.
Rows get a stable id (the given one, or a hash of their content) and token counts under the
proxy's tokenizer, so truncation is known before any model runs.
"""
from __future__ import annotations

import functools
import hashlib
import json
import posixpath
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .config import CorpusConfig, TextConfig
from .layout import CORPUS_SCHEMA, resolve

JSONL_EXT = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_EXT = (".parquet",)
CHUNK_ROWS = 8192
# The stored corpus: the contract's columns plus the tokenised text under the proxy tokenizer
# (prompt then response, truncated; labels are the ids after the first n_prompt) and a content
# hash (for the corpus fingerprint). READ_SCHEMA is the same before idx is assigned.
STORED_SCHEMA = pa.schema(list(CORPUS_SCHEMA) + [
    pa.field("input_ids", pa.list_(pa.int32())), pa.field("n_prompt", pa.int32()),
    pa.field("n_tokens", pa.int32()), pa.field("n_response", pa.int32()),
    pa.field("truncated", pa.bool_()), pa.field("row_hash", pa.string())])
READ_SCHEMA = STORED_SCHEMA.remove(STORED_SCHEMA.get_field_index("idx"))


class CorpusError(ValueError):
    """The corpus is missing, empty or malformed; the message names the file, row and field."""


def discover(cfg: CorpusConfig) -> tuple[str, list[str]]:
    """The corpus format and its files (as URIs or absolute local paths)."""
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
        if cfg.format in ("auto", "hf") and (fs.get_file_info(posixpath.join(root, "dataset_info.json")).type
                                             == pafs.FileType.File or fs.get_file_info(
                    posixpath.join(root, "dataset_dict.json")).type == pafs.FileType.File):
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


def _jsonl_chunks(uri: str) -> Iterator[list[dict]]:
    fs, path = resolve(uri)
    compression = "gzip" if path.endswith(".gz") else None
    rows: list[dict] = []
    with fs.open_input_stream(path, compression=compression) as f:
        data = f.read()
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorpusError(f"{uri}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{uri}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise CorpusError(f"{uri}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        obj["__line"] = lineno
        rows.append(obj)
        if len(rows) >= CHUNK_ROWS:
            yield rows
            rows = []
    if rows:
        yield rows


def _table_chunks(uri: str, fmt: str) -> Iterator[list[dict]]:
    if fmt == "parquet":
        fs, path = resolve(uri)
        try:
            pf = pq.ParquetFile(fs.open_input_file(path))
        except pa.ArrowInvalid as e:
            raise CorpusError(f"{uri}: not a readable Parquet file ({e})") from None
        batches = pf.iter_batches(batch_size=CHUNK_ROWS)
    else:
        import datasets

        d = datasets.load_from_disk(uri)
        if isinstance(d, datasets.DatasetDict):
            if "train" not in d:
                raise CorpusError(f"{uri}: dataset dict has no 'train' split (splits: {list(d)})")
            d = d["train"]
        batches = d.data.table.to_batches(max_chunksize=CHUNK_ROWS)
    start = 0
    for b in batches:
        rows = b.to_pylist()
        for i, r in enumerate(rows):
            r["__line"] = start + i
        yield rows
        start += len(rows)


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    from .models import load_tokenizer

    return load_tokenizer(path)


def row_id(source: str, prompt: str, response: str) -> str:
    """The id derived from a row's content when the corpus gives none."""
    return hashlib.sha1("\x1f".join((source, prompt, response)).encode()).hexdigest()[:20]


def _normalise(rows: list[dict], uri: str, fmt: str, cfg: CorpusConfig) -> dict[str, list]:
    where = "line" if fmt == "jsonl" else "row"
    out: dict[str, list] = {"id": [], "source": [], "prompt": [], "response": []}
    for r in rows:
        at = f"{uri}:{r['__line']}" if fmt == "jsonl" else f"{uri} {where} {r['__line']}"
        if cfg.messages in r and cfg.prompt not in r:
            prompt, response = _from_messages(r[cfg.messages], at, cfg.messages)
        else:
            for col in (cfg.prompt, cfg.response):
                if col not in r:
                    raise CorpusError(f"{at}: missing field {col!r} (fields: {sorted(k for k in r if k != '__line')}); "
                                      f"set corpus.prompt / corpus.response to map columns")
            prompt, response = r[cfg.prompt], r[cfg.response]
        for name, val in ((cfg.prompt, prompt), (cfg.response, response)):
            if not isinstance(val, str):
                raise CorpusError(f"{at}: field {name!r} must be a string, got {type(val).__name__}")
            if not val.strip():
                raise CorpusError(f"{at}: field {name!r} is empty")
        source = r.get(cfg.source)
        source = cfg.default_source if source is None or source == "" else str(source)
        rid = r.get(cfg.id)
        rid = row_id(source, prompt, response) if rid is None or rid == "" else str(rid)
        out["id"].append(rid)
        out["source"].append(source)
        out["prompt"].append(prompt)
        out["response"].append(response)
    return out


def _from_messages(msgs: Any, at: str, col: str) -> tuple[str, str]:
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise CorpusError(f"{at}: field {col!r} must be a non-empty list of {{role, content}} objects")
    last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
    if last is None or last == 0:
        raise CorpusError(f"{at}: field {col!r} has no assistant turn after a user turn")
    turns = msgs[:last]
    prompt = turns[0].get("content", "") if len(turns) == 1 else "\n".join(
        f"{m.get('role', '')}: {m.get('content', '')}" for m in turns)
    return prompt, msgs[last].get("content", "")


def read_files(batch: dict[str, np.ndarray], fmt: str, corpus: CorpusConfig, text: TextConfig,
               tokenizer: str) -> Iterator[pa.Table]:
    """Ray Data UDF: read each file of a batch and yield normalised, tokenised chunks."""
    from .text import tokenize_batch

    tok = _tokenizer(tokenizer)
    for uri in batch["file"]:
        chunks = _jsonl_chunks(uri) if fmt == "jsonl" else _table_chunks(uri, fmt)
        for rows in chunks:
            cols = _normalise(rows, uri, fmt, corpus)
            enc = tokenize_batch(tok, cols["prompt"], cols["response"], text.template, text.max_length)
            cols["input_ids"] = enc["input_ids"]
            cols["n_tokens"] = [len(x) for x in enc["input_ids"]]
            cols["n_response"] = enc["n_response"]
            cols["n_prompt"] = [a - b for a, b in zip(cols["n_tokens"], enc["n_response"])]
            cols["truncated"] = enc["truncated"]
            cols["row_hash"] = [hashlib.sha1("\x1f".join(v).encode()).hexdigest()[:20] for v in
                                zip(cols["id"], cols["source"], cols["prompt"], cols["response"])]
            yield pa.Table.from_pydict(cols, schema=READ_SCHEMA)


def read(cfg: CorpusConfig, text: TextConfig, tokenizer: str):
    """The corpus as a Ray Dataset of READ_SCHEMA rows (lazy; errors surface on execution)."""
    import ray.data

    fmt, files = discover(cfg)
    return ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files)).map_batches(
        read_files, fn_args=(fmt, cfg, text, tokenizer), batch_size=1,
        batch_format="numpy", num_cpus=0.5)


def validate(table: pa.Table, source_uri: str) -> dict:
    """Check a stored corpus (id, row_hash, n_response columns suffice); returns its statistics.

    Raises CorpusError on an empty corpus, duplicate ids, or rows left with no response token.
    """
    n = table.num_rows
    if n == 0:
        raise CorpusError(f"{source_uri}: the corpus is empty")
    ids = table.column("id")
    uniq = pc.unique(ids)
    if len(uniq) != n:
        counts = pc.value_counts(ids)
        dup = [c["values"] for c in counts.to_pylist() if c["counts"] > 1][:5]
        raise CorpusError(f"{source_uri}: duplicate ids {dup} ({n - len(uniq)} duplicate rows); ids must be "
                          "unique (identical rows without an id column derive the same id: deduplicate them)")
    empty = pc.filter(ids, pc.equal(table.column("n_response"), 0))
    if len(empty):
        raise CorpusError(f"{source_uri}: {len(empty)} rows have no response tokens left after truncation to "
                          f"text.max_length (ids {empty.to_pylist()[:5]}); raise text.max_length or shorten "
                          "their prompts")
    order = pc.sort_indices(table.column("row_hash"))
    fp = hashlib.sha256("".join(pc.take(table.column("row_hash"), order).to_pylist()).encode()).hexdigest()[:32]
    return {"rows": n, "truncated": int(pc.sum(table.column("truncated")).as_py() or 0),
            "tokens": int(pc.sum(table.column("n_tokens")).as_py()),
            "sources": {s["values"]: s["counts"] for s in pc.value_counts(table.column("source")).to_pylist()},
            "fingerprint": fp}


def input_fingerprint(cfg: CorpusConfig) -> str:
    """A cheap fingerprint of the input files (paths, sizes, modification times) and column mapping."""
    fmt, files = discover(cfg)
    parts = [fmt, json.dumps(cfg.__dict__, sort_keys=True)]
    for f in files:
        fs, path = resolve(f)
        if fmt == "hf":
            infos = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File]
        else:
            infos = [fs.get_file_info(path)]
        parts += [f"{i.path}:{i.size}:{i.mtime_ns}" for i in sorted(infos, key=lambda i: i.path)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def store(run, cfg: CorpusConfig, text: TextConfig, tokenizer: str, part_rows: int = 8192) -> dict:
    """Read, normalise and validate the corpus into ``<run>/corpus/``; returns its statistics.

    Rows are numbered (``idx``) in input order, deterministically, and stored in parts of
    ``part_rows`` rows (the last one shorter): the unit of parallel scoring. Nothing is recorded in the
    manifest unless the whole corpus is valid, and the part files of a failed attempt are removed.
    """
    from .layout import exists, write_parquet_atomic

    def clear() -> None:
        if exists(run.fs, run.corpus_dir):
            run.fs.delete_dir(run.corpus_dir)

    ds = read(cfg, text, tokenizer)
    ds.context.execution_options.preserve_order = True
    clear()
    files: list[str] = []
    pending: list[pa.Table] = []
    n = 0  # rows written

    def write(t: pa.Table) -> None:
        nonlocal n
        t = t.add_column(0, "idx", pa.array(np.arange(n, n + t.num_rows, dtype=np.int64)))
        path = run.corpus_part(len(files))
        write_parquet_atomic(run.fs, path, t.select(STORED_SCHEMA.names).cast(STORED_SCHEMA))
        files.append(posixpath.basename(path))
        n += t.num_rows

    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):  # blocks of any size
            pending.append(batch)
            if sum(b.num_rows for b in pending) >= part_rows:
                t = pa.concat_tables(pending)
                whole = t.num_rows - t.num_rows % part_rows
                for start in range(0, whole, part_rows):
                    write(t.slice(start, part_rows))
                pending = [t.slice(whole)] if whole < t.num_rows else []
        if pending:
            write(pa.concat_tables(pending))
        table = pq.read_table([run.corpus_part(i) for i in range(len(files))], filesystem=run.fs,
                              columns=["id", "source", "row_hash", "n_tokens", "n_response", "truncated"]) \
            if files else pa.table({c: pa.array([], STORED_SCHEMA.field(c).type) for c in
                                    ["id", "source", "row_hash", "n_tokens", "n_response", "truncated"]})
        stats = validate(table, cfg.path)
    except BaseException:
        clear()
        raise
    stats["files"] = files
    return stats
