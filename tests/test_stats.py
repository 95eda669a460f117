"""The paired bootstrap on hand-made cases whose answer is known."""
import numpy as np
import pytest

from s2l_ray.stats import bootstrap_interval, paired_differences, verdict


def test_a_constant_difference_has_a_degenerate_interval():
    y = np.random.default_rng(0).integers(0, 2, (3, 50)).astype(float)
    mean, low, high = bootstrap_interval(y + 0.25, y)
    assert mean == low == high == pytest.approx(0.25)
    assert paired_differences(y + 0.25, y).tolist() == pytest.approx([0.25] * 3)


def test_pairing_removes_what_both_methods_share():
    """Items differ wildly in difficulty, the methods not at all: paired, the interval is exactly 0."""
    hard = np.random.default_rng(1).random((3, 200)) * 10
    assert bootstrap_interval(hard, hard) == (0.0, 0.0, 0.0)


def test_the_interval_matches_the_normal_approximation():
    """Differences of +1 / -1 with equal chance over 4,000 items and one seed: the mean's 95% interval is
    +-1.96 / sqrt(n) around it."""
    rng = np.random.default_rng(2)
    d = rng.choice([-1.0, 1.0], (1, 4000))
    mean, low, high = bootstrap_interval(d, np.zeros_like(d), draws=4000)
    half = 1.96 * d.std() / np.sqrt(d.size)
    assert low == pytest.approx(mean - half, abs=0.2 * half) and high == pytest.approx(mean + half, abs=0.2 * half)


def test_seeds_are_resampled_too():
    """Every item agrees within a seed, but the seeds disagree: the spread over seeds widens the interval."""
    d = np.repeat(np.array([[1.0], [-1.0], [0.5]]), 100, axis=1)
    mean, low, high = bootstrap_interval(d, np.zeros_like(d))
    assert mean == pytest.approx(1 / 6) and low == pytest.approx(-1.0) and high == pytest.approx(1.0)


def test_verdicts():
    assert verdict(0.01, 0.2) == "better" and verdict(-0.2, -0.01) == "worse" and verdict(-0.1, 0.1) == "no difference"
    assert verdict(-0.3, -0.1, lower_is_better=True) == "better"  # a loss that fell
    with pytest.raises(ValueError, match="one shape"):
        bootstrap_interval(np.zeros((2, 3)), np.zeros((3, 2)))
