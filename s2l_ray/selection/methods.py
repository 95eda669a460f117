"""Selection methods: each picks ``budget`` corpus rows from what the selection run already holds.

A method is one function ``pick(inputs, budget, rng) -> sorted positions`` registered under its
name with what it needs: the clusters, the sources, a per-example score (``SCORES``), the target
examples. The budget arithmetic lives in ``allocation``; a method only says which groups and
weights to share the budget over. Adding a method is adding one such function here; choosing
another method or budget re-scores nothing. Rankings break ties by corpus order.

``split`` is the source split a method uses when ``cluster.source_split`` is ``auto``: ``equal``
for the paper's methods, ``target`` for the target-aware ones. Clustered methods split by source
when the clusters were fitted per source (``cluster.per_source``).

=========================  ======================================================================
``s2l``                    Algorithm 1 over the trajectory clusters, smallest first
``s2l-target``             the same clusters, each weighted by the share of target examples whose
                           trajectories fall in it (nearest centroid), smoothed
                           (``select.target_smoothing``); sources by the target's mix
``random``                 uniformly at random
``random-per-source``      the budget split over sources (equal: smallest source first), uniformly
                           at random within each: S2L without the clusters
``random-target-sources``  the same with the target set's source mix: target-aware without
                           trajectories
``length``                 the longest responses (response tokens under the proxy's tokenizer)
``embedding-target``       the highest cosine similarity of the mean-pooled last hidden state of the
                           final proxy checkpoint to the target examples' (``select.embedding_rank``:
                           nearest target example, as RDS+, or the target examples' mean)
``full``                   every example (the budget is ignored)
``perplexity-low``         the lowest loss at the last trajectory point
``perplexity-middle``      the middle of the ranking by that loss
``perplexity-high``        the highest loss at the last trajectory point
``confidence``             the least confident: lowest mean gold-token probability over the points
``variability``            the most variable: highest standard deviation of that probability
``learnability``           the largest drop in loss from the first to the last kept point
=========================  ======================================================================
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .allocation import stratified, target_weights

# Per-example scores a method may rank by, and where the selection stage reads them from.
SCORES = {"last_loss": "trajectories", "learnability": "trajectories", "confidence_mean": "trajectories",
          "confidence_std": "trajectories", "response_tokens": "corpus", "target_similarity": "embeddings"}


@dataclass
class Inputs:
    """What methods draw on, for the N corpus rows in idx order (loaded for the method asked)."""

    n: int
    labels: np.ndarray | None = None  # cluster id per row
    n_clusters: int = 0  # K (cluster ids are 0..K-1)
    sources: np.ndarray | None = None  # source code per row, when the method splits the budget by source
    split_weights: list | None = None  # per source code, the resolved source split (None: equal)
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # SCORES values, per row
    target_clusters: np.ndarray | None = None  # the nearest cluster of each target example
    smoothing: float = 0.1  # select.target_smoothing


@dataclass(frozen=True)
class Method:
    name: str
    pick: Callable[[Inputs, int, np.random.Generator], np.ndarray]
    clusters: bool = False  # needs ``Inputs.labels``
    sources: bool = False  # always splits by source (clustered methods do when the clusters are per source)
    split: str = "equal"  # its source split under cluster.source_split: auto
    target: bool = False  # needs the target examples
    score: str | None = None  # the SCORES entry it ranks by
    full: bool = False  # takes every row whatever the budget


METHODS: dict[str, Method] = {}


def method(name: str, *, clusters: bool = False, sources: bool = False, split: str = "equal", target: bool = False,
           score: str | None = None, full: bool = False):
    """Register ``pick`` as method ``name``."""
    if score is not None and score not in SCORES:
        raise ValueError(f"method {name!r}: unknown score {score!r}; known: {sorted(SCORES)}")

    def register(pick):
        METHODS[name] = Method(name, pick, clusters, sources, split, target, score, full)
        return pick
    return register


def get(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown selection method {name!r}; valid: {sorted(METHODS)}")
    return METHODS[name]


def lowest(values: np.ndarray, budget: int) -> np.ndarray:
    return np.sort(np.argsort(values, kind="stable")[:budget])


def highest(values: np.ndarray, budget: int) -> np.ndarray:
    return np.sort(np.argsort(-values, kind="stable")[:budget])


def middle(values: np.ndarray, budget: int) -> np.ndarray:
    start = (len(values) - budget) // 2
    return np.sort(np.argsort(values, kind="stable")[start:start + budget])


@method("s2l", clusters=True)
def s2l(inputs: Inputs, budget: int, rng: np.random.Generator) -> np.ndarray:
    return stratified(inputs.labels, inputs.sources, budget, rng, split_weights=inputs.split_weights)


@method("s2l-target", clusters=True, split="target", target=True)
def s2l_target(inputs: Inputs, budget: int, rng: np.random.Generator) -> np.ndarray:
    counts = np.bincount(inputs.target_clusters, minlength=inputs.n_clusters)
    return stratified(inputs.labels, inputs.sources, budget, rng, target_weights(counts, inputs.smoothing),
                      inputs.split_weights)


@method("random")
def random(inputs: Inputs, budget: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(inputs.n, budget, replace=False))


@method("random-per-source", sources=True)
def random_per_source(inputs: Inputs, budget: int, rng: np.random.Generator) -> np.ndarray:
    one_cluster = np.zeros(inputs.n, np.int64)  # one cluster per source
    return stratified(one_cluster, inputs.sources, budget, rng, split_weights=inputs.split_weights)


method("random-target-sources", sources=True, split="target", target=True)(random_per_source)


@method("full", full=True)
def full(inputs: Inputs, budget: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(inputs.n)


# Methods that rank the rows by one score and keep the budget's worth from one end (or the middle):
# name -> (score, which rows).
RANKED = {
    "length": ("response_tokens", highest),  # the longest responses (arXiv 2410.09335)
    "embedding-target": ("target_similarity", highest),  # RDS+ (arXiv 2503.01807)
    "perplexity-low": ("last_loss", lowest),
    "perplexity-middle": ("last_loss", middle),
    "perplexity-high": ("last_loss", highest),
    "confidence": ("confidence_mean", lowest),
    "variability": ("confidence_std", highest),
    "learnability": ("learnability", highest),
}


def _ranked(score: str, rows) -> Callable[[Inputs, int, np.random.Generator], np.ndarray]:
    def pick(inputs: Inputs, budget: int, rng: np.random.Generator) -> np.ndarray:
        return rows(inputs.scores[score], budget)
    return pick


for _name, (_score, _rows) in RANKED.items():
    method(_name, score=_score, target=_name.endswith("-target"))(_ranked(_score, _rows))
