"""Representations for ``embedding-target``: one scoring pass of the final proxy checkpoint, and target similarity.

The pass (``embed``) writes every stored row's mean-pooled last hidden state
(``scoring.example_embeddings``) to ``embeddings/part-<n>.parquet``, for the corpus and the target
examples in one actor pool (``scoring.score_parts``). ``similarity`` then gives every corpus row
the cosine similarity of its embedding to the target examples', in Ray Data tasks over the
corpus's embedding files: ``nearest`` takes the highest over the target examples (RDS+'s "max"
aggregation), ``mean`` the similarity to the target examples' mean embedding.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import ScoringConfig
from .layout import RunDir, exists

RANKS = ("nearest", "mean")


class EmbeddingError(ValueError):
    """Embeddings are missing or do not match."""


def embed(runs: list[RunDir], checkpoint, cfg: ScoringConfig, use_gpu: bool, precision: str) -> dict[str, dict]:
    """Embed every stored row of ``runs`` with ``checkpoint``; per run URI, the files, rows and compute seconds."""
    from .scoring import score_parts

    return score_parts(runs, "embedding", checkpoint, cfg, use_gpu, precision)


def _files(run: RunDir) -> list[str]:
    files = [run.embedding_part(p[0]) for p in run.corpus_parts()]
    missing = [f for f in files if not exists(run.fs, f)]
    if missing:
        raise EmbeddingError(f"{missing[0]} is missing: the embeddings of {run.uri} were not computed")
    return files


def _matrix(col: pa.ChunkedArray) -> np.ndarray:
    arr = col.combine_chunks()
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), -1).astype(np.float32)


def read(run: RunDir) -> np.ndarray:
    """A small run's embeddings ``[N, hidden]`` in idx order, read here (the target examples)."""
    return _matrix(pq.read_table(_files(run), columns=["embedding"], filesystem=run.fs).column("embedding"))


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def scores(x: np.ndarray, reference: np.ndarray, rank: str) -> np.ndarray:
    """Cosine similarity of each row of ``x`` to the target embeddings ``reference``: the highest over them
    (``nearest``) or to their mean (``mean``)."""
    if rank not in RANKS:
        raise EmbeddingError(f"select.embedding_rank must be one of {list(RANKS)}, not {rank!r}")
    if rank == "mean":
        return (unit(x) @ unit(reference.mean(0, keepdims=True))[0]).astype(np.float32)
    return (unit(x) @ unit(reference).T).max(1).astype(np.float32)


def _score_batch(batch: pa.Table, reference: np.ndarray, rank: str) -> pa.Table:
    return pa.table({"idx": batch.column("idx"), "score": scores(_matrix(batch.column("embedding")), reference, rank)})


def similarity(run: RunDir, target: RunDir, rank: str) -> np.ndarray:
    """Every corpus row's similarity to the target examples (float32, idx order), computed in Ray Data tasks."""
    import ray.data

    reference = read(target)
    n = run.read_manifest()["corpus"]["rows"]
    ds = ray.data.read_parquet(_files(run), filesystem=run.fs).select_columns(["idx", "embedding"])
    out = np.full(n, np.nan, np.float32)
    for batch in ds.map_batches(_score_batch, fn_kwargs={"reference": reference, "rank": rank},
                                batch_format="pyarrow").iter_batches(batch_size=None, batch_format="pyarrow"):
        out[batch.column("idx").to_numpy()] = batch.column("score").to_numpy()
    if np.isnan(out).any():
        raise EmbeddingError(f"the embeddings of {run.uri} cover {int((~np.isnan(out)).sum())} of its {n} rows")
    return out
