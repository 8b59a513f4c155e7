"""Win rates with ties and their bootstrap intervals, and champion promotion, on hand-made data."""

import numpy as np
import pytest

from steps.win_rate import outcomes, promote, win_rate


def test_ties_count_half():
    a = np.array([1.0, 0.5, 0.2, 0.7])
    b = np.array([0.5, 0.5, 0.9, 0.1])
    assert outcomes(a, b).tolist() == [1.0, 0.5, 0.0, 1.0]
    assert win_rate(a, b)["rate"] == pytest.approx(2.5 / 4)


def test_bootstrap_interval_brackets_the_rate_and_narrows_with_more_prompts():
    rng = np.random.default_rng(0)
    small = win_rate(rng.random(40) + 0.1, rng.random(40))
    big = win_rate(rng.random(4000) + 0.1, rng.random(4000))
    for r in (small, big):
        assert r["lo"] <= r["rate"] <= r["hi"]
    assert (big["hi"] - big["lo"]) < (small["hi"] - small["lo"]) / 5
    # a true win rate of 0.5 + 0.1 - 0.1^2/2 = 0.595 for uniform scores shifted by 0.1
    assert big["lo"] < 0.595 < big["hi"]
    all_wins = win_rate(np.ones(30), np.zeros(30))
    assert all_wins["rate"] == all_wins["lo"] == all_wins["hi"] == 1.0


def test_champion_moves_unless_the_new_version_clearly_loses():
    assert promote({"rate": 0.55, "lo": 0.45, "hi": 0.65}, tolerance=0.05)
    assert promote({"rate": 0.44, "lo": 0.35, "hi": 0.46}, tolerance=0.05)  # within tolerance
    assert not promote({"rate": 0.30, "lo": 0.22, "hi": 0.38}, tolerance=0.05)
    with pytest.raises(ValueError):
        win_rate(np.array([]), np.array([]))
