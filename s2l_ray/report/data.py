"""What ``report.html`` shows, gathered from a run directory: aggregates and samples, never one value per row.

Everything is bounded whatever the corpus size: per cluster its size, the rows each budget took
from it, its source mix, its mean and spread of loss over the trajectory points (from a sample
of at most ``SAMPLE_PER_CLUSTER`` of its rows) and its ``EXAMPLES`` rows nearest the centroid;
per source the corpus and selected counts; the data map (confidence against variability, as
dataset cartography draws it) of the same sample; the proxy's training loss per step and each
trajectory point's mean loss; the run's facts. The sample is drawn with a fixed seed, so a
report rewritten after another selection shows the same rows.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import trajectories
from ..config import ClusterConfig
from ..layout import RunDir, exists

SAMPLE_PER_CLUSTER = 40  # rows per cluster in the trajectories' spread and the data map
SAMPLE_ROWS = 4000  # rows of the data map when the run has no clusters
EXAMPLES = 3  # example rows per cluster: those nearest its centroid
EXCERPT = 160  # characters of a prompt or response shown


def _excerpt(text: str | None) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= EXCERPT else text[:EXCERPT - 1] + "…"


def _per_group_first(groups: np.ndarray, keys: np.ndarray, n: int) -> np.ndarray:
    """Positions of the ``n`` rows of each group with the smallest keys (ties by position), by group."""
    order = np.lexsort((np.arange(len(keys)), keys, groups))
    g = groups[order]
    starts = np.concatenate([[0], np.flatnonzero(g[1:] != g[:-1]) + 1])
    rank = np.arange(len(g)) - np.repeat(starts, np.diff(np.concatenate([starts, [len(g)]])))
    return order[rank < n]


def _sample_part(run: RunDir, plan: trajectories.Plan, j: int, positions: np.ndarray) -> pa.Table:
    """Ray Data task: the loss and confidence trajectories of part j's rows among ``positions``."""
    part = plan.parts[j]
    here = positions[(positions >= part.start) & (positions < part.start + part.rows)]
    if not len(here):
        empty = pa.array([], pa.list_(pa.float32(), len(plan.points)))
        return pa.table({"idx": pa.array([], pa.int64()), "loss": empty, "confidence": empty})
    blocks, _ = trajectories.read_part(run, plan, j, ("loss", "confidence"))
    cols = {c: blocks[c][here - part.start] for c in ("loss", "confidence")}
    return pa.table({"idx": here, **{c: pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
                                     for c, x in cols.items()}})


def _trajectories(run: RunDir, positions: np.ndarray, num_points: int | None) -> dict[str, np.ndarray]:
    """Loss and confidence ``[len(positions), T]`` of the rows at sorted ``positions``."""
    plan = trajectories.plan(run, ClusterConfig(), num_points)
    out = {c: np.empty((len(positions), len(plan.points)), np.float32) for c in ("loss", "confidence")}
    for table in trajectories.map_parts(plan, _sample_part, {"positions": positions}):
        where = np.searchsorted(positions, table.column("idx").to_numpy())
        for c in out:
            col = table.column(c).combine_chunks()
            out[c][where] = col.flatten().to_numpy().reshape(len(col), -1)
    return out


def _rows(run: RunDir, positions: np.ndarray) -> list[dict]:
    """The stored rows at sorted ``positions`` (id, source, prompt and response excerpts)."""
    out = []
    for _, start, rows, path in run.corpus_parts():
        here = positions[(positions >= start) & (positions < start + rows)]
        if len(here):
            table = pq.read_table(path, filesystem=run.fs, columns=["id", "source", "prompt", "response"])
            for r in table.take(pa.array(here - start)).to_pylist():
                out.append({"id": r["id"], "source": r["source"], "prompt": _excerpt(r["prompt"]),
                            "response": _excerpt(r["response"])})
    return out


def _selected(run: RunDir, ids: pa.ChunkedArray, manifest: dict) -> dict[str, np.ndarray]:
    """Per budget, a boolean mask over the corpus rows: which rows that budget's selection took."""
    budgets = list(manifest.get("selection", {}).get("budgets", {}))
    out = {}
    for b in budgets:
        path = run.selection(int(b) if len(budgets) > 1 else None)
        if exists(run.fs, path):
            chosen = pq.read_table(path, filesystem=run.fs, columns=["id"]).column("id")
            out[b] = pc.is_in(ids, value_set=chosen.combine_chunks()).to_numpy(zero_copy_only=False)
    return out


def collect(run: RunDir) -> dict:
    """The report's content, JSON-serialisable (see the module docstring)."""
    m = run.read_manifest()
    clustered = exists(run.fs, run.clusters)
    if clustered:
        table = pq.read_table(run.clusters, filesystem=run.fs, columns=["id", "source", "cluster", "distance"])
    else:
        table = pq.read_table(run.corpus_files(), filesystem=run.fs, columns=["id", "source"])
    ids, sources = table.column("id"), table.column("source").to_numpy(zero_copy_only=False)
    n = len(ids)
    selected = _selected(run, ids, m)
    names = sorted(set(sources.tolist()))
    code = np.searchsorted(names, sources)
    report = {"run": run.uri, "rows": n, "method": m.get("selection", {}).get("method"),
              "budgets": list(selected), "sources": [
                  {"source": s, "corpus": int((code == i).sum()),
                   "selected": {b: int(mask[code == i].sum()) for b, mask in selected.items()}}
                  for i, s in enumerate(names)]}
    rng = np.random.default_rng(0)
    if clustered:
        labels = table.column("cluster").to_numpy()
        dist = table.column("distance").to_numpy()
        sample = np.sort(_per_group_first(labels, rng.random(n), SAMPLE_PER_CLUSTER))
        examples = _per_group_first(labels, dist, EXAMPLES)
    else:
        labels = None
        sample = np.sort(rng.choice(n, min(n, SAMPLE_ROWS), replace=False))
    num_points = m.get("config", {}).get("proxy", {}).get("num_points")
    traj = _trajectories(run, sample, num_points)
    report["data_map"] = {"confidence": traj["confidence"].mean(1).tolist(),
                          "variability": traj["confidence"].std(1).tolist(),
                          "cluster": None if labels is None else labels[sample].tolist(),
                          "source": sources[sample].tolist(), "id": ids.take(pa.array(sample)).to_pylist(),
                          "selected": {b: mask[sample].tolist() for b, mask in selected.items()}}
    done = run.done_points()
    report["points"] = [{"t": t, "step": rec["step"], "mean_loss": rec.get("mean_loss")} for t, rec in sorted(done.items())]
    ckpts = run.proxy_checkpoints()
    report["proxy_loss"] = [[rec["step"] - len(rec["losses"]) + 1 + i, loss] for _, rec in sorted(ckpts.items())
                            if rec.get("losses") for i, loss in enumerate(rec["losses"])]
    if labels is not None:
        report["clusters"] = _clusters(run, ids, labels, code, names, selected, sample, traj["loss"], examples)
        report["cluster_stats"] = {k: m.get("clusters", {}).get(k) for k in ("k", "backend", "per_source",
                                                                              "source_purity", "sample_size")}
    report["facts"] = _facts(run, m)
    return report


def _clusters(run: RunDir, ids: pa.ChunkedArray, labels: np.ndarray, code: np.ndarray, names: list[str],
              selected: dict[str, np.ndarray], sample: np.ndarray, loss: np.ndarray, examples: np.ndarray) -> list[dict]:
    k = int(labels.max()) + 1
    sizes = np.bincount(labels, minlength=k)
    mix = np.zeros((k, len(names)), np.int64)
    np.add.at(mix, (labels, code), 1)
    taken = {b: np.bincount(labels[mask], minlength=k) for b, mask in selected.items()}
    rows = {r["id"]: r for r in _rows(run, np.sort(examples))}
    example_ids = ids.take(pa.array(examples)).to_pylist()
    by_cluster: dict[int, list[dict]] = {}
    for pos, rid in zip(examples, example_ids):
        by_cluster.setdefault(int(labels[pos]), []).append(rows[rid])
    sampled = labels[sample]
    out = []
    for c in range(k):
        member = loss[sampled == c]
        out.append({"cluster": c, "size": int(sizes[c]), "selected": {b: int(t[c]) for b, t in taken.items()},
                    "mix": {names[i]: int(v) for i, v in enumerate(mix[c]) if v},
                    "mean": member.mean(0).tolist() if len(member) else [],
                    "std": member.std(0).tolist() if len(member) else [],
                    "examples": by_cluster.get(c, [])})
    return out


def _facts(run: RunDir, m: dict) -> dict:
    corpus = m.get("corpus", {})
    target = run.target.read_manifest().get("corpus")
    return {"corpus": {k: corpus.get(k) for k in ("rows", "fingerprint", "tokens", "truncated", "dropped",
                                                   "dropped_ids")},
            "target": None if not target else {"rows": target["rows"], "sources": target["sources"]},
            "seconds": {k: v.get("seconds") for k, v in m.get("stages", {}).items()},
            "total_seconds": m.get("total_seconds"), "cost": m.get("cost"),
            "config": json.loads(json.dumps(m.get("config", {}))), "versions": m.get("versions", {})}
