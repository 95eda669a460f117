"""Algorithm 1 of S2L and source stratification; runs a selection method and writes its rows.

Algorithm 1 (``allocate``): walk the clusters by ascending size (ties by cluster id); cluster k
(0-based, of K) gives ``min(|C_k|, floor((B - selected) / (K - k)))`` examples, drawn uniformly
at random. The budget always fills exactly when B <= N, with no special case for the remainder
that floor leaves: before cluster k, ``left <= rows left`` holds. A cluster taken whole keeps
it; a cluster that gives ``q = floor(left / (K - k)) < |C_k|`` leaves
``left - q <= (K - k - 1)(q + 1)``, and every later cluster has at least ``q + 1`` rows since
they are sorted. The last cluster's share is then ``floor(left / 1) = left <= |C_{K-1}|``, so it
takes exactly what is left: floor remainders roll over to the larger clusters. E.g. sizes
1, 2, 50, 100 and B = 40 give 1, 2, floor(37/2) = 18 and 19.

This follows the paper, not the official code's first pass that skips clusters of size <= 2.
Empty clusters give nothing and change no other share. With per-source stratification the
budget is first split over sources by the same rule (smallest source first, ties by name),
then Algorithm 1 runs within each source's clusters.
"""
from __future__ import annotations

import contextlib
import json
import posixpath
import re
import time
from collections.abc import Sequence
from json.encoder import encode_basestring

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import methods, trajectories
from .clustering import codes_of, corpus_sources
from .config import ClusterConfig, SelectConfig
from .layout import (
    SELECTION_SCHEMA,
    RunDir,
    exists,
    open_output_atomic,
    write_parquet_atomic,
)


class SelectionError(ValueError):
    """A budget or the clusters do not allow a selection."""


# the pure core ------------------------------------------------------------------------------------

def resolve_budget(budget: float, n: int) -> int:
    """A count (>= 1, whole) or a fraction of n (< 1, rounded) as an example count in 1..n."""
    if not budget > 0:
        raise SelectionError(f"budget must be a count >= 1 or a fraction in (0, 1), got {budget}")
    if budget < 1:
        count = round(budget * n)
        if count < 1:
            raise SelectionError(f"budget fraction {budget} of {n} examples selects none")
    elif not float(budget).is_integer():
        raise SelectionError(f"budget {budget} must be a whole count (or a fraction below 1)")
    else:
        count = int(budget)
    if count > n:
        raise SelectionError(f"budget {count} is larger than the corpus ({n} examples)")
    return count


def allocate(sizes: Sequence[int], budget: int) -> np.ndarray:
    """Algorithm 1's share of each group (int64, aligned with ``sizes``); sums to ``budget``."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if not 0 <= budget <= sizes.sum():
        raise SelectionError(f"budget {budget} is outside 0..{int(sizes.sum())} (the examples available)")
    counts = np.zeros_like(sizes)
    left = budget
    for k, c in enumerate(np.argsort(sizes, kind="stable")):
        counts[c] = min(sizes[c], left // (len(sizes) - k))
        left -= counts[c]
    return counts


def sample_clusters(labels: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of ``budget`` rows: Algorithm 1 over the clusters given by ``labels``."""
    sizes = np.bincount(labels)
    counts = allocate(sizes, budget)
    members = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    picks = [rng.choice(members[starts[c]:starts[c + 1]], counts[c], replace=False)
             for c in np.argsort(sizes, kind="stable") if counts[c]]
    return np.sort(np.concatenate(picks)) if picks else np.empty(0, np.int64)


def s2l_select(labels: np.ndarray, budget: int, rng: np.random.Generator,
               sources: np.ndarray | None = None) -> np.ndarray:
    """Sorted positions of the S2L selection; with ``sources`` (codes), stratified by source first."""
    if sources is None:
        return sample_clusters(labels, budget, rng)
    sizes = np.bincount(sources)
    counts = allocate(sizes, budget)
    picks = []
    for s in np.argsort(sizes, kind="stable"):
        if counts[s]:
            rows = np.flatnonzero(sources == s)
            picks.append(rows[sample_clusters(labels[rows], int(counts[s]), rng)])
    return np.sort(np.concatenate(picks)) if picks else np.empty(0, np.int64)


# the run-level stage ------------------------------------------------------------------------------

def read_clusters(run: RunDir, source: RunDir | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Cluster ids and source codes (corpus idx order) from the ``clusters.parquet`` of ``source`` (default
    ``run``), checked against ``run``'s corpus."""
    corpus = run.read_manifest().get("corpus", {})
    source = source or run
    if not exists(source.fs, source.clusters):
        raise SelectionError(f"{source.clusters} is missing: run clustering first")
    pf = pq.ParquetFile(source.clusters, filesystem=source.fs, read_dictionary=["source"])
    table = pf.read(columns=["cluster", "source"])
    recorded = (pf.schema_arrow.metadata or {}).get(b"corpus_fingerprint", b"").decode()
    if recorded and corpus.get("fingerprint") and recorded != corpus["fingerprint"]:
        raise SelectionError(f"{source.clusters} was computed for another corpus (fingerprint {recorded}, "
                             f"manifest {corpus['fingerprint']}); run clustering again")
    if table.num_rows != corpus.get("rows"):
        raise SelectionError(f"{source.clusters} has {table.num_rows} rows, the corpus {corpus.get('rows')}")
    codes, names = codes_of(table.column("source"))
    return table.column("cluster").to_numpy(), codes, names


def jsonl(rows: pa.Table) -> bytes:
    """Selected corpus rows as JSON lines: ``{id, source, prompt, response}``, or ``{id, source, messages}``
    for a chat row (its stored turns as they are), byte-identical to ``json.dumps(row, ensure_ascii=False)``."""
    plain = '{{"id": {}, "source": {}, "prompt": {}, "response": {}}}\n'
    chat = '{{"id": {}, "source": {}, "messages": {}}}\n'
    cols = [rows.column(name).to_pylist() for name in ("id", "source", "prompt", "response", "messages")]
    out = []
    for rid, source, prompt, response, messages in zip(*cols):
        if messages is None:
            out.append(plain.format(*map(encode_basestring, (rid, source, prompt, response))))
        else:
            out.append(chat.format(encode_basestring(rid), encode_basestring(source),
                                   json.dumps(json.loads(messages), ensure_ascii=False)))
    return "".join(out).encode()


def remove_stale(dest: RunDir, keep: list[str]) -> list[str]:
    """Delete the selection files in ``dest`` (``selection*.parquet``, ``selected*.jsonl``) not in ``keep``
    (an earlier selection's other budgets, which fine-tuning must never pick up); returns them."""
    from pyarrow.fs import FileSelector, FileType

    stale = [i.path for i in dest.fs.get_file_info(FileSelector(dest.root)) if i.type == FileType.File
             and re.fullmatch(r"selection(-\d+)?\.parquet|selected(-\d+)?\.jsonl", posixpath.basename(i.path))
             and i.path not in keep]
    for path in stale:
        dest.fs.delete_file(path)
    return stale


def write_selections(run: RunDir, picks: dict[int, np.ndarray], labels: np.ndarray | None, method: str,
                     several: bool, dest: RunDir) -> None:
    """One pass over ``run``'s corpus: per budget, the selection Parquet and the selected rows as JSONL in ``dest``.

    ``labels`` (cluster per row) is None for methods that use no clusters: the column is then null.
    """
    parts: dict[int, list[pa.Table]] = {b: [] for b in picks}
    with contextlib.ExitStack() as stack:
        out = {b: stack.enter_context(open_output_atomic(dest.fs, dest.selected_jsonl(b if several else None)))
               for b in picks}
        for _, start, rows, path in run.corpus_parts():
            end = start + rows
            local = {b: p[np.searchsorted(p, start):np.searchsorted(p, end)] for b, p in picks.items()}
            if any(len(v) for v in local.values()):
                table = pq.read_table(path, filesystem=run.fs, columns=["id", "source", "prompt", "response",
                                                                       "messages"])
                for b, pos in local.items():
                    rows = table.take(pa.array(pos - start))
                    out[b].write(jsonl(rows))
                    parts[b].append(pa.table({
                        "id": rows.column("id"), "source": rows.column("source"),
                        "cluster": pa.nulls(len(pos), pa.int32()) if labels is None else labels[pos],
                        "method": pa.repeat(pa.scalar(method, pa.string()), len(pos)),
                        "budget": pa.array(np.full(len(pos), b, np.int64))}, schema=SELECTION_SCHEMA))
    for b, tables in parts.items():
        write_parquet_atomic(dest.fs, dest.selection(b if several else None), pa.concat_tables(tables))
    remove_stale(dest, [p for b in picks for p in (dest.selection(b if several else None),
                                                    dest.selected_jsonl(b if several else None))])


def method_inputs(run: RunDir, method: methods.Method, cluster_cfg: ClusterConfig,
                  num_points: int | None, clusters: RunDir | None = None) -> tuple[methods.Inputs, np.ndarray, list[str]]:
    """What ``method`` needs, plus every row's source code and the source names (for the statistics)."""
    if method.clusters:
        labels, codes, names = read_clusters(run, clusters)
        inputs = methods.Inputs(len(labels), labels, codes if cluster_cfg.per_source else None)
    else:
        codes, names = corpus_sources(run)
        inputs = methods.Inputs(len(codes), sources=codes if method.sources else None)
    if method.score:
        plan = trajectories.plan(run, cluster_cfg, num_points)
        inputs.scores, _ = trajectories.features(plan, [method.score])
    return inputs, codes, names


def select_run(run: RunDir, select_cfg: SelectConfig, cluster_cfg: ClusterConfig, seed: int, *,
               num_points: int | None = None, dest: RunDir | None = None, clusters: RunDir | None = None) -> dict:
    """Select every budget of ``select_cfg`` with its method; returns statistics for the manifest.

    One budget writes ``selection.parquet`` and ``selected.jsonl``; several write
    ``selection-<B>.parquet`` and ``selected-<B>.jsonl``, into ``dest`` (default: ``run``); the
    clusters come from ``clusters`` (default: ``run``, where the selection run put them). The
    ``full`` method writes one selection of every row. Each budget's draw uses its own generator
    seeded with ``seed``, so it does not depend on the other budgets asked for. ``num_points``
    is the proxy's T, for methods that read trajectory scores.
    """
    try:
        method = methods.get(select_cfg.method)
    except ValueError as e:
        raise SelectionError(f"select.method: {e}") from None
    if not select_cfg.budgets:
        raise SelectionError("select.budgets is empty")
    start = time.time()
    inputs, codes, names = method_inputs(run, method, cluster_cfg, num_points, clusters)
    n = inputs.n
    budgets = [n] if method.full else [resolve_budget(b, n) for b in select_cfg.budgets]
    if len(set(budgets)) != len(budgets):
        raise SelectionError(f"select.budgets {select_cfg.budgets} resolve to repeated counts {budgets}")
    picks = {b: method.pick(inputs, b, np.random.default_rng(seed)) for b in budgets}
    for b, p in picks.items():  # a method's contract, checked: b distinct rows, in corpus order
        if len(p) != b or (len(p) and (p[0] < 0 or p[-1] >= n)) or (np.diff(p) <= 0).any():
            raise SelectionError(f"method {method.name!r} returned {len(p)} positions for budget {b}, "
                                 "not that many distinct sorted rows of the corpus")
    selected = time.time()
    write_selections(run, picks, inputs.labels, method.name, several=len(budgets) > 1, dest=dest or run)
    labels = inputs.labels
    return {"method": method.name, "rows": n, "per_source": inputs.sources is not None,
            "budgets": {str(b): {"selected": len(p),
                                 "clusters": None if labels is None else len(np.unique(labels[p])),
                                 "sources": dict(zip(names, np.bincount(codes[p], minlength=len(names)).tolist()))}
                        for b, p in picks.items()},
            "timings": {"select": round(selected - start, 3), "write": round(time.time() - selected, 3)}}
