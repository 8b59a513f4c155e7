"""The PPO driver: rollout -> score -> advantages -> update, iteration after iteration.

Per iteration (RECIPE.md section 8): `train.global_batch_size` rollouts from the current
policy; the scorer's reference log-probs and reward-model probabilities; the gated reward Rc
(steps/gated_reward.py, the gate rejection sampling uses) whitened as R~c = WHITEN(LOGIT(Rc))
on each response's last token, the per-token KL penalty, GAE and whitened advantages
(steps/ppo/losses.py); then mini-batches of `mini_batch_size`, one gradient step each, on the
policy and the critic at the same time; the new weights go to the sampler through the object
store. Every `eval_every` iterations the held-out prompts measure reward and KL: early stopping
on a plateau. Every iteration the reward-hacking guard checks KL and length; a blow-up stops the
run and the last good checkpoint is the one exported.

Resumable: every `checkpoint_every` iterations both learners save a checkpoint (after the
iteration's rollout passed the guard, so a saved policy is a good one) and the driver its state
(`state_<iteration>.json`, written before the learners' checkpoints so a complete checkpoint
always has its state). The rollout of iteration k depends only on (seed, k) and the weights,
so a resumed run repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from model.config import ModelConfig
from steps.engine.launch import report_progress
from steps.gated_reward import gated_reward, logit, whiten
from steps.ppo.config import PPOConfig
from steps.ppo.losses import EarlyStopping, explained_variance, gae, masked_whiten, token_rewards
from steps.ppo.objectives import token_logp, token_values

FAIL_ENV = "LLAMA2_FAIL_AT_PPO_ITERATION"  # planned crash of the resume tests (cf. LLAMA2_FAIL_AT_STEP)


class PlannedCrash(RuntimeError):
    """Raised once at iteration $LLAMA2_FAIL_AT_PPO_ITERATION (tests of resume)."""


@dataclass
class PPOResult:
    weights: Path  # the final (or last good) policy weights, fp32 safetensors
    history: list[dict]  # one row per PPO iteration (time.rollout / time.score / time.update ...)
    evals: list[dict] = field(default_factory=list)  # held-out evaluations (iteration, reward, kl, ...)
    stop_reason: str = ""
    samples: dict[int, list[dict]] = field(default_factory=dict)  # iteration -> a few rollouts


def build_rollouts(prompts: list[list[int]], samples: list[tuple[list[int], list[float], bool]], K: int,
                   pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded prompt + response rows, their lengths and the action mask over positions."""
    seqs = [prompts[i // K] + resp for i, (resp, _, _) in enumerate(samples)]
    width = max(map(len, seqs))
    tokens = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width - 1), dtype=bool)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
        p = len(prompts[i // K])
        mask[i, p - 1:len(s) - 1] = True  # position t predicts token t+1: the response's tokens
    return {"tokens": tokens, "lengths": np.array([len(s) for s in seqs]), "action_mask": mask,
            "prompt_lengths": np.array([len(prompts[i // K]) for i in range(len(seqs))]),
            "finished": np.array([f for _, _, f in samples])}


class Driver:
    def __init__(self, roles, tok, cfg: PPOConfig, threshold: float, seed: int):
        self.roles, self.tok, self.cfg, self.threshold, self.seed = roles, tok, cfg, threshold, seed

    def rollout(self, prompt_ids: list[list[int]], safety: np.ndarray, K: int, sample_seed: int) -> dict:
        """Sample, then score with the reference, both RMs, the policy and the critic at once."""
        import ray

        from model.generate import SamplingParams

        c = self.cfg
        t0 = time.time()
        params = SamplingParams(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                                num_samples=K, seed=sample_seed)
        samples = ray.get(self.roles.sampler.generate.remote(prompt_ids, params))
        ro = build_rollouts(prompt_ids, samples, K, self.tok.pad_id)
        t1 = time.time()
        scored = self.roles.scorer.score.remote(ro["tokens"], ro["lengths"], ro["prompt_lengths"])
        logp = self.roles.policy.infer_async(token_logp, {"tokens": ro["tokens"]})
        values = self.roles.critic.infer_async(token_values, {"tokens": ro["tokens"]})
        sc = ray.get(scored)
        ro.update(old_logp=logp(), old_values=values(), ref_logp=sc["ref_logp"], rh=sc["helpfulness"],
                  rs=sc["safety"], is_safety=np.repeat(safety, K))
        ro["rc"] = gated_reward(ro["rh"], ro["rs"], ro["is_safety"], self.threshold)
        mask = ro["action_mask"]
        ro["kl"] = ((ro["old_logp"] - ro["ref_logp"]) * mask).sum(1)  # per response, sampled estimate
        ro["time.rollout"], ro["time.score"] = t1 - t0, time.time() - t1
        return ro

    def advantages(self, ro: dict) -> dict[str, float]:
        c = self.cfg
        mask = torch.tensor(ro["action_mask"])  # copies: arrays from Ray's object store are read-only
        logp, ref = torch.tensor(ro["old_logp"]), torch.tensor(ro["ref_logp"])
        values = torch.tensor(ro["old_values"]) * mask
        logits = logit(ro["rc"])
        score = torch.from_numpy(whiten(logits)).float()  # R~c = WHITEN(LOGIT(Rc))
        rewards = token_rewards(score, logp, ref, mask, c.kl_beta)
        adv, ret = gae(rewards, values, mask, c.gamma, c.lam)
        ro["adv"] = masked_whiten(adv, mask).numpy().astype(np.float32)
        ro["returns"] = ret.numpy().astype(np.float32)
        lengths = mask.sum(1).float()
        return {"reward.raw.mean": float(ro["rc"].mean()), "reward.raw.std": float(ro["rc"].std()),
                "reward.logit.mean": float(logits.mean()), "reward.logit.std": float(logits.std()),
                "reward.whitened.mean": float(score.mean()), "reward.whitened.std": float(score.std()),
                "reward.total.mean": float(rewards.sum(1).mean()),
                "reward.helpfulness.mean": float(ro["rh"].mean()), "reward.safety.mean": float(ro["rs"].mean()),
                "kl": float(ro["kl"].mean()), "kl.per_token": float(ro["kl"].sum() / lengths.sum()),
                "response_length": float(lengths.mean()), "finished": float(ro["finished"].mean()),
                "explained_variance": explained_variance(values, ret, mask),
                "value.mean": float(values.sum() / mask.sum())}

    def update(self, ro: dict, iteration: int) -> dict[str, float]:
        import ray

        c = self.cfg
        n = len(ro["tokens"])
        sums: dict[str, float] = {}
        steps = 0
        for epoch in range(c.ppo_epochs):
            order = np.random.default_rng([self.seed, iteration, epoch]).permutation(n)
            for s in range(0, n, c.mini_batch_size):
                idx = order[s:s + c.mini_batch_size]
                prow = {k: ro[k][idx] for k in ("tokens", "action_mask", "old_logp", "adv")}
                crow = {k: ro[k][idx] for k in ("tokens", "action_mask", "old_values", "returns")}
                c_refs = self.roles.critic.step_async(crow)
                row = {}
                if iteration >= c.freeze_policy_iterations:
                    pm = ray.get(self.roles.policy.step_async(prow))[0]
                    row = {"policy_loss": pm["loss"], "clip_fraction": pm["clipped"], "approx_kl": pm["approx_kl"],
                           "entropy": pm["entropy"], "grad_norm": pm["grad_norm"]}
                cm = ray.get(c_refs)[0]
                row.update(value_loss=cm["loss"], critic_grad_norm=cm["grad_norm"])
                for k, v in row.items():
                    sums[k] = sums.get(k, 0.0) + v
                steps += 1
        return {k: v / steps for k, v in sums.items()}

    def sync_sampler(self) -> None:
        import ray

        ray.get(self.roles.sampler.load_weights.remote(self.roles.policy.weights()))


def run_ppo(policy_dir, rm_helpfulness_dir, rm_safety_dir, prompts: list[tuple[str, list[dict], bool]],
            cfg: PPOConfig, *, safety_threshold: float, work_dir: Path, out_dir: Path, seed: int, log=None,
            heldout: list[tuple[str, list[dict], bool]] | None = None) -> PPOResult:
    """PPO from the chat model in `policy_dir` against the two reward models, on `prompts`
    (key, turns, is_safety). `heldout` prompts (default: a tenth of `prompts`, never trained on)
    drive early stopping. `log(metrics, step)` receives each iteration's row as it happens."""
    from model.chat import encode_prompt
    from steps.ppo.launcher import launch
    from steps.rejection import to_dialogue
    from steps.sft import load_chat_model

    policy_dir, work_dir, out_dir = Path(policy_dir), Path(work_dir), Path(out_dir)
    mcfg, tok = load_chat_model(policy_dir)
    rm_cfg = ModelConfig.model_validate_json((Path(rm_helpfulness_dir) / "model_config.json").read_text())
    fits = [p for p in prompts if len(encode_prompt(tok, to_dialogue(p[1]))) + cfg.max_new_tokens <= mcfg.max_seq_len]
    if heldout is None:
        order = np.random.default_rng(seed).permutation(len(fits))
        cut = max(1, len(fits) // 10)
        heldout, fits = [fits[i] for i in order[:cut]], [fits[i] for i in sorted(order[cut:])]
    heldout = [p for p in heldout if len(encode_prompt(tok, to_dialogue(p[1]))) + cfg.max_new_tokens <= mcfg.max_seq_len]
    heldout = heldout[:cfg.eval_prompts]
    if not fits or not heldout:
        raise ValueError(f"PPO needs training and held-out prompts that fit max_seq_len {mcfg.max_seq_len} with "
                         f"{cfg.max_new_tokens} new tokens: {len(fits)} and {len(heldout)} do")
    train_ids = [encode_prompt(tok, to_dialogue(t)) for _, t, _ in fits]
    train_safety = np.array([s for _, _, s in fits])
    eval_ids = [encode_prompt(tok, to_dialogue(t)) for _, t, _ in heldout]
    eval_safety = np.array([s for _, _, s in heldout])
    K = cfg.samples_per_prompt
    per_iter = cfg.train.global_batch_size // K

    state_dir = work_dir / "ppo"
    state_dir.mkdir(parents=True, exist_ok=True)
    stopper = EarlyStopping(cfg.early_stop_patience, cfg.early_stop_min_delta, cfg.kl_stop, cfg.max_length_ratio)
    history: list[dict] = []
    evals: list[dict] = []
    samples: dict[int, list[dict]] = {}
    start = 0
    roles = launch(cfg, str(policy_dir), {"helpfulness": str(rm_helpfulness_dir), "safety": str(rm_safety_dir)},
                   mcfg, rm_cfg, seed)
    try:
        driver = Driver(roles, tok, cfg, safety_threshold, seed)
        step = roles.policy.load(state_dir / "policy")
        if step is not None:  # resume: both learners and the driver at the same iteration
            if roles.critic.load(state_dir / "critic") != step:
                raise RuntimeError(f"{state_dir}: policy and critic checkpoints disagree; delete it to start over")
            saved = json.loads((state_dir / f"state_{step:06d}.json").read_text())
            history, evals, start = saved["history"], saved["evals"], step
            samples = {int(k): v for k, v in saved["samples"].items()}
            stopper.load(saved["stopper"])
            driver.sync_sampler()
            print(f"[ppo] resumed at iteration {start} of {cfg.iterations}", flush=True)

        def evaluate(iteration: int) -> dict:
            ro = driver.rollout(eval_ids, eval_safety, cfg.eval_samples, seed + 7_919)  # fixed seed: comparable
            row = {"iteration": iteration, "reward": float(ro["rc"].mean()), "kl": float(ro["kl"].mean()),
                   "helpfulness": float(ro["rh"].mean()), "safety": float(ro["rs"].mean()),
                   "response_length": float(ro["action_mask"].sum(1).mean())}
            evals.append(row)
            if log:
                log({f"heldout.{k}": v for k, v in row.items() if k != "iteration"}, iteration)
            return row

        if start == 0:
            evaluate(0)
            stopper.plateaued(0, evals[-1]["reward"])
        fail_at = int(os.environ.get(FAIL_ENV, "0"))
        stopped = ""
        for it in range(start, cfg.iterations):
            if fail_at and it == fail_at and not (work_dir / "failed_once").exists():
                (work_dir / "failed_once").write_text(str(it))
                raise PlannedCrash(f"planned crash at PPO iteration {it} (${FAIL_ENV})")
            rng = np.random.default_rng([seed, it])
            pick = rng.permutation(len(train_ids))[:per_iter] if per_iter <= len(train_ids) else \
                rng.choice(len(train_ids), per_iter)
            ro = driver.rollout([train_ids[i] for i in pick], train_safety[pick], K, seed * 1_000_003 + it)
            row = {"iteration": it + 1, **driver.advantages(ro)}
            if stopper.blew_up(it, row["kl"], row["response_length"]):
                stopped = stopper.reason
                break
            if it > start and it % cfg.checkpoint_every == 0:  # this policy passed the guard: a good one
                (state_dir / f"state_{it:06d}.json").write_text(json.dumps(
                    {"history": history, "evals": evals, "samples": samples, "stopper": stopper.state()}))
                roles.policy.save(state_dir / "policy", it)
                roles.critic.save(state_dir / "critic", it)
            if it in (0, cfg.iterations // 2, cfg.iterations - 1):  # sample rollouts: start, middle, end
                samples[it] = [{"prompt": tok.decode(train_ids[pick[j // K]]), "response": tok.decode(
                    [t for t in ro["tokens"][j, len(train_ids[pick[j // K]]):ro["lengths"][j]].tolist()
                     if t != tok.eos_id]), "reward": float(ro["rc"][j])} for j in range(min(8, len(ro["rc"])))]
            t2 = time.time()
            row.update(driver.update(ro, it))
            if it >= cfg.freeze_policy_iterations:
                driver.sync_sampler()
            row.update({"time.rollout": ro["time.rollout"], "time.score": ro["time.score"],
                        "time.update": time.time() - t2})
            history.append(row)
            report_progress(it + 1, cfg.iterations, "iterations")
            if log:
                log({k: v for k, v in row.items() if k != "iteration"}, it + 1)
            if (it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iterations:
                if stopper.plateaued(it + 1, evaluate(it + 1)["reward"]):
                    stopped = stopper.reason
                    break
        if stopped and stopped.startswith(("KL", "mean response length")):
            step = roles.policy.load(state_dir / "policy")  # the last good checkpoint, if any
            if step is None:  # none yet: the starting weights are the last good ones
                stopped += "; no checkpoint yet: the starting model is kept"
                out_dir.mkdir(parents=True, exist_ok=True)
                import shutil

                shutil.copyfile(policy_dir / "model.safetensors", out_dir / "model.safetensors")
                return PPOResult(out_dir / "model.safetensors", history, evals, stopped, samples)
            stopped += f"; the checkpoint of iteration {step} is kept"
        if stopped:
            print(f"[ppo] stopped early: {stopped}", flush=True)
        weights = roles.policy.export(out_dir)
        return PPOResult(weights, history, evals, stopped, samples)
    finally:
        roles.shutdown()
