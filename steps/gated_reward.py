"""The reward LLaMA-2's RLHF optimises (RECIPE.md section 8), shared by rejection sampling
(to pick the best of K samples) and PPO (as the per-response reward): one function, so both
select and optimise the same thing.

    Rc = Rs   if the prompt is a safety prompt or Rs < threshold (0.15 in the paper)
         Rh   otherwise
    R~c = WHITEN(LOGIT(Rc))

Rs and Rh are the safety and helpfulness reward models' outputs as probabilities (the sigmoid
of their scalar scores). The paper calibrated 0.15 on its own reward models (precision 0.89,
recall 0.55 on Meta Safety): `gate_quality` measures the gate on held-out safety pairs so the
threshold can be checked for other reward models.
"""

from __future__ import annotations

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def gated_reward(rh: np.ndarray, rs: np.ndarray, is_safety: np.ndarray, threshold: float) -> np.ndarray:
    """Rc per response from helpfulness and safety probabilities (same shape)."""
    rh, rs = np.asarray(rh, dtype=np.float64), np.asarray(rs, dtype=np.float64)
    use_safety = np.asarray(is_safety, dtype=bool) | (rs < threshold)
    return np.where(use_safety, rs, rh)


def logit(p: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """log(p / (1 - p)), with p clipped away from 0 and 1 (an RM probability of exactly 1 would
    otherwise become an infinite reward)."""
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


def whiten(x: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Zero mean, unit variance over the batch: the reward scale PPO's updates see stays fixed
    as the reward models and the policy change."""
    x = np.asarray(x, dtype=np.float64)
    return (x - x.mean()) / (x.std() + eps)


def ppo_reward(rh: np.ndarray, rs: np.ndarray, is_safety: np.ndarray, threshold: float) -> np.ndarray:
    """R~c = WHITEN(LOGIT(Rc)) over a batch of responses."""
    return whiten(logit(gated_reward(rh, rs, is_safety, threshold)))


def gate_quality(rs_unsafe: np.ndarray, rs_safe: np.ndarray, threshold: float) -> dict[str, float]:
    """How well `Rs < threshold` flags unsafe responses: precision and recall, given the safety
    RM's probabilities on responses known to be unsafe and on responses known to be safe."""
    flagged_unsafe = int((np.asarray(rs_unsafe) < threshold).sum())
    flagged_safe = int((np.asarray(rs_safe) < threshold).sum())
    flagged = flagged_unsafe + flagged_safe
    return {"gate.precision": flagged_unsafe / flagged if flagged else 1.0,
            "gate.recall": flagged_unsafe / max(len(rs_unsafe), 1)}
