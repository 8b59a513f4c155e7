"""The gated, whitened reward of RECIPE.md section 8, on hand-computed values."""

import numpy as np
import pytest

from steps.gated_reward import gate_quality, gated_reward, logit, ppo_reward, sigmoid, whiten


def test_gate_takes_safety_for_safety_prompts_and_unsafe_looking_answers():
    rh = np.array([0.9, 0.9, 0.9, 0.2])
    rs = np.array([0.8, 0.1, 0.5, 0.9])
    is_safety = np.array([True, False, False, False])
    # 0: safety prompt -> Rs; 1: Rs 0.1 < 0.15 -> Rs; 2: helpful prompt, safe-looking -> Rh; 3: Rh
    assert gated_reward(rh, rs, is_safety, 0.15).tolist() == [0.8, 0.1, 0.9, 0.2]
    assert gated_reward(rh, rs, is_safety, 0.6).tolist() == [0.8, 0.1, 0.5, 0.2]  # 0.5 < 0.6 now gated


def test_logit_inverts_sigmoid_and_stays_finite_at_the_ends():
    x = np.array([-3.0, 0.0, 2.5])
    assert logit(sigmoid(x)) == pytest.approx(x)
    assert np.isfinite(logit(np.array([0.0, 1.0]))).all()
    assert logit(np.array([0.5]))[0] == 0.0


def test_whiten_and_the_ppo_reward():
    w = whiten(np.array([1.0, 2.0, 3.0, 4.0]))
    assert w.mean() == pytest.approx(0.0) and w.std() == pytest.approx(1.0)
    r = ppo_reward(np.array([0.9, 0.6]), np.array([0.5, 0.5]), np.array([False, False]), 0.15)
    z = logit(np.array([0.9, 0.6]))
    assert r == pytest.approx((z - z.mean()) / z.std())


def test_gate_precision_and_recall():
    q = gate_quality(rs_unsafe=np.array([0.05, 0.1, 0.3, 0.6]), rs_safe=np.array([0.9, 0.12, 0.7]), threshold=0.15)
    assert q["gate.recall"] == pytest.approx(2 / 4)  # two of four unsafe answers flagged
    assert q["gate.precision"] == pytest.approx(2 / 3)  # one safe answer flagged too
