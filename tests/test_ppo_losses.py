"""PPO's math against hand-computed examples (steps/ppo/losses.py)."""

import math

import numpy as np
import pytest
import torch

from steps.gated_reward import ppo_reward
from steps.ppo.losses import (
    EarlyStopping,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)

T = torch.tensor


def test_kl_penalty_is_minus_beta_times_the_log_ratio_on_response_tokens_only():
    pen = kl_penalty(T([[-1.0, -2.0, -3.0]]), T([[-1.5, -1.0, -9.0]]), 0.1, T([[True, True, False]]))
    assert torch.allclose(pen, T([[-0.05, 0.1, 0.0]]))


def test_the_gated_whitened_reward_lands_on_each_response_s_last_token():
    # two responses: the first helpful-gated (Rs 0.9 >= 0.15, not a safety prompt: Rh 0.8), the
    # second a safety prompt (Rs 0.3): logits 1.386 and -0.847, whitened to +1 and -1
    score = T(ppo_reward(np.array([0.8, 0.9]), np.array([0.9, 0.3]), np.array([False, True]), 0.15))
    assert torch.allclose(score, T([1.0, -1.0], dtype=torch.float64), atol=1e-6)
    logp, ref = T([[-1.0, -2.0, -1.0], [-1.0, -1.0, -1.0]]), T([[-1.5, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    mask = T([[True, True, False], [True, True, True]])
    r = token_rewards(score.float(), logp, ref, mask, beta=0.1)
    assert torch.allclose(r, T([[-0.05, 0.1 + 1.0, 0.0], [0.0, 0.0, -1.0]]))


def test_the_reward_lands_on_the_last_response_token_after_a_prompt():
    # as the trainer builds them: prompt positions (2 and 3 of them) are not actions, then the
    # response (2 tokens, then padding). The reward goes to the response's last token, never to
    # a prompt position (where GAE would drop it)
    mask = T([[False, False, True, True, False, False], [False, False, False, True, True, False]])
    zeros = torch.zeros(2, 6)
    r = token_rewards(T([1.0, -1.0]), zeros, zeros, mask, beta=0.1)
    assert torch.equal(r, T([[0.0, 0, 0, 1, 0, 0], [0, 0, 0, 0, -1, 0]]))
    adv, _ = gae(r, torch.zeros(2, 6), mask, gamma=1.0, lam=1.0)
    assert torch.equal(adv, T([[0.0, 0, 1, 1, 0, 0], [0, 0, 0, -1, -1, 0]]))  # every action sees it


def test_gae_matches_a_hand_computed_example():
    # row 0 (3 tokens): delta = [0.6-0.5, 0.7-0.6, 1-0.7] = [0.1, 0.1, 0.3]; lambda 0.5:
    # A2 = 0.3, A1 = 0.1 + 0.5 * 0.3 = 0.25, A0 = 0.1 + 0.5 * 0.25 = 0.225
    # row 1 ends after 2 tokens: the value 9 after its end is ignored (episode over):
    # A1 = 2 - 1 = 1, A0 = 0 + 1 - 1 + 0.5 * 1 = 0.5
    rewards = T([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = T([[0.5, 0.6, 0.7], [1.0, 1.0, 9.0]])
    mask = T([[True, True, True], [True, True, False]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert torch.allclose(adv, T([[0.225, 0.25, 0.3], [0.5, 1.0, 0.0]]))
    assert torch.allclose(ret, T([[0.725, 0.85, 1.0], [1.5, 2.0, 0.0]]))


def test_gae_with_lambda_one_is_the_monte_carlo_return_minus_the_value():
    rewards, values = T([[0.1, -0.2, 1.0]]), T([[0.3, 0.2, 0.1]])
    adv, ret = gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), gamma=1.0, lam=1.0)
    assert torch.allclose(ret, T([[0.9, 0.8, 1.0]]))
    assert torch.allclose(adv, T([[0.6, 0.6, 0.9]]))


def test_advantage_normalisation_whitens_only_the_real_tokens():
    out = masked_whiten(T([[1.0, 2.0], [3.0, 100.0]]), T([[True, True], [True, False]]))
    s = math.sqrt(1.5)  # (x - 2) / sqrt(2/3)
    assert torch.allclose(out, T([[-s, 0.0], [s, 0.0]]), atol=1e-6)


def test_clipped_surrogate_takes_the_pessimistic_term_and_counts_clipping():
    # ratios 1.5, 1.5, 0.5 with advantages +1, -1, +1, clip 0.2:
    # token 0: min(1.5, 1.2) = 1.2 (clipped); token 1: min(-1.5, -1.2) = -1.5; token 2: min(0.5, 0.8) = 0.5
    logp = torch.log(T([[1.5, 1.5, 0.5]])).requires_grad_()
    loss, stats = policy_loss(logp, torch.zeros(1, 3), T([[1.0, -1.0, 1.0]]), torch.ones(1, 3, dtype=torch.bool), 0.2)
    assert loss.item() == pytest.approx(-(1.2 - 1.5 + 0.5))
    assert stats["clipped"].item() == 1
    k3 = 2 * (0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))
    assert stats["approx_kl"].item() == pytest.approx(k3, rel=1e-5)
    loss.backward()
    # the clipped token gets no gradient; the others -A * ratio (d ratio / d logp = ratio)
    assert torch.allclose(logp.grad, T([[0.0, 1.5, -0.5]]))


def test_policy_loss_ignores_padding_tokens():
    mask = T([[True, False]])
    loss, stats = policy_loss(T([[0.0, 5.0]]), T([[0.0, 0.0]]), T([[2.0, 7.0]]), mask, 0.2)
    assert loss.item() == pytest.approx(-2.0) and stats["clipped"].item() == 0 and stats["approx_kl"].item() == 0


def test_value_loss_clips_moves_away_from_the_rollout_value():
    mask = torch.ones(1, 1, dtype=torch.bool)
    # old 0, target 1, new 0.5: the clipped value 0.2 is further from the target: 0.5 * 0.8^2
    assert value_loss(T([[0.5]]), T([[0.0]]), T([[1.0]]), mask, 0.2).item() == pytest.approx(0.32)
    # a move within the clip range is the plain squared error: 0.5 * 0.9^2
    assert value_loss(T([[0.1]]), T([[0.0]]), T([[1.0]]), mask, 0.2).item() == pytest.approx(0.405)
    # masked tokens contribute nothing
    assert value_loss(T([[3.0]]), T([[0.0]]), T([[1.0]]), ~mask, 0.2).item() == 0


def test_entropy_and_explained_variance():
    assert entropy_from_logits(torch.zeros(2, 4)).tolist() == pytest.approx([math.log(4)] * 2)
    ret, mask = T([[1.0, 2.0, 3.0]]), torch.ones(1, 3, dtype=torch.bool)
    assert explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 3), 2.0), ret, mask) == pytest.approx(0.0)
    assert explained_variance(-ret, ret, mask) < 0


def test_early_stopping_on_a_held_out_reward_plateau():
    stop = EarlyStopping(patience=2, min_delta=0.01)
    assert [stop.plateaued(i, r) for i, r in enumerate([0.1, 0.2, 0.205, 0.3, 0.29, 0.295])] == \
        [False, False, False, False, False, True]
    assert stop.best_iteration == 3 and "0.3000" in stop.reason
    again = EarlyStopping(patience=2, min_delta=0.01)
    again.load(stop.state())
    assert again.best == stop.best and again.bad_evals == 2


def test_blow_up_guard_on_kl_and_response_length():
    stop = EarlyStopping(patience=5, kl_stop=0.5, length_ratio=2.0)
    assert not stop.blew_up(0, 0.0, 10.0)  # the first call records the starting length
    assert not stop.blew_up(1, 0.4, 19.0)
    assert stop.blew_up(2, 0.6, 12.0) and "kl_stop" in stop.reason
    longer = EarlyStopping(patience=5, kl_stop=0.5, length_ratio=2.0)
    longer.blew_up(0, 0.0, 10.0)
    assert longer.blew_up(1, 0.1, 25.0) and "length" in longer.reason
    assert EarlyStopping(patience=5, kl_stop=0.5).blew_up(0, float("nan"), 5.0)
