"""The duplicate step: repeated ids across pieces, found per hash bucket."""
from __future__ import annotations

import io

import numpy as np

from ..layout import RunDir
from .drops import STRICT_MESSAGES
from .errors import CorpusError
from .files import Piece
from .readers import location
from .staging import hashes_path, read_positions, staged_uri

def duplicates(pieces: list[Piece], run_uri: str, strict: bool, bucket: int) -> list[tuple[int, int, str]]:
    """Ray task: among one bucket's id hashes from every piece, ``(piece, position, id)`` of each row whose
    id an earlier row already has; equal hashes are confirmed on the staged ids (read once per piece)."""
    run = RunDir(run_uri)
    buckets = []
    for p in range(len(pieces)):
        with run.fs.open_input_stream(hashes_path(run, p, bucket)) as f:
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
        for q, row in zip(pos, read_positions(staged_uri(run, int(p)), pos, ["id", "at"]).to_pylist()):
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
            raise CorpusError(f"{location(pieces[p], row['at'])}: {STRICT_MESSAGES['duplicate_id']} {row['id']!r}, "
                              f"first at {location(pieces[fp], fat)}; corpus.strict is true (false drops such rows "
                              "and counts them)")
        else:
            out.append((p, pos, row["id"]))
    return out
