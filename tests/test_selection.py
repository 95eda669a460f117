"""selection.stage: the run-level stage on hand-built run directories (clusters, sources, budgets, files)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s2l_ray.selection import allocation as al
from s2l_ray.selection import stage as sp
from s2l_ray import trajectories as tr
from s2l_ray.clustering import cluster_run
from s2l_ray.config import ClusterConfig, SelectConfig
from s2l_ray.layout import CLUSTERS_SCHEMA, SELECTION_SCHEMA, RunDir, write_parquet_atomic


def test_jsonl_matches_json_dumps_per_row():
    turns = [{"role": "user", "content": "é \"q\""}, {"role": "assistant", "content": "a\n😀"}]
    rows = pa.table({"id": ['a"b', "x", "c"], "source": ["s/1", "ü", "chat"],
                     "prompt": ["line\nbreak\t\x01", "{}", "é \"q\""], "response": ["\\", "😀", "a\n😀"],
                     "messages": [None, None, json.dumps(turns)]})
    expected = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        *[{k: r[k] for k in ("id", "source", "prompt", "response")} for r in rows.to_pylist()[:2]],
        {"id": "c", "source": "chat", "messages": turns}])  # a chat row keeps its turns, as chat data is written
    assert sp.jsonl(rows).decode() == expected


# the run-level stage, on a hand-built run directory ---------------------------------------------

N = 600


def make_clustered_run(root, fingerprint: str = "fp") -> RunDir:
    """A corpus of N rows in 2 parts (3 sources) and its clusters.parquet, written directly."""
    run = RunDir(str(root))
    idx = np.arange(N)
    source = np.where(idx % 6 == 0, "small", np.where(idx % 2 == 0, "mid", "big"))
    corpus = pa.table({"idx": idx, "id": [f"id{i}" for i in idx], "source": source,
                       "prompt": [f"question {i}" for i in idx], "response": [f"answer {i}" for i in idx],
                       "messages": pa.nulls(N, pa.string())})
    write_parquet_atomic(run.fs, run.corpus_part(0), corpus.slice(0, 250))
    write_parquet_atomic(run.fs, run.corpus_part(1), corpus.slice(250))
    run.update_manifest(corpus={"files": ["part-00000.parquet", "part-00001.parquet"], "part_rows": [250, N - 250],
                                "rows": N, "fingerprint": "fp"})
    offset = np.select([source == "big", source == "mid"], [0, 4], 7)
    cluster = (offset + idx * 7 % np.select([source == "big", source == "mid"], [4, 3], 2)).astype(np.int32)
    schema = CLUSTERS_SCHEMA.with_metadata({"corpus_fingerprint": fingerprint})
    write_parquet_atomic(run.fs, run.clusters, pa.table({
        "id": corpus.column("id"), "source": corpus.column("source"), "cluster": cluster,
        "distance": np.zeros(N, np.float32)}, schema=schema))
    return run


def read_jsonl(run: RunDir, budget=None) -> list[dict]:
    with run.fs.open_input_stream(run.selected_jsonl(budget)) as f:
        return [json.loads(line) for line in f.read().decode().splitlines()]


def test_select_run_writes_selection_and_rows(tmp_path):
    run = make_clustered_run(tmp_path)
    stats = sp.select_run(run, SelectConfig(budgets=[0.1]), ClusterConfig(), seed=0)
    sel = pq.read_table(run.selection())
    assert sel.schema == SELECTION_SCHEMA and sel.num_rows == 60
    ids = sel.column("id").to_pylist()
    assert len(set(ids)) == 60 and all(i in {f"id{k}" for k in range(N)} for i in ids)
    clusters = pq.read_table(run.clusters).to_pandas().set_index("id")
    assert sel.column("cluster").to_pylist() == clusters.loc[ids, "cluster"].tolist()
    assert sel.column("source").to_pylist() == clusters.loc[ids, "source"].tolist()
    assert set(sel.column("method").to_pylist()) == {"s2l"} and set(sel.column("budget").to_pylist()) == {60}
    rows = read_jsonl(run)
    assert [r["id"] for r in rows] == ids
    assert all(r["prompt"] == f"question {r['id'][2:]}" and r["response"] == f"answer {r['id'][2:]}" for r in rows)
    assert set(rows[0]) == {"id", "source", "prompt", "response"}
    assert stats["budgets"]["60"]["selected"] == 60 and stats["rows"] == N
    counts = np.bincount(sel.column("cluster").to_numpy(), minlength=9)
    sizes = np.bincount(clusters["cluster"].to_numpy(), minlength=9)
    assert counts.tolist() == al.allocate(sizes, 60).tolist()


def test_select_run_is_deterministic_by_seed(tmp_path):
    run = make_clustered_run(tmp_path)

    def ids(seed: int) -> list[str]:
        sp.select_run(run, SelectConfig(budgets=[100]), ClusterConfig(), seed=seed)
        return pq.read_table(run.selection()).column("id").to_pylist()

    assert ids(3) == ids(3)
    assert ids(3) != ids(4)


def test_select_run_per_source_and_several_budgets(tmp_path):
    run = make_clustered_run(tmp_path)
    stats = sp.select_run(run, SelectConfig(budgets=[0.5, 30]), ClusterConfig(per_source=True), seed=1)
    # sources: small 100 rows, mid 200, big 300; budget 300: min(100, 100), min(200, 100), 100
    assert stats["budgets"]["300"]["sources"] == {"big": 100, "mid": 100, "small": 100}
    assert stats["budgets"]["30"]["sources"] == {"big": 10, "mid": 10, "small": 10}
    for b in (300, 30):
        sel = pq.read_table(run.selection(b))
        assert sel.num_rows == b and set(sel.column("budget").to_pylist()) == {b}
        assert len(read_jsonl(run, b)) == b
    assert not run.fs.get_file_info(run.selection()).is_file


def test_select_run_refuses_stale_clusters_and_bad_settings(tmp_path):
    run = make_clustered_run(tmp_path, fingerprint="another")
    with pytest.raises(al.SelectionError, match="computed for another corpus"):
        sp.select_run(run, SelectConfig(budgets=[10]), ClusterConfig(), seed=0)
    run = make_clustered_run(tmp_path / "b")
    with pytest.raises(al.SelectionError, match="resolve to repeated counts"):
        sp.select_run(run, SelectConfig(budgets=[0.1, 60]), ClusterConfig(), seed=0)
    with pytest.raises(al.SelectionError, match="larger than the corpus"):
        sp.select_run(run, SelectConfig(budgets=[601]), ClusterConfig(), seed=0)
    with pytest.raises(al.SelectionError, match="unknown selection method 'kcenter'"):
        sp.select_run(run, SelectConfig(method="kcenter"), ClusterConfig(), seed=0)


def test_clusters_then_selection_end_to_end(ray_local, tmp_path):
    run = RunDir(str(tmp_path / "run"))
    tr.write_synthetic_run(run, 4000, 6, num_sources=2, chunk_rows=1500, seed=2)
    cfg = ClusterConfig(k=10, per_source=True)
    cluster_run(run, cfg, seed=0, report=False)
    stats = sp.select_run(run, SelectConfig(budgets=[0.05]), cfg, seed=0)
    sel = pq.read_table(run.selection())
    assert sel.num_rows == 200 == stats["budgets"]["200"]["selected"]
    assert stats["budgets"]["200"]["sources"] == {"source0": 100, "source1": 100}
    corpus_ids = set(pq.read_table(run.corpus_files(), columns=["id"]).column("id").to_pylist())
    assert set(sel.column("id").to_pylist()) <= corpus_ids
