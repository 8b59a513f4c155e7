"""PPO, `ppo_v{i}` (RECIPE.md section 8): from iteration `rlhf.ppo_from` on, after rs_v{i}.

Roles, one file each (modelled on OpenRLHF's trainer/ray, smaller):
    rollout.py     the sampler actor (TorchSampler; vLLM when configured on GPU)
    scorer.py      the reference (rs_v{i}, the model the iteration started from) and both RMs
    objectives.py  the policy's and critic's Objectives for steps/engine/learner.py
    launcher.py    places the four roles with their resources
    trainer.py     the driver loop (`run_ppo`), checkpoints and resume
    losses.py      the math
The step: train-split prompts of the accepted preference batches (a prompt is a safety prompt
when any of its rows says `axis: safety`), held-out prompts from their eval split; the
policy's export and HF directory become the iteration's chat model, registered `rlhf-v{i}`.
On the tiny preset the demo world's ground-truth judge also scores the start and final model
on the world's test prompts (`judge.start.*`, `judge.ppo.*`, `judge.diff*`; see `judge_change`).
scripts/ppo_rerun.py reruns a finished run's ppo_v{i} with other settings through the same code.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from steps.ppo.config import PPOConfig
from steps.ppo.trainer import PPOResult, run_ppo

if TYPE_CHECKING:  # steps receive artifacts; the runner (pipelines/) makes them
    from pipelines.artifacts import Artifact

VERSION = "1"
__all__ = ["PPOConfig", "PPOResult", "VERSION", "judge_change", "ppo_prompts", "run", "run_ppo"]


def run(ctx, model: Artifact, prefs: Artifact, rm_helpfulness: Artifact, rm_safety: Artifact,
        iteration: int) -> dict[str, float]:
    from model.hf import export_hf

    cfg: PPOConfig = ctx.cfg.rlhf.ppo
    prompts, heldout = ppo_prompts(prefs, cfg, ctx.seed + iteration)
    ctx.log_params({"ppo.train_prompts": len(prompts), "ppo.heldout_prompts": len(heldout or [])})
    res = run_ppo(model.path, rm_helpfulness.path, rm_safety.path, prompts, cfg,
                  safety_threshold=ctx.cfg.rlhf.safety_threshold, work_dir=ctx.work_dir, out_dir=ctx.out_dir,
                  seed=ctx.seed + iteration, log=ctx.log_metrics, heldout=heldout)
    mcfg_json = model.file("model_config.json").read_text()
    (ctx.out_dir / "model_config.json").write_text(mcfg_json)
    from model.config import ModelConfig

    mcfg = ModelConfig.model_validate_json(mcfg_json)
    export_hf(res.weights, mcfg, ctx.out_dir / "hf", tokenizer_model=model.file("hf/tokenizer.model"))
    (ctx.out_dir / "history.json").write_text(json.dumps({"history": res.history, "evals": res.evals,
                                                          "stop_reason": res.stop_reason}))
    _log_curves(ctx, res, iteration)
    rows = [{"iteration": it, **s} for it, ss in sorted(res.samples.items()) for s in ss]
    if rows:
        ctx.log_table({k: [r[k] for r in rows] for k in rows[0]}, "rollouts.json")
    if res.stop_reason:
        ctx.set_tags({"ppo.stop_reason": res.stop_reason})

    first, last = res.evals[0], res.evals[-1]
    metrics = {"iterations": len(res.history), "stopped_early": float(bool(res.stop_reason)),
               "heldout.reward.start": first["reward"], "heldout.reward.final": last["reward"],
               "heldout.reward.gain": last["reward"] - first["reward"], "kl": last["kl"],
               "heldout.response_length": last["response_length"]}
    for key in ("time.rollout", "time.score", "time.update"):
        metrics[f"{key}.total"] = float(sum(h[key] for h in res.history))
    if res.history:
        h = res.history[-1]
        metrics.update({f"last.{k}": h[k] for k in ("clip_fraction", "approx_kl", "entropy", "value_loss",
                                                    "explained_variance", "reward.raw.mean")})
    if ctx.cfg.sft.demo_world:
        metrics.update(judge_change(model, res, ctx.seed, ctx.seed + iteration))
    metrics["registry_version"] = ctx.register_model(f"{ctx.cfg.run.name}-chat", ctx.out_dir / "hf",
                                                     f"rlhf-v{iteration}")
    return metrics


def ppo_prompts(prefs: Artifact, cfg: PPOConfig, seed: int) -> tuple[list, list | None]:
    """(train prompts, held-out prompts or None) of an accepted-preferences artifact: the train
    split's prompts PPO draws its batches from, the eval split's for early stopping."""
    import pyarrow.parquet as pq

    from steps.rejection import prompts_of

    pairs = pq.read_table(prefs.file("pairs.parquet"))
    return (prompts_of(pairs, cfg.num_prompts, seed),
            prompts_of(pairs, cfg.eval_prompts, seed, split="eval") or None)


def judge_change(model: Artifact, res: PPOResult, world_seed: int, sample_seed: int) -> dict[str, float]:
    """The demo world's ground-truth judge on its test prompts, before and after PPO: greedy
    (`judge.{start,ppo}.*`, as the other steps judge) and 8 samples per prompt at T=1, the policy
    as PPO samples it (`judge.{start,ppo}.sampled.*`). Each with the paired per-prompt change of
    helpfulness and its standard error (`judge.diff.*`, `judge.sampled.diff.*`): PPO changes a
    minority of the greedy answers, so the difference of two means alone says little."""
    import numpy as np

    from steps.sft import judge_model, load_chat_model, load_model
    from steps.world import World

    mcfg, tok = load_chat_model(model.path)
    items = World(world_seed).items("test")
    out, per_prompt, greedy_answers = {}, {}, {}
    for name, weights in (("start", model.file("model.safetensors")), ("ppo", res.weights)):
        policy = load_model(mcfg, weights)
        for kind, kwargs in (("greedy", {}), ("sampled", {"temperature": 1.0, "num_samples": 8, "seed": sample_seed})):
            scores, rows = judge_model(policy, tok, items, 32, **kwargs)
            prefix = f"judge.{name}." if kind == "greedy" else f"judge.{name}.sampled."
            out.update({prefix + k: v for k, v in scores.items() if "." not in k})
            # rows come item by item, K answers each: one mean per prompt
            per_prompt[name, kind] = np.array([r["helpfulness"] for r in rows]).reshape(len(items), -1).mean(1)
            if kind == "greedy":
                greedy_answers[name] = [r["response"] for r in rows]
    for kind, prefix in (("greedy", "judge."), ("sampled", "judge.sampled.")):
        d = per_prompt["ppo", kind] - per_prompt["start", kind]
        out.update({f"{prefix}diff.helpfulness": float(d.mean()),
                    f"{prefix}diff_se.helpfulness": float(d.std(ddof=1) / np.sqrt(len(d)))})
    out["judge.changed_answers"] = float(np.mean([a != b for a, b in zip(greedy_answers["start"],
                                                                          greedy_answers["ppo"])]))
    return out


def _log_curves(ctx, res: PPOResult, iteration: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [h["iteration"] for h in res.history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(its, [h["reward.raw.mean"] for h in res.history], marker=".", label="rollouts")
    a.plot([e["iteration"] for e in res.evals], [e["reward"] for e in res.evals], marker="o", label="held-out")
    a.set_xlabel("PPO iteration")
    a.set_ylabel("gated reward Rc")
    a.legend()
    b.plot(its, [h["kl"] for h in res.history], marker=".", label="rollouts")
    b.plot([e["iteration"] for e in res.evals], [e["kl"] for e in res.evals], marker="o", label="held-out")
    b.set_xlabel("PPO iteration")
    b.set_ylabel("KL to the reference (nats / response)")
    b.legend()
    fig.suptitle(f"ppo_v{iteration}")
    fig.tight_layout()
    ctx.log_figure(fig, "reward_and_kl.png")
    plt.close(fig)
