"""PPO's math (RECIPE.md section 8), pure torch, no model and no Ray: what the learners and
the rollout loop compute, each function testable against a hand-computed example.

Shapes: [B, T] over the positions of B rollouts, with `mask` [B, T] true on real response tokens
(prompt tokens and padding are not actions: in the trainer each row's trues start after its
prompt and end where its response does). Sums, not means, come out of the losses: the shared engine divides by the
number of loss units (here response tokens) of the whole optimizer step across micro-batches
and ranks (steps/engine/objective.py), so a long response weighs by its tokens.

    reward per token   r_t = -beta * (log pi(a_t) - log pi_ref(a_t))      (the KL penalty)
                              + R~c  on the last response token only        (the gated reward)
    advantages         GAE(gamma, lambda) over r_t and the critic's values, then whitened
    policy loss        -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)
    value loss         0.5 * max((V - G)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - G)^2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, shift_mean: bool = True) -> torch.Tensor:
    """Zero mean (unless shift_mean=False), unit variance over the masked entries; masked-out
    entries become 0 so they never leak into a loss."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last true entry ([B]); 0 for an empty row. Rows need not be prefixes:
    the trainer's masks span prompt + response positions and start after the prompt."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (mask.long() * positions).amax(1)


def kl_penalty(logp: torch.Tensor, logp_ref: torch.Tensor, beta: float, mask: torch.Tensor) -> torch.Tensor:
    """-beta * (log pi(a_t) - log pi_ref(a_t)) per response token: the sampled-token estimate
    of the KL to the reference, whose sum over a response is KL(pi || pi_ref) in expectation."""
    return -beta * (logp - logp_ref) * mask.to(logp.dtype)


def token_rewards(score: torch.Tensor, logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor,
                  beta: float) -> torch.Tensor:
    """The per-token reward: the KL penalty on every response token, plus the response's
    (whitened, gated) reward `score` [B] on its last token, where the reward model read it."""
    r = kl_penalty(logp, logp_ref, beta, mask)
    rows = torch.arange(r.shape[0], device=r.device)
    has = mask.any(1)
    r[rows[has], last_index(mask)[has]] += score[has].to(r.dtype)
    return r


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) -> (advantages, returns), [B, T].

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lambda * A_{t+1}, with V and A
    zero after a response's last token (the episode ends there). Returns G_t = A_t + V_t are the
    critic's targets. gamma 1: the reward is one score at the end of a short episode, so it is
    not discounted; lambda 0.95 trades the critic's bias against the variance of the reward."""
    m = mask.to(rewards.dtype)
    values = values * m
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        adv[:, t] = next_adv
        next_value = values[:, t]
    return adv, (adv + values) * m


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate, SUMMED over response tokens, and per-token sums of the diagnostics:
    `clipped` (tokens whose ratio left [1-clip, 1+clip] in the direction that matters, i.e.
    where the clipped term was the one taken) and `approx_kl` (Schulman's k3 estimator of
    KL(old || new): ratio - 1 - log ratio, non-negative and unbiased)."""
    m = mask.to(logp.dtype)
    log_ratio = (logp - old_logp) * m
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip, 1 + clip) * adv
    loss = -(torch.minimum(unclipped, clipped) * m).sum()
    with torch.no_grad():
        was_clipped = ((clipped < unclipped).to(logp.dtype) * m).sum()
        approx_kl = (((ratio - 1) - log_ratio) * m).sum()
    return loss, {"clipped": was_clipped, "approx_kl": approx_kl}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> torch.Tensor:
    """Clipped value loss, SUMMED over response tokens: the critic may not move a value further
    than `clip` from the one it predicted at rollout time in a way that helps the fit."""
    m = mask.to(values.dtype)
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * (torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2) * m).sum()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's next-token distribution ([..., V] -> [...])."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(G - V) / Var(G) over the masked tokens: 1 is a perfect critic, 0 one no better
    than predicting the mean return, negative one worse than that."""
    var_g = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return float(1 - var_d / var_g) if float(var_g) > 0 else float("nan")


@dataclass
class EarlyStopping:
    """Stop PPO when the held-out reward has not improved by `min_delta` over its best for
    `patience` evaluations (the paper stops on held-out prompts), or at once when the policy
    runs away from the reference: KL to the reference above `kl_stop`, or the mean response
    length above `length_ratio` times the starting length (both signs of reward hacking).
    `best_iteration` names the checkpoint to keep: the last one before a blow-up."""

    patience: int
    min_delta: float = 0.0
    kl_stop: float = math.inf
    length_ratio: float = math.inf
    best: float = -math.inf
    best_iteration: int = 0
    bad_evals: int = 0
    start_length: float | None = None
    reason: str = ""
    history: list = field(default_factory=list)

    def blew_up(self, iteration: int, kl: float, length: float) -> bool:
        """Checked every iteration, on the rollout's KL to the reference and mean length."""
        if self.start_length is None:
            self.start_length = max(length, 1.0)
        if not math.isfinite(kl) or kl > self.kl_stop:
            self.reason = (f"KL to the reference {kl:.4f} exceeds kl_stop {self.kl_stop} at iteration {iteration}: "
                           f"the policy is drifting away from the reference (reward hacking?)")
        elif length > self.length_ratio * self.start_length:
            self.reason = (f"mean response length {length:.1f} exceeds {self.length_ratio} x the starting "
                           f"{self.start_length:.1f} at iteration {iteration} (reward hacking by length?)")
        return bool(self.reason)

    def plateaued(self, iteration: int, reward: float) -> bool:
        """Checked after each held-out evaluation."""
        self.history.append((iteration, reward))
        if reward > self.best + self.min_delta:
            self.best, self.best_iteration, self.bad_evals = reward, iteration, 0
            return False
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            self.reason = (f"held-out reward has not improved on {self.best:.4f} (iteration {self.best_iteration}) "
                           f"for {self.bad_evals} evaluations")
            return True
        return False

    def state(self) -> dict:
        return {k: getattr(self, k) for k in ("best", "best_iteration", "bad_evals", "start_length", "reason",
                                              "history")}

    def load(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, [tuple(x) for x in v] if k == "history" else v)
