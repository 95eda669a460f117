"""methods: each baseline's ranking on a hand-made trajectory table, through the run-level stage."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s2l_ray.selection import methods
from s2l_ray.selection import stage as sp
from s2l_ray.config import ClusterConfig, SelectConfig
from s2l_ray.clustering import cluster_means, write_centroids, write_clusters
from s2l_ray.layout import TRAJECTORY_SCHEMA, RunDir, embedding_schema, write_parquet_atomic

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


N_RESPONSE = np.array([5, 9, 2, 9, 1, 7, 3, 4], np.int32)  # length, longest 3: rows 1, 3 (tie: corpus order), 5
# 2-D embeddings; the target examples' are (1, 0) and (0, 1). Cosine to the nearest target example:
# 1, 1, .707, 0, .999, 0, .707, .970 (top 3: rows 0, 1, 4); to their mean (.707, .707):
# .707, .707, 1, -.707, .742, -.707, 0, .858 (top 3: rows 2, 4, 7).
EMB = np.array([[1, 0], [0, 1], [1, 1], [-1, 0], [2, 0.1], [0, -1], [1, -1], [0.5, 2]], np.float32)
TARGET_EMB = np.array([[1, 0], [0, 1]], np.float32)


def write_run(root, loss: np.ndarray, conf: np.ndarray, sources: str, *, n_response=None, embeddings=None,
              fingerprint: str = "fp", prefix: str = "ex") -> RunDir:
    """A stored table as a run directory: corpus parts (5 rows, then the rest), done trajectory points and,
    when given, embeddings."""
    run = RunDir(str(root))
    n, ids = len(loss), [f"{prefix}{i}" for i in range(len(loss))]
    parts = [p for p in (np.arange(0, min(5, n)), np.arange(5, n)) if len(p)]
    n_response = np.ones(n, np.int32) if n_response is None else n_response
    files = []
    for c, part in enumerate(parts):
        write_parquet_atomic(run.fs, run.corpus_part(c), pa.table({
            "idx": pa.array(part, pa.int64()), "id": [ids[i] for i in part], "source": [sources[i] for i in part],
            "prompt": [f"q{i}" for i in part], "response": [f"a{i}" for i in part],
            "messages": pa.nulls(len(part), pa.string()), "n_response": pa.array(n_response[part])}))
        files.append(run.corpus_part(c).rsplit("/", 1)[-1])
        if embeddings is not None:
            write_parquet_atomic(run.fs, run.embedding_part(c), pa.table({
                "idx": pa.array(part, pa.int64()), "id": [ids[i] for i in part],
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings[part].ravel()), 2)},
                schema=embedding_schema(2)))
    run.update_manifest(corpus={"files": files, "part_rows": [len(p) for p in parts], "rows": n,
                                "fingerprint": fingerprint})
    for t in range(loss.shape[1]):
        paths = []
        for c, part in enumerate(parts):
            paths.append(run.trajectory_part(t, c))
            write_parquet_atomic(run.fs, paths[-1], pa.table({
                "idx": pa.array(part, pa.int64()), "id": [ids[i] for i in part],
                "checkpoint": pa.array(np.full(len(part), t, np.int32)),
                "step": pa.array(np.full(len(part), t + 1, np.int64)), "loss": loss[part, t],
                "confidence": conf[part, t], "n_tokens": pa.array(np.ones(len(part), np.int32))},
                schema=TRAJECTORY_SCHEMA))
        run.mark_point_done(t, {"step": t + 1, "files": paths, "rows": n, "corpus_fingerprint": fingerprint})
    return run


def hand_made_run(root, sources: str = "") -> RunDir:
    """The table above as a run directory: a corpus in 2 parts, 3 done trajectory points (one source "s"),
    response lengths and embeddings."""
    return write_run(root, LOSS, CONF, sources or "s" * len(LOSS), n_response=N_RESPONSE, embeddings=EMB)


def selected(run: RunDir, method: str, budgets=(3,), seed: int = 0, cluster: ClusterConfig | None = None,
             **select) -> list[int]:
    sp.select_run(run, SelectConfig(method=method, budgets=list(budgets), **select), cluster or ClusterConfig(),
                  seed=seed, num_points=3)
    sel = pq.read_table(run.selection())
    assert set(sel.column("method").to_pylist()) == {method}
    assert sel.column("cluster").null_count == (0 if methods.get(method).clusters else sel.num_rows)
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


# the target-aware methods and the cheap baselines -------------------------------------------------------

LABELS = np.array([0, 0, 0, 1, 1, 1, 2, 2])  # hand-made clusters of the table above
# target trajectories near cluster 2's centroid (1.9, 1.65, 1.55), far from cluster 0's (3, 2.17, 1.17) and 1's
TARGET_LOSS = np.array([[1.9, 1.6, 1.5], [2.0, 1.7, 1.6]], np.float32)


def with_target(run: RunDir, sources: str = "ss", loss=TARGET_LOSS, owners: list | None = None) -> RunDir:
    """Give ``run`` the hand-made clusters (their centroids: the cluster means; ``owners``: each cluster's source
    when fitted per source) and stored target examples with trajectories and embeddings."""
    write_clusters(run, LABELS.astype(np.int32), np.zeros(8, np.float32), "fp")
    means = cluster_means(LOSS, LABELS, 3)
    if owners is None:
        write_centroids(run, [means], np.array([0]), [], "fp")
    else:
        write_centroids(run, [means[i:i + 1] for i in range(3)], np.arange(3), owners, "fp")
    write_run(run.target.root, loss, np.full(loss.shape, 0.5, np.float32), sources,
              embeddings=TARGET_EMB[:len(loss)], fingerprint="tfp", prefix="t")
    return run


def test_length_takes_the_longest_responses(ray_local, tmp_path):
    assert selected(hand_made_run(tmp_path), "length") == [1, 3, 5]


@pytest.mark.parametrize("rank, expected", [("nearest", [0, 1, 4]), ("mean", [2, 4, 7])])
def test_embedding_target_ranks_by_cosine_to_the_target(ray_local, tmp_path, rank, expected):
    run = with_target(hand_made_run(tmp_path))
    assert selected(run, "embedding-target", target="t.jsonl", embedding_rank=rank) == expected


def test_s2l_target_weights_clusters_by_the_target_examples(ray_local, tmp_path):
    # both target examples fall in cluster 2; s = 0.1, K = 3: weights 1/30, 1/30, 28/30. Budget 3, walk by n/w:
    # cluster 2 first, min(2, floor(3 * 28/30)) = 2; cluster 0 floor(1 * (1/30) / (2/30)) = 0; cluster 1 takes 1
    run = with_target(hand_made_run(tmp_path))
    for seed in range(5):
        picked = selected(run, "s2l-target", seed=seed, target="t.jsonl")
        assert picked[1:] == [6, 7] and picked[0] in (3, 4, 5)
    stats = sp.select_run(run, SelectConfig(method="s2l-target", budgets=[3], target="t.jsonl"), ClusterConfig(),
                          seed=0, num_points=3)
    assert stats["target_rows"] == 2 and stats["target_clusters_reached"] == 1
    # with smoothing 1 the target changes nothing: the same rows as s2l, seed for seed
    for seed in range(5):
        assert selected(run, "s2l-target", seed=seed, target="t.jsonl", target_smoothing=1.0) == \
            selected(run, "s2l", seed=seed)


def test_s2l_target_per_source_places_unknown_sources_by_nearest_cluster(ray_local, tmp_path):
    # sources a (rows 0-2), b (3-5), c (6, 7), one cluster each. Target: one "c" example near cluster 2, one of a
    # source the corpus lacks near cluster 0 (source a). Target split, s = 0.1: weights a .483, b .033, c .483;
    # budget 5, walk by n/w: c floor(5 * .483) = 2, a floor(3 * .483 / .517) = 2, b 1 (the equal split: 2, 2, 1)
    run = with_target(hand_made_run(tmp_path, sources="aaabbbcc"), sources="cx",
                      loss=np.array([[1.9, 1.6, 1.5], [3.0, 2.2, 1.2]], np.float32), owners=["a", "b", "c"])
    cfg = ClusterConfig(per_source=True)
    stats = sp.select_run(run, SelectConfig(method="s2l-target", budgets=[5], target="t.jsonl"), cfg, seed=0,
                          num_points=3)
    assert stats["budgets"]["5"]["sources"] == {"a": 2, "b": 1, "c": 2}
    assert stats["source_split"] == "target" and stats["target_sources"] == {"a": 1, "b": 0, "c": 1}
    equal = sp.select_run(run, SelectConfig(method="s2l-target", budgets=[5], target="t.jsonl"),
                          ClusterConfig(per_source=True, source_split="equal"), seed=0, num_points=3)
    assert equal["budgets"]["5"]["sources"] == {"a": 2, "b": 2, "c": 1}


def test_random_target_sources_follows_the_target_mix(ray_local, tmp_path):
    # corpus a: 2 rows, b: 6; every target example is "b": weights a .05, b .95 (s = 0.1). Budget 4: b first,
    # floor(4 * .95) = 3, a 1. random-per-source splits equally: 2 and 2
    run = with_target(hand_made_run(tmp_path, sources="aabbbbbb"), sources="bb")
    for seed in range(5):
        picked = selected(run, "random-target-sources", budgets=(4,), seed=seed, target="t.jsonl")
        assert len([i for i in picked if i < 2]) == 1 and len(picked) == 4
        assert len([i for i in selected(run, "random-per-source", budgets=(4,), seed=seed) if i < 2]) == 2
    proportional = sp.select_run(run, SelectConfig(method="random-per-source", budgets=[4]),
                                 ClusterConfig(source_split="proportional"), seed=0, num_points=3)
    assert proportional["budgets"]["4"]["sources"] == {"a": 1, "b": 3} and proportional["source_split"] == "proportional"


def test_target_methods_need_the_target(tmp_path):
    run = hand_made_run(tmp_path)
    with pytest.raises(sp.SelectionError, match="needs target examples: give --target"):
        selected(run, "s2l-target")
    with pytest.raises(sp.SelectionError, match="source split 'target' .* needs target examples"):
        sp.select_run(run, SelectConfig(method="random-per-source", budgets=[4]),
                      ClusterConfig(source_split="target"), seed=0, num_points=3)
