"""PPO's config section (`rlhf.ppo`); defaults are the paper's (RECIPE.md section 8)."""

from __future__ import annotations

from pydantic import Field, model_validator

from model.config import Section
from steps.engine.config import OptimConfig, StepResources, TrainConfig


class PPOConfig(Section):
    # the policy learner; train.global_batch_size = rollouts per PPO iteration (512 in the paper)
    # 64 GPUs x micro-batch 1 = one mini-batch of 64 rollouts per gradient step (the paper)
    train: TrainConfig = TrainConfig(global_batch_size=512, micro_batch_size=1, num_workers=64,
                                     use_gpu=True, gpus_per_worker=1, cpus_per_worker=8)
    optim: OptimConfig = OptimConfig(lr=1e-6, schedule="constant", warmup_steps=0)
    # the critic learner (a separate network from the helpfulness RM); None: as the policy's
    critic_train: TrainConfig | None = None
    critic_optim: OptimConfig | None = None
    mini_batch_size: int = Field(64, ge=1)  # rollouts per gradient step (one step per mini-batch)
    ppo_epochs: int = Field(1, ge=1)  # passes over each iteration's rollouts
    # the first iterations update only the critic (OpenRLHF's freezing_actor_steps): it starts
    # on the reward model's logit scale, not on the whitened reward's, and its first advantages
    # would be mostly its own error
    freeze_policy_iterations: int = Field(0, ge=0)
    # the policy learns one logit scale beside its weights (steps/ppo/objectives.py ScaledPolicy),
    # folded into the output norm when weights leave the learner; off in the paper's presets
    logit_scale: bool = False
    samples_per_prompt: int = Field(1, ge=1)
    clip: float = Field(0.2, gt=0)
    value_clip: float = Field(0.2, gt=0)
    kl_beta: float = Field(0.01, ge=0)  # 0.005 for 34B/70B
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    iterations: int = Field(200, ge=1)
    max_new_tokens: int = Field(1024, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    num_prompts: int = Field(20_000, ge=1)  # train-split prompts PPO draws its batches from
    # held-out prompts (the preference batches' eval split): reward and KL every `eval_every`
    # iterations, early stopping after `early_stop_patience` evaluations without improvement
    eval_every: int = Field(10, ge=1)
    eval_prompts: int = Field(512, ge=1)
    eval_samples: int = Field(1, ge=1)
    early_stop_patience: int = Field(20, ge=1)
    early_stop_min_delta: float = Field(0.0, ge=0)
    # reward-hacking guard: stop (keeping the last good checkpoint) when the mean per-response
    # KL to the reference exceeds kl_stop nats, or the mean response length grows past
    # max_length_ratio x its starting value
    kl_stop: float = Field(20.0, gt=0)
    max_length_ratio: float = Field(3.0, gt=1)
    checkpoint_every: int = Field(10, ge=1)  # PPO iterations
    sampler: StepResources = StepResources(num_cpus=8, num_gpus=1)  # the rollout actor
    scorer: StepResources = StepResources(num_cpus=8, num_gpus=1)  # reference + both RMs
    use_vllm: bool = False  # vLLM for rollouts (GPU image only; TorchSampler otherwise)

    @model_validator(mode="after")
    def _batches_divide(self) -> PPOConfig:
        if self.train.global_batch_size % self.mini_batch_size:
            raise ValueError(f"train.global_batch_size ({self.train.global_batch_size} rollouts per iteration) "
                             f"must be a multiple of mini_batch_size ({self.mini_batch_size})")
        if self.train.global_batch_size % self.samples_per_prompt:
            raise ValueError("train.global_batch_size must be a multiple of samples_per_prompt")
        for name, t in (("train", self.train), ("critic_train", self.critic_train or self.train)):
            if self.mini_batch_size % (t.micro_batch_size * t.num_workers):
                raise ValueError(f"mini_batch_size ({self.mini_batch_size}) must be a multiple of {name}."
                                 f"micro_batch_size x num_workers ({t.micro_batch_size} x {t.num_workers})")
        return self

    @property
    def critic(self) -> tuple[TrainConfig, OptimConfig]:
        # without its own optim the critic takes the policy's, but not its lr_scale: the patterns
        # name the policy's parameters (the critic has no output head, and its norm is not a temperature)
        return self.critic_train or self.train, self.critic_optim or self.optim.model_copy(update={"lr_scale": {}})
