"""The corpus stage: the steps run over the cluster into ``<run>/corpus/``, nothing recorded unless all are valid."""
from __future__ import annotations

import hashlib
import posixpath

from ..config import CorpusConfig, TextConfig
from ..layout import exists
from ..progress import Progress
from .dedup import duplicates
from .drops import Drops
from .errors import CorpusError
from .executor import map_in_order
from .files import discover, plan_pieces
from .parts import input_origins, plan_parts, write_part
from .staging import ingest

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
    ingest_task = ray.remote(ingest).options(num_cpus=1, scheduling_strategy="SPREAD")
    clear()
    try:
        results = map_in_order(ingest_task, ((p, cfg, text, tokenizer, run.uri, buckets) for p in pieces),
                                Progress(len(pieces), "pieces", "corpus", lambda rs: f"{sum(r['rows'] for r in rs):,} rows"))
        find = ray.remote(duplicates).options(num_cpus=1, scheduling_strategy="SPREAD")
        found = sorted(f for fs in map_in_order(find, ((pieces, run.uri, cfg.strict, b) for b in range(buckets)))
                       for f in fs)
        drops: dict[int, list[int]] = {}
        dropped = Drops()
        for r in results:
            dropped.merge(r["dropped"], r["examples"])
        for p, pos, rid in found:  # the ids came with the positions: nothing is read here
            drops.setdefault(p, []).append(pos)
            dropped.add("duplicate_id", rid)
        inputs, origins = input_origins(pieces, results)
        write = ray.remote(write_part).options(num_cpus=1, scheduling_strategy="SPREAD")
        parts = map_in_order(write, ((run.uri, n, start, segs, {p: origins[p] for p, *_ in segs}) for n, (start, segs)
                                      in enumerate(plan_parts([r["rows"] for r in results], drops, part_rows))))
        if not parts:
            raise CorpusError(f"{cfg.path}: the corpus is empty" + (
                f" (every row was dropped: {dropped.summary()})" if sum(dropped.counts.values()) else ""))
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
