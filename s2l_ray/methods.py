"""Selection methods: each picks ``budget`` corpus rows from what the selection run already holds.

A method is one function ``pick(inputs, budget, rng) -> sorted positions`` registered under its
name with what it needs: the clusters (``s2l``), the sources, a per-example trajectory score
from ``trajectories.FEATURES``, or nothing. Adding a method is adding one such function here;
choosing another method or budget re-scores nothing. Rankings break ties by corpus order.

=====================  ==========================================================================
``s2l``                Algorithm 1 over the trajectory clusters (``sampling.s2l_select``)
``random``             uniformly at random
``random-per-source``  the budget split over sources as S2L's per-source option does (smallest
                       source first), uniformly at random within each: S2L without the clusters
``full``               every example (the budget is ignored)
``perplexity-low``     the lowest loss at the last trajectory point
``perplexity-middle``  the middle of the ranking by that loss
``perplexity-high``    the highest loss at the last trajectory point
``confidence``         the least confident: lowest mean gold-token probability over the points
``variability``        the most variable: highest standard deviation of that probability
``learnability``       the largest drop in loss from the first to the last kept point
=====================  ==========================================================================
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Inputs:
    """What methods draw on, for the N corpus rows in idx order (loaded for the method asked)."""

    n: int
    labels: np.ndarray | None = None  # cluster id per row (methods that need clusters)
    sources: np.ndarray | None = None  # source code per row, for stratified methods (and per-source s2l)
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # trajectories.FEATURES values


@dataclass(frozen=True)
class Method:
    name: str
    pick: Callable[[Inputs, int, np.random.Generator], np.ndarray]
    clusters: bool = False  # needs ``Inputs.labels``
    sources: bool = False  # needs ``Inputs.sources``
    score: str | None = None  # the trajectories.FEATURES entry it ranks by
    full: bool = False  # takes every row whatever the budget


METHODS: dict[str, Method] = {}


def method(name: str, *, clusters: bool = False, sources: bool = False, score: str | None = None,
           full: bool = False):
    """Register ``pick`` as method ``name``."""
    def register(pick):
        METHODS[name] = Method(name, pick, clusters, sources, score, full)
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
    from .sampling import s2l_select

    return s2l_select(inputs.labels, budget, rng, inputs.sources)


@method("random")
def random(inputs: Inputs, budget: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(inputs.n, budget, replace=False))


@method("random-per-source", sources=True)
def random_per_source(inputs: Inputs, budget: int, rng: np.random.Generator) -> np.ndarray:
    from .sampling import s2l_select

    return s2l_select(np.zeros(inputs.n, np.int64), budget, rng, inputs.sources)  # one cluster per source


@method("full", full=True)
def full(inputs: Inputs, budget: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(inputs.n)


@method("perplexity-low", score="last_loss")
def perplexity_low(inputs: Inputs, budget: int, rng: np.random.Generator) -> np.ndarray:
    return lowest(inputs.scores["last_loss"], budget)


@method("perplexity-middle", score="last_loss")
def perplexity_middle(inputs: Inputs, budget: int, rng: np.random.Generator) -> np.ndarray:
    return middle(inputs.scores["last_loss"], budget)


@method("perplexity-high", score="last_loss")
def perplexity_high(inputs: Inputs, budget: int, rng: np.random.Generator) -> np.ndarray:
    return highest(inputs.scores["last_loss"], budget)


@method("confidence", score="confidence_mean")
def confidence(inputs: Inputs, budget: int, rng: np.random.Generator) -> np.ndarray:
    return lowest(inputs.scores["confidence_mean"], budget)


@method("variability", score="confidence_std")
def variability(inputs: Inputs, budget: int, rng: np.random.Generator) -> np.ndarray:
    return highest(inputs.scores["confidence_std"], budget)


@method("learnability", score="learnability")
def learnability(inputs: Inputs, budget: int, rng: np.random.Generator) -> np.ndarray:
    return highest(inputs.scores["learnability"], budget)
