"""Finding the input: its format and files, a cheap fingerprint of them, and how they are cut into pieces.

A piece is one unit of parallel reading: a byte range of a JSONL file aligned to line starts, a group of a
Parquet file's row groups, an Arrow shard of a ``datasets`` directory, or a whole gzip or JSON-array file.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..config import CorpusConfig
from ..layout import exists, read_json, resolve
from .errors import CorpusError

JSONL_EXT = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_EXT = (".parquet",)


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
