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

The steps, one module each: ``files`` (finding the input, cutting it into pieces), ``readers`` (one piece's raw
records), ``schema`` (normalising a record), ``staging`` (the ingest task: tokenise and stage a piece), ``dedup``
(repeated ids across pieces), ``parts`` (cutting staged rows into parts with their origin), ``executor`` (the
ordered task window) and ``store`` (the stage that runs them); ``drops`` and ``errors`` are shared.
"""
from .drops import drop_summary
from .errors import CorpusError, RowError
from .files import Piece, discover, input_fingerprint, plan_pieces
from .readers import json_lines, read_json_array, records
from .schema import ROLES, check_records, columns_of, normalise, normalised, row_id, sample_texts
from .staging import tokenize
from .store import store

__all__ = ["ROLES", "CorpusError", "Piece", "RowError", "check_records", "columns_of", "discover", "drop_summary",
           "input_fingerprint", "json_lines", "normalise", "normalised", "plan_pieces", "read_json_array", "records",
           "row_id", "sample_texts", "store", "tokenize"]
