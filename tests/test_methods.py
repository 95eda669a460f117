"""methods: each baseline's ranking on a hand-made trajectory table, through the run-level stage."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s2l_ray.selection import methods
from s2l_ray.selection import stage as sp
from s2l_ray.config import ClusterConfig, SelectConfig
from s2l_ray.layout import TRAJECTORY_SCHEMA, RunDir, write_parquet_atomic

# 8 examples, 3 trajectory points. Worked out by hand from the definitions:
LOSS = np.array([[3.0, 2.0, 1.0],   # last 1.0, learnability 2.0
                 [2.0, 2.0, 2.0],   # last 2.0, learnability 0.0
                 [4.0, 2.5, 0.5],   # last 0.5, learnability 3.5
                 [1.0, 1.5, 3.0],   # last 3.0, learnability -2.0
                 [2.5, 1.5, 1.5],   # last 1.5, learnability 1.0
                 [5.0, 4.5, 4.0],   # last 4.0, learnability 1.0 (tie with row 4: corpus order)
                 [0.8, 0.7, 0.6],   # last 0.6, learnability 0.2
                 [3.0, 2.6, 2.5]], np.float32)  # last 2.5, learnability 0.5
CONF = np.array([[0.1, 0.2, 0.3],    # mean 0.2,  std 0.082
                 [0.5, 0.5, 0.5],    # mean 0.5,  std 0
                 [0.9, 0.1, 0.5],    # mean 0.5,  std 0.327
                 [0.25, 0.25, 0.25],  # mean 0.25, std 0
                 [0.0, 0.6, 0.3],    # mean 0.3,  std 0.245
                 [0.8, 0.9, 1.0],    # mean 0.9,  std 0.082
                 [0.4, 0.4, 0.7],    # mean 0.5,  std 0.141
                 [0.05, 0.05, 0.05]], np.float32)  # mean 0.05, std 0
# last loss ascending: 2, 6, 0, 4, 1, 7, 3, 5
EXPECTED_3 = {
    "perplexity-low": [0, 2, 6],
    "perplexity-middle": [0, 1, 4],  # ranks 2..4 of 8: (8 - 3) // 2 = 2
    "perplexity-high": [3, 5, 7],
    "confidence": [0, 3, 7],  # least confident
    "variability": [2, 4, 6],  # most variable
    "learnability": [0, 2, 4],
}


def hand_made_run(root, sources: str = "") -> RunDir:
    """The table above as a run directory: a corpus in 2 parts and 3 done trajectory points (one source "s")."""
    run = RunDir(str(root))
    n, ids = len(LOSS), [f"ex{i}" for i in range(len(LOSS))]
    sources = sources or "s" * n
    files = []
    for c, part in enumerate((np.arange(0, 5), np.arange(5, n))):
        write_parquet_atomic(run.fs, run.corpus_part(c), pa.table({
            "idx": pa.array(part, pa.int64()), "id": [ids[i] for i in part], "source": [sources[i] for i in part],
            "prompt": [f"q{i}" for i in part], "response": [f"a{i}" for i in part],
            "messages": pa.nulls(len(part), pa.string())}))
        files.append(run.corpus_part(c).rsplit("/", 1)[-1])
    run.update_manifest(corpus={"files": files, "part_rows": [5, n - 5], "rows": n, "fingerprint": "fp"})
    for t in range(3):
        paths = []
        for c, part in enumerate((np.arange(0, 5), np.arange(5, n))):
            paths.append(run.trajectory_part(t, c))
            write_parquet_atomic(run.fs, paths[-1], pa.table({
                "idx": pa.array(part, pa.int64()), "id": [ids[i] for i in part],
                "checkpoint": pa.array(np.full(len(part), t, np.int32)),
                "step": pa.array(np.full(len(part), t + 1, np.int64)), "loss": LOSS[part, t],
                "confidence": CONF[part, t], "n_tokens": pa.array(np.ones(len(part), np.int32))},
                schema=TRAJECTORY_SCHEMA))
        run.mark_point_done(t, {"step": t + 1, "files": paths, "rows": n, "corpus_fingerprint": "fp"})
    return run


def selected(run: RunDir, method: str, budgets=(3,), seed: int = 0) -> list[int]:
    sp.select_run(run, SelectConfig(method=method, budgets=list(budgets)), ClusterConfig(), seed=seed, num_points=3)
    sel = pq.read_table(run.selection())
    assert set(sel.column("method").to_pylist()) == {method} and sel.column("cluster").null_count == sel.num_rows
    return [int(i[2:]) for i in sel.column("id").to_pylist()]


@pytest.mark.parametrize("method", sorted(EXPECTED_3))
def test_ranking_methods_follow_their_definitions(ray_local, tmp_path, method):
    assert selected(hand_made_run(tmp_path), method) == EXPECTED_3[method]


def test_pure_rankings_break_ties_by_corpus_order():
    values = np.array([2.0, 1.0, 2.0, 1.0, 3.0])
    assert methods.lowest(values, 3).tolist() == [0, 1, 3]  # 1.0, 1.0 then the first 2.0
    assert methods.highest(values, 2).tolist() == [0, 4]
    assert methods.middle(values, 1).tolist() == [0]  # ascending order 1, 3, 0, 2, 4; start (5 - 1) // 2 = 2


def test_full_returns_every_id_whatever_the_budget(tmp_path):
    run = hand_made_run(tmp_path)
    stats = sp.select_run(run, SelectConfig(method="full", budgets=[0.1, 3]), ClusterConfig(), seed=0)
    assert pq.read_table(run.selection()).column("id").to_pylist() == [f"ex{i}" for i in range(8)]
    assert list(stats["budgets"]) == ["8"] and stats["budgets"]["8"]["clusters"] is None


def test_random_is_uniform_distinct_and_seeded(tmp_path):
    run = hand_made_run(tmp_path)
    a = selected(run, "random", budgets=(4,), seed=5)
    assert len(set(a)) == 4 and a == sorted(a) and a == selected(run, "random", budgets=(4,), seed=5)
    counts = np.zeros(1000, np.int64)
    for seed in range(400):
        counts[methods.random(methods.Inputs(1000), 100, np.random.default_rng(seed))] += 1
    assert 20 < counts.min() and counts.max() < 65  # mean 40 per row


def test_a_user_method_is_one_registered_function(tmp_path):
    run = hand_made_run(tmp_path)

    @methods.method("lowest-first-loss", score="learnability")
    def lowest_first(inputs, budget, rng):  # any function of the registered scores
        return methods.lowest(inputs.scores["learnability"], budget)

    try:
        assert selected(run, "lowest-first-loss", budgets=(2,)) == [1, 3]
        with pytest.raises(sp.SelectionError, match="unknown selection method 'nope'; valid: .*'s2l'"):
            selected(run, "nope")
    finally:
        del methods.METHODS["lowest-first-loss"]


def test_a_method_breaking_its_contract_is_an_error(tmp_path):
    run = hand_made_run(tmp_path)
    methods.method("broken")(lambda inputs, budget, rng: np.zeros(budget, np.int64))
    try:
        with pytest.raises(sp.SelectionError, match="method 'broken' returned 3 positions for budget 3, not"):
            selected(run, "broken")
    finally:
        del methods.METHODS["broken"]


def test_random_per_source_splits_the_budget_like_algorithm_1_then_draws_uniformly(tmp_path):
    # sources a: 2 rows, b: 5, c: 10; budget 9, smallest source first: a min(2, 9 // 3) = 2,
    # b min(5, 7 // 2) = 3, c what is left, 4
    codes = np.array([2] * 10 + [1] * 5 + [0] * 2)
    inputs = methods.Inputs(len(codes), sources=codes)
    counts = np.zeros(len(codes), np.int64)
    for seed in range(300):
        pos = methods.random_per_source(inputs, 9, np.random.default_rng(seed))
        assert np.bincount(codes[pos], minlength=3).tolist() == [2, 3, 4] and (np.diff(pos) > 0).all()
        counts[pos] += 1
    assert (counts[15:] == 300).all()  # source a taken whole
    assert 140 < counts[10:15].min() and counts[10:15].max() < 220  # 3 of 5: mean 180
    assert 80 < counts[:10].min() and counts[:10].max() < 160  # 4 of 10: mean 120
    run = hand_made_run(tmp_path, sources="aabbbbbb")  # through select_run: 4 rows, 2 per source
    picked = selected(run, "random-per-source", budgets=(4,), seed=3)
    assert len([i for i in picked if i < 2]) == 2 and len(picked) == 4
    stats = sp.select_run(run, SelectConfig(method="random-per-source", budgets=[4]), ClusterConfig(), seed=3)
    assert stats["per_source"] and stats["budgets"]["4"]["sources"] == {"a": 2, "b": 2}
