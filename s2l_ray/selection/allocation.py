"""How a budget is shared out: Algorithm 1 of S2L, weighted; source splits; target weights. Pure, no I/O.

**Weighted Algorithm 1** (``allocate``). Groups (clusters or sources) of sizes ``n_k`` with
positive weights ``w_k`` share a budget B <= N. Walk the groups by ascending ``n_k / w_k`` (ties
by group id); with ``left`` still to give and ``W`` the weight of the groups not yet walked,
group k gives ``min(n_k, floor(left * w_k / W))``. With equal weights this is the paper's rule
exactly: ascending size, ``min(|C_k|, floor(left / (K - k)))``.

It fills the budget exactly. Invariant: before group k, ``left <= sum of n_j over the groups
not yet walked`` (true at the start since B <= N). A group taken whole keeps it. A group that
gives ``q = floor(left * w_k / W) < n_k`` has ``left * w_k / W < n_k``, so ``left / W < n_k / w_k
<= n_j / w_j`` for every later group j (the walk order), hence ``left * (W - w_k) / W <
sum_{j later} n_j``; with ``left - q < left * (W - w_k) / W + 1`` and integers on both sides,
``left - q <= sum_{j later} n_j``. The last group's share is ``floor(left * w / w) = left``,
which it holds, so it takes exactly what is left: rounding remainders roll over to the groups
walked later, as in the paper. Weights are exact fractions, so no float rounding can break this.
E.g. sizes 1, 2, 50, 100, equal weights, B = 40 give 1, 2, floor(37/2) = 18 and 19.

**Target weights** (``target_weights``): a group's weight is ``(1 - s) * t_k / T + s / K`` for
``t_k`` of the T target examples in it (nearest centroid, or the example's source) and smoothing
``s`` in [0, 1]: ``s = 0`` follows the target alone (groups it never reaches get nothing), ``s = 1``
is the unweighted rule, anything between gives every group at least ``s / K`` of the weight.

**Source splits** (``SPLITS``): ``equal`` (Algorithm 1 over the sources, as the official code
splits the budget), ``proportional`` (weights = the sources' sizes: each source by its share of
the corpus, rounding rolled over), ``target`` (the target examples' source mix, smoothed).

Empty groups give nothing and change no other share. This follows the paper, not the official
code's first pass that skips clusters of size <= 2.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

SPLITS = ("equal", "proportional", "target")


class SelectionError(ValueError):
    """A budget, a split or the inputs do not allow a selection."""


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


def resolve_budgets(budgets: list[float], n: int) -> list[int]:
    """``select.budgets`` as example counts of a corpus of n (``resolve_budget``), no two the same."""
    try:
        counts = [resolve_budget(b, n) for b in budgets]
    except SelectionError as e:
        raise SelectionError(f"select.budgets: {e}") from None
    if len(set(counts)) != len(counts):
        raise SelectionError(f"select.budgets {budgets} resolve to repeated counts {counts} of the corpus's {n} rows")
    return counts


def _fractions(weights: Sequence | None, k: int) -> list[Fraction]:
    if weights is None:
        return [Fraction(1)] * k
    out = [w if isinstance(w, Fraction) else Fraction(w) for w in weights]
    if len(out) != k or any(w < 0 for w in out):
        raise SelectionError(f"weights must be {k} numbers >= 0, got {list(weights)}")
    return out


def walk_order(sizes: Sequence[int], weights: Sequence | None = None) -> list[int]:
    """The groups by ascending ``n_k / w_k``, ties by id (weight 0: last); equal weights: ascending size."""
    w = _fractions(weights, len(sizes))
    return sorted(range(len(sizes)), key=lambda c: (w[c] == 0, Fraction(int(sizes[c])) / (w[c] or 1), c))


def allocate(sizes: Sequence[int], budget: int, weights: Sequence | None = None) -> np.ndarray:
    """Weighted Algorithm 1's share of each group (int64, aligned with ``sizes``); sums to ``budget``.

    ``weights`` (ints, floats or Fractions, used exactly) default to equal: the paper's rule. A group of
    weight 0 gets nothing; the groups of positive weight must then hold the budget.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    w = _fractions(weights, len(sizes))
    reach = int(sum(int(n) for n, x in zip(sizes, w) if x > 0))
    if not 0 <= budget <= reach:
        more = " in groups of positive weight (raise select.target_smoothing above 0 to reach every group)" \
            if reach < sizes.sum() else ""
        raise SelectionError(f"budget {budget} is outside 0..{reach} (the examples available{more})")
    counts = np.zeros_like(sizes)
    left, total = budget, sum(w)
    for c in walk_order(sizes, w):
        if w[c] == 0:
            break
        counts[c] = min(int(sizes[c]), math.floor(left * w[c] / total))
        left -= int(counts[c])
        total -= w[c]
    if left:  # impossible by the invariant above; a guard against a broken change
        raise SelectionError(f"allocation left {left} of budget {budget} unfilled")
    return counts


def target_weights(counts: Sequence[int], smoothing: float) -> list[Fraction]:
    """``(1 - s) * t_k / T + s / K`` per group for target counts ``t_k``; equal weights when T = 0."""
    s = Fraction(smoothing).limit_denominator(10**9)
    if not 0 <= s <= 1:
        raise SelectionError(f"select.target_smoothing must be in [0, 1], got {smoothing}")
    counts = [int(c) for c in counts]
    total, k = sum(counts), len(counts)
    if total == 0:
        return [Fraction(1, k)] * k
    return [(1 - s) * Fraction(c, total) + s / k for c in counts]


def source_weights(split: str, sizes: Sequence[int], target_counts: Sequence[int] | None,
                   smoothing: float) -> list[Fraction] | None:
    """The weights of a source split over sources of ``sizes``; None for ``equal`` (the paper's rule)."""
    if split == "equal":
        return None
    if split == "proportional":
        return [Fraction(int(n)) for n in sizes]
    if split == "target":
        if target_counts is None or sum(target_counts) == 0:
            raise SelectionError("source split 'target' needs target examples whose sources are among the "
                                 "corpus's sources (select.target)")
        return target_weights(target_counts, smoothing)
    raise SelectionError(f"cluster.source_split must be one of {list(SPLITS)}, not {split!r}")


def draw(groups: np.ndarray, counts: np.ndarray, rng: np.random.Generator, order: Sequence[int]) -> np.ndarray:
    """Sorted positions: ``counts[g]`` rows drawn uniformly at random from each group g (``groups``: per row),
    the groups drawn from in ``order``."""
    sizes = np.bincount(groups, minlength=len(counts))
    members = np.argsort(groups, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    picks = [rng.choice(members[starts[g]:starts[g + 1]], counts[g], replace=False) for g in order if counts[g]]
    return np.sort(np.concatenate(picks)) if picks else np.empty(0, np.int64)


def select_groups(labels: np.ndarray, budget: int, rng: np.random.Generator,
                  weights: Sequence | None = None) -> np.ndarray:
    """Sorted positions of ``budget`` rows: weighted Algorithm 1 over the groups given by ``labels``
    (``weights`` per group id; None: the paper's rule), uniformly at random within each group."""
    sizes = np.bincount(labels, minlength=0 if weights is None else len(weights))
    return draw(labels, allocate(sizes, budget, weights), rng, walk_order(sizes, weights))


def stratified(labels: np.ndarray, sources: np.ndarray | None, budget: int, rng: np.random.Generator,
               cluster_weights: Sequence | None = None, split_weights: Sequence | None = None) -> np.ndarray:
    """Sorted positions: the budget split over sources (``split_weights`` per source code; None: equal), then
    over each source's clusters (``cluster_weights`` per cluster id, renormalised within the source; None,
    or all 0 in a source: the paper's rule). Without ``sources``, one split over all clusters."""
    if sources is None:
        return select_groups(labels, budget, rng, cluster_weights)
    sizes = np.bincount(sources)
    per_source = allocate(sizes, budget, split_weights)
    picks = []
    for s in walk_order(sizes, split_weights):
        if per_source[s]:
            rows = np.flatnonzero(sources == s)
            local, codes = np.unique(labels[rows], return_inverse=True)  # this source's clusters, renumbered
            weights = None if cluster_weights is None else [cluster_weights[c] for c in local]
            if weights is not None and not any(weights):  # no target example reaches this source: the paper's rule
                weights = None
            picks.append(rows[select_groups(codes, int(per_source[s]), rng, weights)])
    return np.sort(np.concatenate(picks)) if picks else np.empty(0, np.int64)
