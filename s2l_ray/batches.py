"""Training order: every epoch a fresh seeded permutation of the whole stored corpus, split over workers.

The stored corpus's token ids and label spans are loaded once into the Ray object store, one
object per corpus part (numpy arrays: the workers of a node share one copy, zero-copy). Epoch e
visits the rows in ``default_rng([seed, e]).permutation(N)``; worker r of W takes the r-th
contiguous block of ``N // W`` positions (the ``N % W`` rows left over differ every epoch) and
cuts it into consecutive batches. The order depends only on N, the seed, the epoch and W: not
on how the input file was sorted, how the corpus is cut into parts, or when Ray finishes a
task; and a run resumed at step s continues with exactly the batches the uninterrupted run
would have seen after step s.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq


def _load_part(uri: str, path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ray task: one corpus part as (token ids, row offsets, spans, span offsets)."""
    from .layout import resolve

    fs, _ = resolve(uri)
    t = pq.read_table(path, columns=["input_ids", "spans"], filesystem=fs)
    out = []
    for col in ("input_ids", "spans"):
        arr = t.column(col).combine_chunks()
        values = arr.flatten().to_numpy()
        offsets = np.asarray(arr.offsets.to_numpy(), np.int64) - int(arr.offsets[0].as_py())
        out += [np.ascontiguousarray(values), offsets]
    ids = out[0]
    if len(ids) and ids.max() < 65536 and ids.min() >= 0:
        out[0] = ids.astype(np.uint16)  # half the memory for vocabularies under 65,536 tokens
    return tuple(out)


@dataclass(frozen=True)
class Data:
    """The stored corpus in the object store: what training workers get (cheap to ship)."""

    refs: tuple  # ObjectRef per part, in idx order
    rows: tuple[int, ...]  # rows per part

    @property
    def n(self) -> int:
        return sum(self.rows)


def load(uri: str, paths: list[str], rows: list[int]) -> Data:
    """Load the corpus parts at ``paths`` (inside the run directory ``uri``) into the object store."""
    import ray

    task = ray.remote(_load_part).options(num_cpus=0)  # never waits behind the workers that need it
    return Data(tuple(task.remote(uri, p) for p in paths), tuple(rows))


class Rows:
    """A worker's view of ``Data``: the rows' token ids and spans by corpus idx."""

    def __init__(self, data: Data):
        import ray

        self.parts = ray.get(list(data.refs))
        self.starts = np.concatenate([[0], np.cumsum(data.rows)]).astype(np.int64)

    def get(self, idx: np.ndarray) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids and label spans of the rows at corpus positions ``idx``, in that order."""
        which = np.searchsorted(self.starts, idx, side="right") - 1
        ids, spans = [], []
        for p, i in zip(which.tolist(), (idx - self.starts[which]).tolist()):
            tok, toff, sp, soff = self.parts[p]
            ids.append(tok[toff[i]:toff[i + 1]].astype(np.int64).tolist())
            spans.append(sp[soff[i]:soff[i + 1]].tolist())
        return ids, spans


def epoch_positions(n: int, seed: int, epoch: int, rank: int, world: int) -> np.ndarray:
    """Corpus positions worker ``rank`` of ``world`` visits in ``epoch``, in order (``n // world`` of them)."""
    per = n // world
    return np.random.default_rng([seed, epoch]).permutation(n)[rank * per:(rank + 1) * per]


def iterate(rows: Rows, positions: np.ndarray, batch_size: int, start: int = 0, windows: int = 1,
            group_seed: tuple[int, ...] = ()) -> Iterator[tuple[list, list]]:
    """Consecutive batches of ``batch_size`` rows at ``positions`` (the last may be short), from batch
    ``start`` on. With ``windows`` > 1, each run of that many batches is regrouped by length
    (``text.group_by_length``, window w drawn with ``default_rng([*group_seed, w])``): the same
    rows per window, less padding."""
    from .text import group_by_length

    span = batch_size * windows
    for w in range(start // windows, -(-len(positions) // span)):
        idx = positions[w * span:(w + 1) * span]
        ids, spans = rows.get(idx)
        if windows > 1:
            groups = group_by_length([len(x) for x in ids], batch_size, np.random.default_rng([*group_seed, w]))
        else:
            groups = [np.arange(i, min(i + batch_size, len(ids))) for i in range(0, len(ids), batch_size)]
        for b, g in enumerate(groups):
            if w * windows + b >= start:
                yield [ids[j] for j in g], [spans[j] for j in g]
