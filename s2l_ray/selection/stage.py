"""The selection stage: runs a method over a selection run's outputs and writes its subsets.

It loads what the method needs (clusters, sources, per-example scores, the target examples'
places among the clusters and their source mix), resolves the source split
(``cluster.source_split``; ``auto``: the method's own), lets the method pick every budget, checks
the method's contract (that many distinct rows, in corpus order), and writes per budget the
selection Parquet and the selected rows as JSONL, in one pass over the corpus.
"""
from __future__ import annotations

import contextlib
import json
import posixpath
import re
import time
from json.encoder import encode_basestring

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import trajectories
from ..clustering import codes_of, corpus_sources, nearest, read_centroids
from ..config import ClusterConfig, SelectConfig
from ..layout import SELECTION_SCHEMA, RunDir, exists, open_output_atomic, write_parquet_atomic
from . import methods
from .allocation import SPLITS, SelectionError, resolve_budgets, source_weights


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


SELECTION_FILES = (r"selection(-\d+)?\.parquet|selected(-\d+)?\.(jsonl|original\.jsonl|original\.json|original\.parquet"
                   r"|trl\.parquet)"
                   r"|axolotl(-\d+)?\.yaml|dataset_info\.json")


def remove_stale(dest: RunDir, keep: list[str]) -> list[str]:
    """Delete the selection files in ``dest`` (``SELECTION_FILES``) not in ``keep`` (an earlier selection's other
    budgets, which fine-tuning or the user's trainer must never pick up); returns them."""
    from pyarrow.fs import FileSelector, FileType

    stale = [i.path for i in dest.fs.get_file_info(FileSelector(dest.root)) if i.type == FileType.File
             and re.fullmatch(SELECTION_FILES, posixpath.basename(i.path)) and i.path not in keep]
    for path in stale:
        dest.fs.delete_file(path)
    return stale


def write_selections(run: RunDir, picks: dict[int, np.ndarray], labels: np.ndarray | None, method: str,
                     several: bool, dest: RunDir) -> list[str]:
    """One pass over ``run``'s corpus: per budget, the selection Parquet (with each row's input file and line or
    row) and the selected rows as JSONL in ``dest``, then the user's own rows and the trainers' hand-offs
    (``export.write_exports``); returns what could not be written, as lines for the log.

    ``labels`` (cluster per row) is None for methods that use no clusters: the column is then null.
    """
    from ..export import has_chat, trl_writer, write_exports

    columns = ["id", "source", "prompt", "response", "messages"]
    origin_columns = ["origin", "origin_row", "origin_offset"]
    with_origin = bool(picks) and "origin" in pq.read_schema(run.corpus_files()[0], filesystem=run.fs).names
    inputs = [i["uri"] for i in run.read_manifest()["corpus"].get("inputs", [])]
    chat = has_chat(run)
    parts: dict[int, list[pa.Table]] = {b: [] for b in picks}
    origins: dict[int, list[pa.Table]] = {b: [] for b in picks}
    with contextlib.ExitStack() as stack:
        out = {b: stack.enter_context(open_output_atomic(dest.fs, dest.selected_jsonl(b if several else None)))
               for b in picks}
        trl = {b: stack.enter_context(trl_writer(dest, b if several else None, chat)) for b in picks}
        for _, start, rows, path in run.corpus_parts():
            end = start + rows
            local = {b: p[np.searchsorted(p, start):np.searchsorted(p, end)] for b, p in picks.items()}
            if any(len(v) for v in local.values()):
                table = pq.read_table(path, filesystem=run.fs, columns=columns + (origin_columns if with_origin else []))
                for b, pos in local.items():
                    rows = table.take(pa.array(pos - start))
                    out[b].write(jsonl(rows))
                    trl[b](rows)
                    origin = rows.select(origin_columns) if with_origin else None
                    if origin is not None:
                        origins[b].append(origin)
                    parts[b].append(pa.table({
                        "id": rows.column("id"), "source": rows.column("source"),
                        "cluster": pa.nulls(len(pos), pa.int32()) if labels is None else labels[pos],
                        "method": pa.repeat(pa.scalar(method, pa.string()), len(pos)),
                        "budget": pa.array(np.full(len(pos), b, np.int64)),
                        "file": pa.nulls(len(pos), pa.string()) if origin is None else
                        [inputs[o] for o in origin.column("origin").to_numpy()],
                        "row": pa.nulls(len(pos), pa.int64()) if origin is None else origin.column("origin_row")},
                        schema=SELECTION_SCHEMA))
    for b, tables in parts.items():
        write_parquet_atomic(dest.fs, dest.selection(b if several else None), pa.concat_tables(tables))
    written, notes = write_exports(run, dest, {b: pa.concat_tables(t) for b, t in origins.items()} if with_origin
                                   else None, several)
    remove_stale(dest, written + [p for b in picks for p in (dest.selection(b if several else None),
                                                            dest.selected_jsonl(b if several else None),
                                                            dest.selected_as(b if several else None, "trl.parquet"))])
    return notes


def _target(run: RunDir, select_cfg: SelectConfig, method: methods.Method) -> RunDir | None:
    """The stored target examples, when the method or the split needs them (checked complete)."""
    if not select_cfg.target:
        if method.target:
            raise SelectionError(f"method {method.name!r} needs target examples: give --target (select.target)")
        return None
    target = run.target
    if not target.read_manifest().get("corpus"):
        raise SelectionError(f"{target.uri} holds no stored target examples: run the selection with --target")
    return target


def target_sources(target: RunDir, names: list[str]) -> np.ndarray:
    """Each target example's source as a code among the corpus's sources ``names``; -1 for any other source."""
    col = pq.read_table(target.corpus_files(), columns=["source"], filesystem=target.fs).column("source")
    index = {s: i for i, s in enumerate(names)}
    return np.array([index.get(s, -1) for s in col.to_pylist()], np.int64)


def place_target(target: RunDir, cluster_cfg: ClusterConfig, num_points: int | None, clusters: RunDir,
                 names: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """Each target example's nearest cluster (by its trajectory over the kept points; within its own source's
    clusters when the clusters are per source and its source is among them), that cluster's source code, and K."""
    plan = trajectories.plan(target, cluster_cfg, num_points)
    x = trajectories.read_all(target, plan)
    cents, owners = read_centroids(clusters)
    if cents.shape[1] != x.shape[1]:
        raise SelectionError(f"{clusters.centroids} has {cents.shape[1]} trajectory points, the target examples "
                             f"{x.shape[1]}: cluster again with the same cluster.keep_every")
    own = [names[c] if c >= 0 else None for c in target_sources(target, names)]
    labels = nearest(x, cents, owners, own)
    index = {s: i for i, s in enumerate(names)}
    return labels, np.array([index.get(owners[c], -1) for c in labels], np.int64), len(owners)


def _scores(run: RunDir, target: RunDir | None, method: methods.Method, select_cfg: SelectConfig,
            cluster_cfg: ClusterConfig, num_points: int | None) -> dict[str, np.ndarray]:
    where = methods.SCORES[method.score]
    if where == "trajectories":
        plan = trajectories.plan(run, cluster_cfg, num_points)
        return trajectories.features(plan, [method.score])[0]
    if where == "corpus":
        col = pq.read_table(run.corpus_files(), columns=["n_response"], filesystem=run.fs).column("n_response")
        return {method.score: col.to_numpy().astype(np.float32)}
    from ..embeddings import similarity

    return {method.score: similarity(run, target, select_cfg.embedding_rank)}


def method_inputs(run: RunDir, method: methods.Method, cluster_cfg: ClusterConfig, select_cfg: SelectConfig,
                  num_points: int | None, clusters: RunDir | None = None) -> tuple[methods.Inputs, np.ndarray,
                                                                                  list[str], dict]:
    """What ``method`` needs, every row's source code and the source names (for the statistics), and what
    the target examples and the split contributed (for the manifest)."""
    if cluster_cfg.source_split not in ("auto", *SPLITS):
        raise SelectionError(f"cluster.source_split must be auto or one of {list(SPLITS)}, not "
                             f"{cluster_cfg.source_split!r}")
    target = _target(run, select_cfg, method)
    if method.clusters:
        labels, codes, names = read_clusters(run, clusters)
        inputs = methods.Inputs(len(labels), labels, int(labels.max()) + 1)
    else:
        codes, names = corpus_sources(run)
        inputs = methods.Inputs(len(codes))
    inputs.smoothing = select_cfg.target_smoothing
    info: dict = {}
    mix = None  # the target examples' source codes, as the split counts them
    if target is not None and method.target and method.clusters:
        inputs.target_clusters, mix, inputs.n_clusters = place_target(target, cluster_cfg, num_points,
                                                                      clusters or run, names)
        info["target_clusters_reached"] = int(len(np.unique(inputs.target_clusters)))
    split = method.split if cluster_cfg.source_split == "auto" else cluster_cfg.source_split
    if method.sources or (method.clusters and cluster_cfg.per_source):
        inputs.sources = codes
        counts = None
        if split == "target":
            if target is None:
                raise SelectionError(f"source split 'target' (method {method.name!r}) needs target examples: give "
                                     "--target (select.target)")
            mix = target_sources(target, names) if mix is None else mix
            counts = np.bincount(mix[mix >= 0], minlength=len(names))
            info["target_sources"] = dict(zip(names, counts.tolist()))
            info["target_rows_outside_sources"] = int((mix < 0).sum())
        inputs.split_weights = source_weights(split, np.bincount(codes, minlength=len(names)), counts,
                                              select_cfg.target_smoothing)
        info["source_split"] = split
    if target is not None and method.target:
        info["target_rows"] = target.read_manifest()["corpus"]["rows"]
    if method.score:
        inputs.scores = _scores(run, target, method, select_cfg, cluster_cfg, num_points)
    return inputs, codes, names, info


def select_run(run: RunDir, select_cfg: SelectConfig, cluster_cfg: ClusterConfig, seed: int, *,
               num_points: int | None = None, dest: RunDir | None = None, clusters: RunDir | None = None) -> dict:
    """Select every budget of ``select_cfg`` with its method; returns statistics for the manifest.

    One budget writes ``selection.parquet`` and ``selected.jsonl``; several write
    ``selection-<B>.parquet`` and ``selected-<B>.jsonl``, into ``dest`` (default: ``run``); the
    clusters come from ``clusters`` (default: ``run``, where the selection run put them). The
    ``full`` method writes one selection of every row. Each budget's draw uses its own generator
    seeded with ``seed``, so it does not depend on the other budgets asked for. ``num_points``
    is the proxy's T, for methods that read trajectories.
    """
    try:
        method = methods.get(select_cfg.method)
    except ValueError as e:
        raise SelectionError(f"select.method: {e}") from None
    if not select_cfg.budgets:
        raise SelectionError("select.budgets is empty")
    start = time.time()
    inputs, codes, names, info = method_inputs(run, method, cluster_cfg, select_cfg, num_points, clusters)
    n = inputs.n
    budgets = [n] if method.full else resolve_budgets(select_cfg.budgets, n)
    picks = {b: method.pick(inputs, b, np.random.default_rng(seed)) for b in budgets}
    for b, p in picks.items():  # a method's contract, checked: b distinct rows, in corpus order
        if len(p) != b or (len(p) and (p[0] < 0 or p[-1] >= n)) or (np.diff(p) <= 0).any():
            raise SelectionError(f"method {method.name!r} returned {len(p)} positions for budget {b}, "
                                 "not that many distinct sorted rows of the corpus")
    selected = time.time()
    notes = write_selections(run, picks, inputs.labels, method.name, several=len(budgets) > 1, dest=dest or run)
    labels = inputs.labels
    return {"method": method.name, "rows": n, "per_source": inputs.sources is not None, **info,
            "budgets": {str(b): {"selected": len(p),
                                 "clusters": None if labels is None else len(np.unique(labels[p])),
                                 "sources": dict(zip(names, np.bincount(codes[p], minlength=len(names)).tolist()))}
                        for b, p in picks.items()},
            "timings": {"select": round(selected - start, 3), "write": round(time.time() - selected, 3)},
            **({"notes": notes} if notes else {})}
