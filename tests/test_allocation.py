"""selection.allocation: Algorithm 1 (weighted and not), source splits, target weights and budgets, by hand and at random."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from s2l_ray.selection import allocation as al


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
    assert al.allocate(sizes, budget).tolist() == expected


def random_size_sets(rng: np.random.Generator, most: int, n: int = 2000):
    """``n`` draws of 1..``most`` cluster sizes, small, mixed and large, none all empty."""
    for _ in range(n):
        sizes = rng.integers(0, rng.choice([3, 30, 3000]), int(rng.integers(1, most)))
        if sizes.sum() > 0:
            yield sizes


def test_allocate_fills_exactly_and_fairly_for_random_sizes():
    rng = np.random.default_rng(0)
    for sizes in random_size_sets(rng, 40):
        budget = int(rng.integers(0, sizes.sum() + 1))
        counts = al.allocate(sizes, budget)
        assert counts.sum() == budget
        assert ((0 <= counts) & (counts <= sizes)).all()
        partial = counts < sizes  # clusters not taken whole share evenly (within one) ...
        if partial.any():
            assert counts[partial].max() - counts[partial].min() <= 1
            # ... and no cluster taken whole is larger than any other's share plus one
            assert (sizes[~partial] <= counts[partial].min() + 1).all()


def test_allocate_rejects_budget_above_available():
    with pytest.raises(al.SelectionError, match="outside 0..6"):
        al.allocate([1, 2, 3], 7)


def test_sample_clusters_counts_uniqueness_and_seed():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 12, 5000) ** 2 % 37  # uneven clusters, sparse ids
    pos = al.select_groups(labels, 700, np.random.default_rng(5))
    assert len(pos) == 700 and len(np.unique(pos)) == 700 and (np.diff(pos) > 0).all()
    assert np.bincount(labels[pos], minlength=37).tolist() == al.allocate(np.bincount(labels, minlength=37), 700).tolist()
    assert np.array_equal(pos, al.select_groups(labels, 700, np.random.default_rng(5)))
    assert not np.array_equal(pos, al.select_groups(labels, 700, np.random.default_rng(6)))


def test_per_source_stratification_hand_worked():
    # source 0: 10 rows (clusters 0, 1 of 5); source 1: 40 rows (clusters 2: 10, 3: 30); source 2: 100 rows (4)
    labels = np.concatenate([np.repeat([0, 1], 5), np.repeat([2, 3], [10, 30]), np.full(100, 4)])
    sources = np.repeat([0, 1, 2], [10, 40, 100])
    pos = al.stratified(labels, sources, 60, np.random.default_rng(0))
    # sources by size 10, 40, 100: min(10, 60//3) = 10, min(40, 50//2) = 25, then 25
    assert np.bincount(sources[pos]).tolist() == [10, 25, 25]
    # within source 1 (clusters of 10 and 30), 25: min(10, 25//2) = 10, then 15
    assert np.bincount(labels[pos], minlength=5).tolist() == [5, 5, 10, 15, 25]
    assert len(np.unique(pos)) == 60


@pytest.mark.parametrize("budget, n, expected", [(0.1, 1000, 100), (40, 1000, 40), (1000, 1000, 1000),
                                                 (0.25, 10, 2), (0.29, 100, 29), (1, 5, 1)])
def test_resolve_budget(budget, n, expected):
    assert al.resolve_budget(budget, n) == expected


@pytest.mark.parametrize("budget, message", [(0, "count >= 1 or a fraction"), (-3, "count >= 1 or a fraction"),
                                             (float("nan"), "count >= 1 or a fraction"),
                                             (1001, "larger than the corpus"), (2.5, "whole count"),
                                             (0.0001, "selects none")])
def test_resolve_budget_errors(budget, message):
    with pytest.raises(al.SelectionError, match=message):
        al.resolve_budget(budget, 1000)




# weighted Algorithm 1 ------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes, weights, budget, expected", [
    # walk by n/w: c2 (5), c0 (10), c1 (10): floor(12 * 2/4) = 6, floor(6 * 1/2) = 3, then 3
    ([10, 10, 10], [1, 1, 2], 12, [3, 3, 6]),
    # c0 (2/2 = 1) cannot take its floor(40 * 2/4) = 20: taken whole, the rest rolls over: 19, 19
    ([2, 50, 50], [2, 1, 1], 40, [2, 19, 19]),
    # target weights 0.65, 0.25, 0.05, 0.05 (counts 3, 1, 0, 0; s = 0.2): 26, floor(14 * 0.25/0.35) = 10, 2, 2
    ([100, 100, 100, 100], [Fraction(65, 100), Fraction(25, 100), Fraction(5, 100), Fraction(5, 100)], 40,
     [26, 10, 2, 2]),
    # proportional to sizes (n/w = 1 for all: walked by id): floor(25 * 10/100) = 2, floor(23 * 30/90) = 7, 16
    ([10, 30, 60], [10, 30, 60], 25, [2, 7, 16]),
    # a weight of 0 gets nothing; the others hold the budget
    ([5, 5], [1, 0], 3, [3, 0]),
    # equal weights are the paper's rule
    ([1, 2, 50, 100], [7, 7, 7, 7], 40, [1, 2, 18, 19]),
])
def test_weighted_allocate_hand_worked(sizes, weights, budget, expected):
    assert al.allocate(sizes, budget, weights).tolist() == expected


def test_weighted_allocate_refuses_a_budget_only_weightless_groups_could_fill():
    with pytest.raises(al.SelectionError, match=r"outside 0..5 .*groups of positive weight"):
        al.allocate([5, 5], 6, [1, 0])


def test_target_weights_hand_worked():
    assert al.target_weights([3, 1, 0, 0], 0.2) == [Fraction(13, 20), Fraction(1, 4), Fraction(1, 20), Fraction(1, 20)]
    assert al.target_weights([3, 1], 0.0) == [Fraction(3, 4), Fraction(1, 4)]
    assert al.target_weights([3, 1, 0], 1.0) == [Fraction(1, 3)] * 3  # s = 1: the unweighted rule
    assert al.target_weights([0, 0], 0.3) == [Fraction(1, 2)] * 2  # no target example: equal
    with pytest.raises(al.SelectionError, match="target_smoothing must be in"):
        al.target_weights([1], 1.5)


def test_weighted_allocate_fills_exactly_and_keeps_every_share_for_random_sets():
    rng = np.random.default_rng(0)
    for sizes in random_size_sets(rng, 30):
        k = len(sizes)
        smoothing = float(rng.choice([0.0, 0.05, 0.1, 0.5, 1.0]))
        hits = rng.integers(0, 20, k) * (rng.random(k) < 0.4)  # most clusters get no target example
        weights = al.target_weights(hits, smoothing)
        reach = int(sizes[[w > 0 for w in weights]].sum())
        budget = int(rng.integers(0, reach + 1))
        counts = al.allocate(sizes, budget, weights)
        assert counts.sum() == budget
        assert ((0 <= counts) & (counts <= sizes)).all()
        total = sum(weights)
        floor_share = np.array([int(budget * w / total) for w in weights])
        # every group gets at least its share of the whole budget (or all it holds): what is left per unit of
        # weight only grows along the walk, so a group with no target example keeps its smoothed share
        assert (counts >= np.minimum(sizes, floor_share)).all()
        if smoothing == 1.0:
            assert counts.tolist() == al.allocate(sizes, budget).tolist()


@pytest.mark.parametrize("split, expected", [
    ("equal", [10, 25, 25]),  # 10, 40, 100 rows: min(10, 60 // 3), min(40, 50 // 2), the rest
    ("proportional", [4, 16, 40]),  # 60 * 10/150 = 4, floor(56 * 40/140) = 16, 40
    ("target", [6, 6, 48]),  # target mix 0, 0, 10 with s = 0.3: weights 0.1, 0.1, 0.8
])
def test_source_splits_on_a_skewed_corpus(split, expected):
    sources = np.repeat([0, 1, 2], [10, 40, 100])
    labels = np.zeros(150, np.int64)
    weights = al.source_weights(split, [10, 40, 100], [0, 0, 10], 0.3)
    pos = al.stratified(labels, sources, 60, np.random.default_rng(0), split_weights=weights)
    assert np.bincount(sources[pos], minlength=3).tolist() == expected and len(np.unique(pos)) == 60


def test_target_split_needs_target_sources():
    with pytest.raises(al.SelectionError, match="needs target examples whose sources"):
        al.source_weights("target", [3, 4], [0, 0], 0.1)
    with pytest.raises(al.SelectionError, match="source_split must be one of"):
        al.source_weights("even", [3, 4], None, 0.1)


def test_cluster_weights_are_renormalised_within_each_source():
    # source 0: clusters 0 (20 rows) and 1 (20); source 1: clusters 2 (20) and 3 (20). Targets: 3 in cluster 1,
    # 1 in cluster 2; s = 0.2: weights 0.05, 0.65, 0.25, 0.05. Equal split, 20 a source. Source 0: cluster 1
    # walked first (20 / 0.65 < 20 / 0.05): floor(20 * 0.65 / 0.70) = 18, cluster 0 the other 2. Source 1:
    # cluster 2 first, floor(20 * 0.25 / 0.30) = 16, cluster 3 the other 4.
    labels = np.repeat([0, 1, 2, 3], 20)
    sources = np.repeat([0, 1], 40)
    w = al.target_weights([0, 3, 1, 0], 0.2)
    pos = al.stratified(labels, sources, 40, np.random.default_rng(1), cluster_weights=w)
    assert np.bincount(labels[pos], minlength=4).tolist() == [2, 18, 16, 4]
    # a source no target example reaches (s = 0) falls back to the paper's rule within it
    w0 = al.target_weights([0, 3, 0, 0], 0.0)
    pos = al.stratified(labels, sources, 40, np.random.default_rng(1), cluster_weights=w0)
    assert np.bincount(labels[pos], minlength=4).tolist() == [0, 20, 10, 10]
