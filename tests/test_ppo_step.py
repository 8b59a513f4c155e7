"""The PPO loop on its Ray roles (steps/ppo/): a few iterations on a tiny random policy and
reward models, and a planned crash resumed from the last checkpoint with the same result."""

import shutil

import numpy as np
import pytest
import torch

from model.config import ModelConfig
from steps.engine.config import OptimConfig, StepResources, TrainConfig
from steps.ppo.config import PPOConfig
from steps.ppo.trainer import FAIL_ENV, build_rollouts
from tests.conftest import train_tiny_tokenizer

WORDS = "what is the capital of answer country river two plus three seven hello thanks how do I make a kite"


def test_rollouts_mark_the_response_tokens_as_actions():
    ro = build_rollouts([[1, 5, 6], [1, 7]], [([8, 9, 2], [0.0] * 2, True), ([4], [0.0], False)], 1, pad_id=3)
    assert ro["prompt_lengths"].tolist() == [3, 2]
    assert ro["tokens"].tolist() == [[1, 5, 6, 8, 9, 2], [1, 7, 4, 3, 3, 3]]
    # position t predicts token t+1: row 0's actions are tokens 3..5 (predicted at 2..4)
    assert ro["action_mask"].tolist() == [[False, False, True, True, True], [False, True, False, False, False]]
    assert ro["lengths"].tolist() == [6, 3]


def test_config_refuses_mini_batches_that_do_not_divide():
    with pytest.raises(ValueError, match="multiple of mini_batch_size"):
        PPOConfig(train=TrainConfig(global_batch_size=24, micro_batch_size=8, num_workers=1), mini_batch_size=16)


def test_the_critic_does_not_inherit_the_policys_lr_scale():
    from steps.engine.config import OptimConfig

    cfg = PPOConfig(optim=OptimConfig(lr=2e-5, lr_scale={"output.weight": 10.0}))  # the critic has no `output`
    assert cfg.critic[1].lr == 2e-5 and cfg.critic[1].lr_scale == {}
    assert cfg.optim.lr_scale == {"output.weight": 10.0}


def make_artifacts(tmp_path):
    """A random tiny chat model and two random reward models (score heads not zero, so that
    rewards differ between responses), in the artifact layout the step reads."""
    from safetensors.torch import save_file

    from model.llama import Transformer
    from model.reward import RewardModel

    tok = train_tiny_tokenizer(tmp_path, WORDS)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, multiple_of=16,
                      max_seq_len=64)
    torch.manual_seed(0)
    dirs = {}
    for name, module in (("policy", Transformer(cfg)), ("rm_h", RewardModel(cfg)), ("rm_s", RewardModel(cfg))):
        d = tmp_path / name
        (d / "hf").mkdir(parents=True)
        if hasattr(module, "score"):
            torch.nn.init.normal_(module.score.weight, std=0.5)
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, d / "model.safetensors")
        (d / "model_config.json").write_text(cfg.model_dump_json())
        shutil.copyfile(tmp_path / "tok.model", d / "hf" / "tokenizer.model")
        dirs[name] = d
    return dirs


PROMPTS = [(f"k{i}", [{"role": "user", "content": q}], i % 4 == 0) for i, q in enumerate(
    f"{a} {b}" for a in ("what is", "how do I", "hello", "thanks") for b in ("two plus three", "make a kite",
                                                                             "the capital", "river country"))]


def tiny_cfg() -> PPOConfig:
    return PPOConfig(
        train=TrainConfig(num_workers=1, cpus_per_worker=0.25, global_batch_size=16, micro_batch_size=8,
                          zero_stage=3, precision="fp32"),
        optim=OptimConfig(lr=1e-3, schedule="constant", warmup_steps=0), mini_batch_size=8, iterations=4,
        eval_every=2, checkpoint_every=2, max_new_tokens=8, eval_prompts=8, early_stop_patience=10, kl_stop=50.0,
        sampler=StepResources(num_cpus=0.25), scorer=StepResources(num_cpus=0.25))


@pytest.mark.slow
def test_ppo_runs_and_a_killed_run_resumes_to_the_same_weights(tmp_path, ray_local, monkeypatch):
    from model.weights import load_state_dict
    from steps.ppo import run_ppo
    from steps.ppo.trainer import PlannedCrash

    dirs = make_artifacts(tmp_path)
    base = tiny_cfg()  # with the tiny preset's learned logit scale: a checkpoint carries it, the export folds it
    cfg = base.model_copy(update={"logit_scale": True, "optim": base.optim.model_copy(
        update={"lr_scale": {"log_scale": 10.0}})})
    kw = dict(safety_threshold=0.15, seed=0, heldout=PROMPTS[:8])

    def go(name):
        return run_ppo(dirs["policy"], dirs["rm_h"], dirs["rm_s"], PROMPTS[8:], cfg, work_dir=tmp_path / name / "work",
                       out_dir=tmp_path / name / "out", **kw)

    whole = go("whole")
    assert [h["iteration"] for h in whole.history] == [1, 2, 3, 4]
    assert [e["iteration"] for e in whole.evals] == [0, 2, 4]
    for h in whole.history:
        assert {"time.rollout", "time.score", "time.update", "clip_fraction", "approx_kl", "entropy", "value_loss",
                "explained_variance", "reward.raw.mean", "reward.whitened.std", "kl", "response_length"} <= set(h)
    # the first rollout comes from the reference itself: KL exactly 0; the updates then move the
    # policy (the sampled estimate of the KL on 16 rollouts can be of either sign)
    assert whole.history[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert abs(whole.history[-1]["kl"]) > 1e-3 and whole.history[-1]["approx_kl"] > 0
    start = load_state_dict(dirs["policy"] / "model.safetensors")
    final = load_state_dict(whole.weights)
    assert sorted(final) == sorted(start)  # a plain chat model: the scale folded into norm.weight
    assert any(not torch.equal(start[k], final[k]) for k in start)

    monkeypatch.setenv(FAIL_ENV, "3")
    with pytest.raises(PlannedCrash):
        go("killed")
    assert (tmp_path / "killed/work/ppo/state_000002.json").exists()  # the checkpoint it resumes from
    resumed = go("killed")
    assert [h["iteration"] for h in resumed.history] == [1, 2, 3, 4]
    for a, b in zip(whole.history, resumed.history):
        for k in a:
            if not k.startswith("time."):
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["iteration"], k)
    again = load_state_dict(resumed.weights)
    for k in final:
        assert torch.allclose(final[k], again[k], atol=1e-6), k
    assert [e["reward"] for e in resumed.evals] == pytest.approx([e["reward"] for e in whole.evals])


@pytest.mark.slow
def test_ppo_raises_the_reward_it_is_given(tmp_path, ray_local, monkeypatch):
    """The whole loop (sampler, scorer, learners, GAE, clipped updates, weight sync) on a reward
    a tiny random policy can learn at once: the share of the answer's tokens with an even id,
    given in place of the reward models' gated reward (the roles still score every rollout).
    With the reward dropped or misplaced (it once landed on a prompt position, where GAE
    discards it) that share stays at its start (about a half)."""
    import steps.ppo.trainer as trainer
    from steps.ppo import run_ppo

    rollout = trainer.Driver.rollout

    def even_tokens_win(self, *args, **kwargs):
        ro = rollout(self, *args, **kwargs)
        mask = ro["action_mask"]
        even = (ro["tokens"][:, 1:] % 2 == 0) & mask
        ro["rc"] = even.sum(1) / np.maximum(mask.sum(1), 1)
        return ro

    monkeypatch.setattr(trainer.Driver, "rollout", even_tokens_win)
    dirs = make_artifacts(tmp_path)
    base = tiny_cfg()  # a random policy is near uniform (entropy 5.76 nats): it needs a big step size
    cfg = base.model_copy(update={"iterations": 10, "eval_every": 10, "checkpoint_every": 10,
                                  "optim": base.optim.model_copy(update={"lr": 1e-2}),
                                  "train": base.train.model_copy(update={"global_batch_size": 32})})
    res = run_ppo(dirs["policy"], dirs["rm_h"], dirs["rm_s"], PROMPTS[8:], cfg, safety_threshold=0.15, seed=0,
                  heldout=PROMPTS[:8], work_dir=tmp_path / "work", out_dir=tmp_path / "out")
    rewards = [h["reward.raw.mean"] for h in res.history]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.1, rewards
    assert res.evals[-1]["reward"] > res.evals[0]["reward"] + 0.1, res.evals
