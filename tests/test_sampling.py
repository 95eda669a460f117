"""sampling: Algorithm 1 counts, source stratification, budgets, and the run-level stage."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s2l_ray import sampling as sp
from s2l_ray import trajectories as tr
from s2l_ray.clustering import cluster_run
from s2l_ray.config import ClusterConfig, SelectConfig
from s2l_ray.layout import CLUSTERS_SCHEMA, SELECTION_SCHEMA, RunDir, write_parquet_atomic


@pytest.mark.parametrize("sizes, budget, expected", [
    ([1, 2, 50, 100], 40, [1, 2, 18, 19]),  # floor(37/2) = 18, then the remaining 19
    ([100, 1, 50, 2], 40, [19, 1, 18, 2]),  # the walk is by size, counts stay with their cluster
    ([5, 5, 5], 7, [2, 2, 3]),  # ties walked by cluster id: floor(7/3), floor(5/2), 3
    ([10, 10, 10, 10], 10, [2, 2, 3, 3]),
    ([3, 100, 100], 12, [3, 4, 5]),  # small cluster whole, its unused share rolls over
    ([0, 4, 9], 6, [0, 3, 3]),  # an empty cluster gives nothing and changes no share
    ([1, 2, 3], 6, [1, 2, 3]),  # budget = N takes everything
    ([7, 8], 0, [0, 0]),
])
def test_allocate_hand_worked(sizes, budget, expected):
    assert sp.allocate(sizes, budget).tolist() == expected


def test_allocate_fills_exactly_and_fairly_for_random_sizes():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        k = int(rng.integers(1, 40))
        sizes = rng.integers(0, rng.choice([3, 30, 3000]), k)
        if sizes.sum() == 0:
            continue
        budget = int(rng.integers(0, sizes.sum() + 1))
        counts = sp.allocate(sizes, budget)
        assert counts.sum() == budget
        assert ((0 <= counts) & (counts <= sizes)).all()
        partial = counts < sizes  # clusters not taken whole share evenly (within one) ...
        if partial.any():
            assert counts[partial].max() - counts[partial].min() <= 1
            # ... and no cluster taken whole is larger than any other's share plus one
            assert (sizes[~partial] <= counts[partial].min() + 1).all()


def test_allocate_rejects_budget_above_available():
    with pytest.raises(sp.SelectionError, match="outside 0..6"):
        sp.allocate([1, 2, 3], 7)


def test_sample_clusters_counts_uniqueness_and_seed():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 12, 5000) ** 2 % 37  # uneven clusters, sparse ids
    pos = sp.sample_clusters(labels, 700, np.random.default_rng(5))
    assert len(pos) == 700 and len(np.unique(pos)) == 700 and (np.diff(pos) > 0).all()
    assert np.bincount(labels[pos], minlength=37).tolist() == sp.allocate(np.bincount(labels, minlength=37), 700).tolist()
    assert np.array_equal(pos, sp.sample_clusters(labels, 700, np.random.default_rng(5)))
    assert not np.array_equal(pos, sp.sample_clusters(labels, 700, np.random.default_rng(6)))


def test_per_source_stratification_hand_worked():
    # source 0: 10 rows (clusters 0, 1 of 5); source 1: 40 rows (clusters 2: 10, 3: 30); source 2: 100 rows (4)
    labels = np.concatenate([np.repeat([0, 1], 5), np.repeat([2, 3], [10, 30]), np.full(100, 4)])
    sources = np.repeat([0, 1, 2], [10, 40, 100])
    pos = sp.s2l_select(labels, 60, np.random.default_rng(0), sources)
    # sources by size 10, 40, 100: min(10, 60//3) = 10, min(40, 50//2) = 25, then 25
    assert np.bincount(sources[pos]).tolist() == [10, 25, 25]
    # within source 1 (clusters of 10 and 30), 25: min(10, 25//2) = 10, then 15
    assert np.bincount(labels[pos], minlength=5).tolist() == [5, 5, 10, 15, 25]
    assert len(np.unique(pos)) == 60


@pytest.mark.parametrize("budget, n, expected", [(0.1, 1000, 100), (40, 1000, 40), (1000, 1000, 1000),
                                                 (0.25, 10, 2), (0.29, 100, 29), (1, 5, 1)])
def test_resolve_budget(budget, n, expected):
    assert sp.resolve_budget(budget, n) == expected


@pytest.mark.parametrize("budget, message", [(0, "count >= 1 or a fraction"), (-3, "count >= 1 or a fraction"),
                                             (float("nan"), "count >= 1 or a fraction"),
                                             (1001, "larger than the corpus"), (2.5, "whole count"),
                                             (0.0001, "selects none")])
def test_resolve_budget_errors(budget, message):
    with pytest.raises(sp.SelectionError, match=message):
        sp.resolve_budget(budget, 1000)


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
    assert counts.tolist() == sp.allocate(sizes, 60).tolist()


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
    with pytest.raises(sp.SelectionError, match="computed for another corpus"):
        sp.select_run(run, SelectConfig(budgets=[10]), ClusterConfig(), seed=0)
    run = make_clustered_run(tmp_path / "b")
    with pytest.raises(sp.SelectionError, match="resolve to repeated counts"):
        sp.select_run(run, SelectConfig(budgets=[0.1, 60]), ClusterConfig(), seed=0)
    with pytest.raises(sp.SelectionError, match="larger than the corpus"):
        sp.select_run(run, SelectConfig(budgets=[601]), ClusterConfig(), seed=0)
    with pytest.raises(sp.SelectionError, match="unknown selection method 'kcenter'"):
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
