"""Places PPO's roles on Ray with the resources their config gives them (OpenRLHF's layout, smaller):

    sampler   RolloutSampler actor (`rlhf.ppo.sampler`): generates with the current policy
    scorer    Scorer actor (`rlhf.ppo.scorer`): the frozen reference and both reward models
    policy    LearnerGroup (`rlhf.ppo.train`): the policy on the shared engine, ZeRO-3
    critic    LearnerGroup (`rlhf.ppo.critic_train`): the value network from the helpfulness RM

All four start at once (actor construction returns immediately; `ready()` waits for the
learners' DeepSpeed engines), so their start-up costs overlap. On one CPU machine the roles
share its cores: the tiny preset gives each a fraction of a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model.config import ModelConfig
from steps.engine.config import StepResources
from steps.engine.learner import LearnerGroup
from steps.ppo.config import PPOConfig
from steps.ppo.objectives import critic_objective, policy_objective


@dataclass
class Roles:
    sampler: Any
    scorer: Any
    policy: LearnerGroup
    critic: LearnerGroup

    def shutdown(self) -> None:
        import ray

        for a in (self.sampler, self.scorer):
            ray.kill(a)
        self.policy.shutdown()
        self.critic.shutdown()


def _actor(cls, res: StepResources):
    import ray

    memory = int(res.memory_gb * 2**30) if res.memory_gb else None
    env = {"OMP_NUM_THREADS": str(max(1, int(res.num_cpus)))}
    return ray.remote(cls).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus, memory=memory,
                                   resources=res.resources or None, runtime_env={"env_vars": env})


def launch(cfg: PPOConfig, policy_dir: str, rm_dirs: dict[str, str], mcfg: ModelConfig, rm_cfg: ModelConfig,
           seed: int) -> Roles:
    import ray

    from steps.ppo.rollout import RolloutSampler
    from steps.ppo.scorer import Scorer

    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    sampler = _actor(RolloutSampler, cfg.sampler).remote(policy_dir, cfg.use_vllm)
    scorer = _actor(Scorer, cfg.scorer).remote(policy_dir, rm_dirs)
    steps = cfg.iterations * cfg.ppo_epochs * (cfg.train.global_batch_size // cfg.mini_batch_size)
    policy = LearnerGroup(policy_objective(mcfg, f"{policy_dir}/model.safetensors", cfg.clip, cfg.logit_scale), cfg.train, cfg.optim,
                          mini_batch_rows=cfg.mini_batch_size, total_steps=steps, seed=seed, name="ppo-policy")
    ctrain, coptim = cfg.critic
    critic = LearnerGroup(critic_objective(rm_cfg, f"{rm_dirs['helpfulness']}/model.safetensors", cfg.value_clip),
                          ctrain, coptim, mini_batch_rows=cfg.mini_batch_size, total_steps=steps, seed=seed,
                          name="ppo-critic")
    policy.ready()
    critic.ready()
    ray.get([sampler.__ray_ready__.remote(), scorer.__ray_ready__.remote()])
    return Roles(sampler, scorer, policy, critic)
