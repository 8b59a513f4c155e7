"""Pairwise win rates between chat models on the same prompts (RECIPE.md section 9).

Model A wins a prompt when its answer scores higher than B's under the judge; ties count half.
The interval is a percentile bootstrap over prompts (the prompts are the sample: the same
resampled prompts for both models keep the comparison paired). Champion promotion: the new
version takes the `champion` alias unless it loses to the current champion by more than the
tolerance, judged by the interval's upper bound, so noise alone never demotes a good model.
"""

from __future__ import annotations

import numpy as np


def outcomes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per prompt: 1 when A's score beats B's, 0.5 on a tie, 0 when B's beats A's."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


def win_rate(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """{"rate", "lo", "hi", "n"}: A's win rate over B with a bootstrap `level` interval."""
    o = outcomes(a, b)
    if len(o) == 0:
        raise ValueError("win rate of zero prompts")
    rng = np.random.default_rng(seed)
    boots = o[rng.integers(0, len(o), (n_boot, len(o)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return {"rate": float(o.mean()), "lo": float(np.percentile(boots, tail)),
            "hi": float(np.percentile(boots, 100 - tail)), "n": len(o)}


def promote(vs_champion: dict, tolerance: float) -> bool:
    """Whether the new version becomes champion: it does not lose to the current champion
    beyond `tolerance` (the upper bound of its win rate is at least 0.5 - tolerance)."""
    return vs_champion["hi"] >= 0.5 - tolerance
