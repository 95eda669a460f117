"""The subset in the user's own schema, and what their trainers read.

Beside the normalised ``selected.jsonl`` (which ``jobs/finetune.py`` reads), a selection writes per budget (the
names in ``layout.RunDir.selected_as``):

- ``selected.original.jsonl`` for JSONL input (each selected line byte for byte) or ``selected.original.parquet``
  for Parquet input (the rows with the input's schema) and for a ``datasets`` directory (its Arrow rows with their
  features), in corpus order, so that every column the user had (system prompts, tools, metadata) is kept; where
  each row came from is in the selection Parquet (``file``, ``row``);
- ``selected.trl.parquet``: TRL's ``SFTTrainer`` formats, ``prompt``/``completion`` or, for chat rows,
  ``messages``;
- ``axolotl.yaml``: an axolotl ``datasets:`` entry for the original rows;

and one ``dataset_info.json`` with a LLaMA-Factory entry per budget (``alpaca`` or ``sharegpt`` formatting with the
user's column and tag names). Rows are read back from the input by the origin each stored row keeps from ingest
(input file, line or row, a JSONL line's byte offset): only the selected rows' blocks are read.
"""
from __future__ import annotations

import contextlib
import json
import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from .config import CorpusConfig, TextConfig
from .corpus import ROLES, Piece, columns_of, json_lines, read_json_array
from .layout import RunDir, open_output_atomic, resolve, write_bytes_atomic, write_json_atomic, write_parquet_atomic

BLOCK = 1 << 20  # bytes read at a time around selected JSONL lines


def _jsonl_lines(uri: str, offsets: np.ndarray) -> list[bytes]:
    """The lines of an uncompressed JSONL file starting at the sorted byte ``offsets``, each block read once."""
    fs, path = resolve(uri)
    out: list[bytes] = []
    with fs.open_input_file(path) as f:
        size, lo, buf = f.size(), -1, b""
        for off in offsets.tolist():
            if not lo <= off < lo + len(buf):
                lo, buf = off, f.read_at(BLOCK, off)
            end = buf.find(b"\n", off - lo)
            while end < 0 and lo + len(buf) < size:  # a line longer than what is held: read on
                buf += f.read_at(BLOCK, lo + len(buf))
                end = buf.find(b"\n", off - lo)
            out.append(buf[off - lo:end if end >= 0 else len(buf)])
    return out


def _gzip_lines(uri: str, offsets: np.ndarray) -> list[bytes]:
    """The lines of a gzipped JSONL file at the sorted (decompressed) byte ``offsets``: one streamed pass, read as
    the ingest read it."""
    wanted, out = set(offsets.tolist()), {}
    for chunk in json_lines(Piece(number=0, uri=uri, fmt="jsonl")):
        out.update((pos, raw) for _, pos, raw in chunk if pos in wanted)
    return [out[o] for o in offsets.tolist()]


def _lines(spec: dict, offsets: np.ndarray) -> list[bytes]:
    """The lines at ``offsets`` of the JSON-lines input ``spec`` (``{uri, format}``), gzipped or not."""
    return (_gzip_lines if spec["format"] == "jsonl.gz" else _jsonl_lines)(spec["uri"], offsets)


def _table_rows(uri: str, fmt: str, rows: np.ndarray) -> pa.Table:
    """Rows (sorted file row numbers) of a Parquet file (only the row groups holding them) or an Arrow shard."""
    fs, path = resolve(uri)
    if fmt == "parquet":
        pf = pq.ParquetFile(fs.open_input_file(path))
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        group = np.searchsorted(bounds, rows, side="right") - 1
        groups = np.unique(group)
        first = np.concatenate([[0], np.cumsum([sizes[g] for g in groups])])  # each group's first row once read
        table = pf.read_row_groups(groups.tolist())
        return table.take(pa.array(first[np.searchsorted(groups, group)] + rows - bounds[group]))
    with fs.open_input_stream(path) as f:
        return pa.ipc.open_stream(f).read_all().take(pa.array(rows))


def write_original(inputs: list[dict], origin: pa.Table, dest: RunDir, budget: int | None) -> tuple[str, dict]:
    """The rows at ``origin`` as in the input, into ``selected.original.jsonl`` (file by file, streamed) or
    ``selected.original.parquet``; returns the path and the first row (for the trainers' mappings). Corpus order is
    input order (files in turn, rows in file order), so each file is read once, in order."""
    which = origin.column("origin").to_numpy()
    files = np.unique(which).tolist()
    if any(inputs[i]["format"] == "json" for i in files):  # a JSON array in: the same records as a JSON array out
        return _write_json_array(inputs, origin, dest, budget)
    if inputs[0]["format"].startswith("jsonl"):
        offset = origin.column("origin_offset").to_numpy()
        path = dest.selected_as(budget, "original.jsonl")
        first = None
        with open_output_atomic(dest.fs, path) as out:
            for i in files:
                lines = _lines(inputs[i], offset[which == i])
                first = first or json.loads(lines[0])
                out.write(b"".join(line + b"\n" for line in lines))
        return path, first
    row = origin.column("origin_row").to_numpy()
    tables = [_table_rows(inputs[i]["uri"], inputs[i]["format"], row[which == i]) for i in files]
    table = pa.concat_tables(tables, promote_options="default")  # files of one corpus may differ in columns
    path = dest.selected_as(budget, "original.parquet")
    write_parquet_atomic(dest.fs, path, table)
    return path, table.slice(0, 1).to_pylist()[0]


def _write_json_array(inputs: list[dict], origin: pa.Table, dest: RunDir, budget: int | None) -> tuple[str, dict]:
    """``selected.original.json``: the selected records (every field, the same values) as one JSON array, one record
    a line; from JSON arrays (and any JSON-lines files beside them)."""
    which = origin.column("origin").to_numpy()
    row, offset = origin.column("origin_row").to_numpy(), origin.column("origin_offset").to_numpy()
    records: list = []
    for i in np.unique(which).tolist():
        if inputs[i]["format"] == "json":
            data = read_json_array(inputs[i]["uri"])
            records += [data[r] for r in row[which == i].tolist()]
        else:
            records += [json.loads(line) for line in _lines(inputs[i], offset[which == i])]
    path = dest.selected_as(budget, "original.json")
    write_bytes_atomic(dest.fs, path, ("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)
                                       + "\n]\n").encode())
    return path, records[0]


TRL_PAIRS = pa.schema([("prompt", pa.string()), ("completion", pa.string())])
TRL_CHAT = pa.schema([("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))])


def has_chat(run: RunDir) -> bool:
    """Whether any stored row is a chat row, from the parts' column statistics (no row is read)."""
    for path in run.corpus_files():
        meta = pq.ParquetFile(path, filesystem=run.fs).metadata
        col = meta.schema.to_arrow_schema().get_field_index("messages")
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(col).statistics
            if stats is None or stats.null_count < meta.row_group(g).num_rows:
                return True
    return False


@contextlib.contextmanager
def trl_writer(dest: RunDir, budget: int | None, chat: bool):
    """A writer of ``selected.trl.parquet``, fed the selected stored rows part by part: TRL's ``SFTTrainer`` formats,
    ``prompt``/``completion``, or ``messages`` (``{role, content}`` turns) when the corpus has chat rows (a
    prompt/response row then becomes a user and an assistant turn)."""
    path = dest.selected_as(budget, "trl.parquet")
    with open_output_atomic(dest.fs, path) as sink, pq.ParquetWriter(sink, TRL_CHAT if chat else TRL_PAIRS) as w:
        yield lambda rows: w.write_table(trl_table(rows, chat))


def trl_table(rows: pa.Table, chat: bool) -> pa.Table:
    """Stored rows in one of TRL's formats (``trl_writer``)."""
    prompts, responses, chats = (rows.column(c).to_pylist() for c in ("prompt", "response", "messages"))
    if not chat:
        return pa.table({"prompt": prompts, "completion": responses}, schema=TRL_PAIRS)
    return pa.table({"messages": [json.loads(c) if c else [{"role": "user", "content": p},
                                                          {"role": "assistant", "content": r}]
                                  for p, r, c in zip(prompts, responses, chats)]}, schema=TRL_CHAT)


def mapping(first: dict, cfg: CorpusConfig, template: str) -> dict:
    """How the user's rows map to prompt and response, from one original row: ``{"kind": "pair", "prompt",
    "response", "query"?, "system"?, "template"}`` or ``{"kind": "chat", "messages", "role", "content",
    "roles": {user|assistant|system|tool: the user's own name}}``."""
    cols = columns_of(first, cfg)
    if "messages" in cols:
        turns = first[cols["messages"]]
        keys = ("from", "value") if turns and "from" in turns[0] else ("role", "content")
        roles: dict[str, str] = {}
        for t in turns:
            roles.setdefault(ROLES.get(str(t.get(keys[0])).lower(), ""), t.get(keys[0]))
        defaults = {"user": "human", "assistant": "gpt", "system": "system", "tool": "observation"} \
            if keys[0] == "from" else {"user": "user", "assistant": "assistant", "system": "system", "tool": "tool"}
        return {"kind": "chat", "messages": cols["messages"], "role": keys[0], "content": keys[1],
                "roles": {r: roles.get(r, defaults[r]) for r in defaults}}
    out = {"kind": "pair", **cols, "template": template}
    if isinstance(first.get("system"), str):
        out["system"] = "system"
    return out


def llamafactory_entry(m: dict, file_name: str) -> dict:
    """A LLaMA-Factory ``dataset_info.json`` entry (its ``data/README.md``) for the original rows."""
    where = {"cloud_file_name": file_name} if "://" in file_name else {"file_name": posixpath.basename(file_name)}
    if m["kind"] == "chat":
        r = m["roles"]
        return {**where, "formatting": "sharegpt", "columns": {"messages": m["messages"]},
                "tags": {"role_tag": m["role"], "content_tag": m["content"], "user_tag": r["user"],
                         "assistant_tag": r["assistant"], "system_tag": r["system"], "observation_tag": r["tool"]}}
    cols = {"prompt": m["prompt"], "response": m["response"]} | ({"query": m["query"]} if "query" in m else {}) \
        | ({"system": m["system"]} if "system" in m else {})
    return {**where, "formatting": "alpaca", "columns": cols}


def axolotl_entry(m: dict, path: str, fmt: str) -> dict:
    """An axolotl ``datasets:`` entry (its dataset-format docs) for the original rows: ``chat_template`` with the
    user's message fields and roles, or a custom instruction format with the run's text template."""
    entry: dict[str, Any] = {"path": path, "ds_type": "json" if fmt == "jsonl" else "parquet", "split": "train"}
    if m["kind"] == "chat":
        r = m["roles"]
        return entry | {"type": "chat_template", "field_messages": m["messages"],
                        "message_property_mappings": {"role": m["role"], "content": m["content"]},
                        "roles": {k: [v] for k, v in r.items() if k in ("user", "assistant", "system")},
                        "roles_to_train": ["assistant"]}
    prompt = m["template"].replace("{prompt}", "{instruction}")
    fields = {"field_instruction": m["prompt"], "field_output": m["response"],
              "format": prompt.replace("{instruction}", "{instruction}\n{input}") if "query" in m else prompt,
              "no_input_format": prompt}
    if "query" in m:
        fields["field_input"] = m["query"]
    return entry | {"type": fields}


def write_exports(run: RunDir, dest: RunDir, origins: dict[int, pa.Table] | None, several: bool) -> tuple[list[str], list[str]]:
    """Per budget (``origins``: the selected rows' origin columns, None for a corpus stored without them), the
    original rows and the axolotl entry, and the LLaMA-Factory ``dataset_info.json``, in ``dest``; returns the
    paths written and notes on what was not."""
    manifest = run.read_manifest()
    config = manifest.get("config", {})  # the run's corpus mapping and text template (defaults where none)
    cfg = CorpusConfig(**{k: v for k, v in config.get("corpus", {}).items() if k in CorpusConfig.__annotations__})
    template = config.get("text", {}).get("template", TextConfig().template)
    inputs = manifest.get("corpus", {}).get("inputs")
    if origins is None or not inputs:
        return [], ["this run's corpus was stored before each row kept its origin: no selected.original.* or "
                    "trainer entries (a new --output stores it with them)"]
    written, info = [], {}
    for b, origin in origins.items():
        budget = b if several else None
        if not origin.num_rows:
            continue
        path, first = write_original(inputs, origin, dest, budget)
        m = mapping(first, cfg, template)
        uri = dest.uri_of(posixpath.basename(path))
        info["s2l_selected" if budget is None else f"s2l_{b}"] = llamafactory_entry(m, uri)
        axolotl = dest.axolotl_yaml(budget)
        fmt = "parquet" if path.endswith(".parquet") else "jsonl"  # axolotl's json reads lines and arrays alike
        write_bytes_atomic(dest.fs, axolotl, yaml.safe_dump({"datasets": [axolotl_entry(m, uri, fmt)]},
                                                          sort_keys=False).encode())
        written += [path, axolotl]
    if info:
        write_json_atomic(dest.fs, dest.dataset_info, info)
        written.append(dest.dataset_info)
    return written, []
