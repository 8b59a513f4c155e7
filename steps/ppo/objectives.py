"""The policy's and the critic's `Objective`s for the persistent learner (steps/engine/learner.py).

Rollout rows (numpy columns, right-padded to the batch's width W; causal attention keeps the
padding out of every real token's output):
    tokens       [W]    prompt + response (+ </s> when the response ended)
    action_mask  [W-1]  true where position t predicts a response token t+1 (an action)
    old_logp     [W-1]  log pi_old(token t+1) at rollout time          (policy)
    adv          [W-1]  whitened GAE advantages                         (policy)
    old_values   [W-1]  V_old(position t) at rollout time               (critic)
    returns      [W-1]  GAE returns, the critic's targets               (critic)

The critic is a SEPARATE network initialised from the helpfulness reward model (the paper
initialises it "from the reward model"), not a value head on the policy: the RM's trunk already
reads what makes an answer good, so the first values correlate with the returns instead of
being noise; the policy starts from the chat model, whose features were never trained to
judge; and a shared trunk would let the value loss pull the policy's weights (and the two
need different learning rates). It costs a second model's memory, which at 70B is the usual
OpenRLHF/TRL layout. The helpfulness RM rather than the safety RM: Rc is Rh for most prompts.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from model.config import ModelConfig
from model.llama import Transformer
from model.reward import RewardModel
from steps.engine.objective import Objective
from steps.ppo.losses import entropy_from_logits, policy_loss, value_loss

POLICY_COLUMNS = ["tokens", "action_mask", "old_logp", "adv"]
CRITIC_COLUMNS = ["tokens", "action_mask", "old_values", "returns"]


class ValueModel(RewardModel):
    """The reward model's network read at every position: V(s_t) = score(h_t). Same parameter
    names as RewardModel, so a reward model's weights load into it as they are."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        h = super(RewardModel, self).forward(tokens, return_hidden=True)  # the Transformer trunk
        return self.score(h).squeeze(-1).float()  # [B, T]


class ScaledPolicy(Transformer):
    """The policy with one more learnable number, `log_scale` (starting at 0): logits x
    exp(log_scale), i.e. a learned inverse temperature (`rlhf.ppo.logit_scale`, tiny preset).

    Why: a policy sharpens or flattens along one direction of its weights, a uniform change of
    the output norm's gains. Adam updates each gain on its own noisy per-gain gradient, so that
    direction moves as a random walk: on the tiny preset the 128 gains spread by about
    lr * sqrt(steps) while their mean moved little, and the per-gain noise changed greedy
    answers. The scalar gets the summed signal. It is a preconditioner, not a restriction:
    every weight still trains (README "PPO").

    Leaving the learner (the sampler's weights, the export) the scale folds into `norm.weight`:
    the output layer is linear, so output(s * g * x) = s * output(g * x), and what leaves is a
    plain Transformer with the same logits. `log_scale` is the module's own parameter, so
    named_parameters() yields it first and the streamed export sees it before norm.weight."""

    fresh_parameters = ("log_scale",)  # not in the initial weights: starts at 0

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.log_scale = torch.nn.Parameter(torch.zeros(1))
        self._folded_scale: float | None = None

    def forward(self, tokens: torch.Tensor, **kw) -> torch.Tensor:  # type: ignore[override]
        if kw.get("targets") is not None or kw.get("return_hidden"):
            raise ValueError("the PPO policy returns scaled logits only")
        return super().forward(tokens, **kw) * self.log_scale.float().exp()  # fp32 logits, as the fold

    def export_tensor(self, name: str, full: torch.Tensor) -> torch.Tensor | None:
        if name == "log_scale":
            self._folded_scale = float(full.exp())
            return None
        if name == "norm.weight":
            if self._folded_scale is None:
                raise RuntimeError("norm.weight came before log_scale: the fold would be lost")
            scale, self._folded_scale = self._folded_scale, None  # one fold per export
            return full * scale
        return full


def build_policy(cfg: ModelConfig, logit_scale: bool = False):
    return ScaledPolicy(cfg) if logit_scale else Transformer(cfg)


def build_critic(cfg: ModelConfig):
    return ValueModel(cfg)


def collate(rows: dict) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in rows.items():
        a = np.stack(v) if v.dtype == object else np.asarray(v)
        out[k] = torch.tensor(a)  # a copy: arrays from Ray's object store are read-only
    return out


def action_weight(batch: dict[str, torch.Tensor]) -> float:
    """Loss units: response tokens."""
    return float(batch["action_mask"].sum())


def token_logp(module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log pi(token t+1 | tokens <= t) [B, W-1]: an `infer` function (old log-probs)."""
    tokens = batch["tokens"]
    logits = module(tokens)[:, :-1].float()
    return logits.log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)


def token_values(module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """V(position t) [B, W-1], aligned with the action at t+1: an `infer` function."""
    return module(batch["tokens"])[:, :-1]


def policy_objective_loss(module, batch: dict[str, torch.Tensor], clip: float):
    tokens, mask = batch["tokens"], batch["action_mask"].bool()
    logits = module(tokens)[:, :-1].float()
    logp = logits.log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    loss, stats = policy_loss(logp, batch["old_logp"], batch["adv"], mask, clip)
    with torch.no_grad():
        entropy = (entropy_from_logits(logits) * mask).sum()
    return loss, {"clipped": stats["clipped"], "approx_kl": stats["approx_kl"], "entropy": entropy}


def critic_objective_loss(module, batch: dict[str, torch.Tensor], clip: float):
    mask = batch["action_mask"].bool()
    values = module(batch["tokens"])[:, :-1]
    return value_loss(values, batch["old_values"], batch["returns"], mask, clip), {}


def policy_objective(cfg: ModelConfig, init_weights: str, clip: float, logit_scale: bool = False) -> Objective:
    return Objective(name="ppo-policy", build_module=partial(build_policy, cfg, logit_scale),
                     loss=partial(policy_objective_loss, clip=clip), train_files=[], columns=POLICY_COLUMNS,
                     collate=collate, weight=action_weight, mean_metrics=("clipped", "approx_kl", "entropy"),
                     init_weights=init_weights, model_cfg=cfg)


def critic_objective(cfg: ModelConfig, init_weights: str, clip: float) -> Objective:
    return Objective(name="ppo-critic", build_module=partial(build_critic, cfg),
                     loss=partial(critic_objective_loss, clip=clip), train_files=[], columns=CRITIC_COLUMNS,
                     collate=collate, weight=action_weight, init_weights=init_weights, model_cfg=cfg)
