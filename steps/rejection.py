"""Rejection-sampling fine-tuning, `rs_v{i}` (RECIPE.md section 8): best of K, pooled.

For each prompt, K answers from the newest chat model (one prefill per prompt, K continuations:
model/generate.py), at iteration i's temperature. Both reward models score every answer; the
answer kept is the one with the highest gated reward Rc (steps/gated_reward.py: the safety RM
for safety prompts and for answers it finds unsafe, the helpfulness RM otherwise), the same
reward PPO optimises. From iteration `pool_from_iteration` on (V3 in the paper, its fix for
regressions) the winners of every earlier iteration compete too, rescored by the current
reward models, so a later iteration never forgets a better answer found before. The newest
model is then fine-tuned on the winners with the answer-only loss (steps/sft.py:finetune).

Prompts (`rlhf.prompts`): by default those of the accepted preference batches (train split);
a prompt is a safety prompt when any of its rows says `axis: safety`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from model.chat import Dialogue, Turn
from model.config import ModelConfig, Section
from steps.engine.config import OptimConfig, StepResources, TrainConfig
from steps.gated_reward import gated_reward, sigmoid

if TYPE_CHECKING:  # steps receive artifacts; the runner (pipelines/) makes them
    from pipelines.artifacts import Artifact

VERSION = "1"
POOL_SCHEMA = pa.schema([("prompt_key", pa.string()), ("iteration", pa.int32()), ("answer", pa.string())])


class RejectionConfig(Section):
    num_samples: int = Field(10, ge=1)  # K answers per prompt
    temperatures: list[float] = Field(default_factory=lambda: [1.2, 1.2, 1.3, 1.3, 1.3])  # per iteration
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(1024, ge=1)
    num_prompts: int = Field(20_000, ge=1)
    pool_from_iteration: int = Field(3, ge=1)  # from V3 on, winners of all prior iterations compete
    sample_batch_size: int = Field(64, ge=1)
    sampler: StepResources = StepResources(num_cpus=8, num_gpus=1)  # the Ray task that samples and scores
    seq_len: int = 4096
    train: TrainConfig = TrainConfig(global_batch_size=64, epochs=1.0, num_workers=64, use_gpu=True,
                                     gpus_per_worker=1, cpus_per_worker=8)
    optim: OptimConfig = OptimConfig(lr=1e-5, warmup_steps=0)

    def temperature(self, iteration: int) -> float:
        """Iteration i's temperature (the last one repeats for later iterations, V6 on)."""
        return self.temperatures[min(iteration, len(self.temperatures)) - 1]


def prompt_key(turns: list[dict]) -> str:
    return hashlib.blake2b(json.dumps(turns, sort_keys=True).encode(), digest_size=8).hexdigest()


def to_dialogue(turns: list[dict]) -> Dialogue:
    system = turns[0]["content"] if turns and turns[0]["role"] == "system" else None
    return Dialogue([Turn(t["role"], t["content"]) for t in turns[1 if system else 0:]], system)


def prompts_of(pairs: pa.Table, limit: int, seed: int, split: str = "train") -> list[tuple[str, list[dict], bool]]:
    """(key, prompt turns, is_safety) of the `split` prompts, at most `limit`, seeded."""
    seen: dict[str, tuple[list[dict], bool]] = {}
    for row in pairs.filter(pc.equal(pairs["split"], split)).select(["prompt", "axis"]).to_pylist():
        key = prompt_key(row["prompt"])
        turns, safety = seen.get(key, (row["prompt"], False))
        seen[key] = (turns, safety or row["axis"] == "safety")
    keys = sorted(seen)
    if len(keys) > limit:
        keys = sorted(np.random.default_rng(seed).choice(keys, limit, replace=False).tolist())
    return [(k, *seen[k]) for k in keys]


def best_of(rewards: np.ndarray) -> np.ndarray:
    """Index of the best candidate per prompt (rows: prompts); the first on a tie."""
    return np.asarray(rewards).argmax(axis=1)


def select_winners(keys: list[str], answers: list[list[str]], earlier: dict[str, list[dict]], reward: np.ndarray,
                   iteration: int) -> list[dict]:
    """Per prompt, the candidate with the highest reward: one of this iteration's K answers
    (columns 0..K-1 of `reward`) or one of the prompt's earlier winners (`earlier[key]`, in
    the order their rewards follow in columns K..). Each winner records where it came from."""
    out = []
    for p, (key, b) in enumerate(zip(keys, best_of(reward))):
        k = len(answers[p])
        if b < k:
            text, source = answers[p][b], iteration
        else:
            row = earlier[key][b - k]
            text, source = row["answer"], row["iteration"]
        out.append({"prompt_key": key, "iteration": iteration, "answer": text, "source": source})
    return out


def reward_curve(rewards: np.ndarray) -> dict[str, list[float]]:
    """The paper's Figure 7: mean over prompts of the max and of the median reward among the
    first k samples, k = 1..K. Their gap is what rejection sampling gains."""
    k_max = rewards.shape[1]
    return {"k": list(range(1, k_max + 1)),
            "max": [float(rewards[:, :k].max(1).mean()) for k in range(1, k_max + 1)],
            "median": [float(np.median(rewards[:, :k], axis=1).mean()) for k in range(1, k_max + 1)]}


def sample_and_score(policy_dir: str, rm_dirs: dict[str, str], dialogues: list[Dialogue], earlier: list[list[str]],
                     params, batch_size: int) -> tuple[list[list[str]], dict[str, np.ndarray]]:
    """K answers per dialogue from the policy, then both reward models' probabilities for the
    K answers and each dialogue's earlier winners: ({axis: [P, K + M]} with M = the most earlier
    winners of any prompt, missing ones scored -inf). Runs as one Ray task (engine.run_on_worker)."""
    from model.chat import encode_prompt
    from model.generate import TorchSampler
    from model.reward import encode_example, load_reward_model, score_sequences
    from steps.sft import load_chat_model, load_model

    mcfg, tok = load_chat_model(Path(policy_dir))
    policy = load_model(mcfg, Path(policy_dir))
    sampler = TorchSampler(policy, tok.eos_id, tok.pad_id)
    answers: list[list[str]] = []
    for s in range(0, len(dialogues), batch_size):
        chunk = [encode_prompt(tok, d) for d in dialogues[s:s + batch_size]]
        samples = sampler.generate(chunk, params)
        for i in range(len(chunk)):
            answers.append([tok.decode(x.tokens).strip() for x in samples[i * params.num_samples:
                                                                            (i + 1) * params.num_samples]])
    del policy, sampler
    width = params.num_samples + max((len(e) for e in earlier), default=0)
    candidates = [a + e for a, e in zip(answers, earlier)]
    flat = [(i, j, encode_example(tok, dialogues[i], text, mcfg.max_seq_len)[0])
            for i, cands in enumerate(candidates) for j, text in enumerate(cands)]
    probs = {}
    for axis, rm_dir in rm_dirs.items():
        rm = load_reward_model(ModelConfig.model_validate_json((Path(rm_dir) / "model_config.json").read_text()),
                               Path(rm_dir))
        scores = score_sequences(rm, [ids for _, _, ids in flat], tok.pad_id).numpy()
        grid = np.full((len(dialogues), width), -np.inf)
        for (i, j, _), score in zip(flat, scores):
            grid[i, j] = sigmoid(score)
        probs[axis] = grid
        del rm
    return answers, probs


def run(ctx, model: Artifact, prefs: Artifact, rm_helpfulness: Artifact, rm_safety: Artifact, iteration: int,
        previous: Artifact | None = None) -> dict[str, float]:
    from model.generate import SamplingParams
    from steps.engine import run_on_worker
    from steps.sft import finetune

    rcfg: RejectionConfig = ctx.cfg.rlhf.rejection
    prompts = prompts_of(pq.read_table(prefs.file("pairs.parquet")), rcfg.num_prompts, ctx.seed + iteration)
    if not prompts:
        raise ValueError(f"rs_v{iteration}: the accepted preference batches hold no train-split prompt")
    dialogues = [to_dialogue(turns) for _, turns, _ in prompts]
    is_safety = np.array([s for _, _, s in prompts])

    # earlier winners compete from pool_from_iteration on (all of them, rescored now)
    pool = pq.read_table(previous.file("pool.parquet")).to_pylist() if previous is not None else []
    by_key: dict[str, list[dict]] = {}
    for row in pool:
        by_key.setdefault(row["prompt_key"], []).append(row)
    compete = iteration >= rcfg.pool_from_iteration
    earlier = [[r["answer"] for r in by_key.get(k, [])] if compete else [] for k, _, _ in prompts]

    temperature = rcfg.temperature(iteration)
    params = SamplingParams(max_new_tokens=rcfg.max_new_tokens, temperature=temperature, top_p=rcfg.top_p,
                            num_samples=rcfg.num_samples, seed=ctx.seed + iteration)
    answers, probs = run_on_worker(sample_and_score, rcfg.sampler, str(model.path),
                                   {"helpfulness": str(rm_helpfulness.path), "safety": str(rm_safety.path)},
                                   dialogues, earlier, params, rcfg.sample_batch_size)
    reward = gated_reward(probs["helpfulness"], probs["safety"], is_safety[:, None], ctx.cfg.rlhf.safety_threshold)
    reward = np.where(np.isfinite(probs["safety"]), reward, -np.inf)  # absent earlier winners never win
    K = rcfg.num_samples
    winners = select_winners([k for k, _, _ in prompts], answers, by_key if compete else {}, reward, iteration)
    provenance: dict[int, int] = {}
    for w in winners:
        provenance[w["source"]] = provenance.get(w["source"], 0) + 1
    best = best_of(reward)
    # the pool passed on: every earlier winner plus this iteration's (rescoring happens each time)
    new_pool = pool + [{"prompt_key": w["prompt_key"], "iteration": iteration, "answer": w["answer"]} for w in winners]
    pq.write_table(pa.Table.from_pylist(new_pool, schema=POOL_SCHEMA), ctx.out_dir / "pool.parquet")

    curve = reward_curve(reward[:, :K])
    ctx.log_dict({"temperature": temperature, **curve}, "reward_vs_k.json")
    _log_curve_figure(ctx, curve, temperature, iteration)
    ctx.log_table({"prompt": [d.turns[-1].content for d in dialogues[:50]],
                   "winner": [w["answer"] for w in winners[:50]],
                   "reward": [float(reward[i, best[i]]) for i in range(min(50, len(winners)))],
                   "from_iteration": [w["source"] for w in winners[:50]]}, "winners.json")

    fine = [Dialogue(d.turns + [Turn("assistant", w["answer"])], d.system) for d, w in zip(dialogues, winners)]
    result, stats = finetune(ctx, f"rs_v{iteration}", model, fine, [], rcfg.train, rcfg.optim, rcfg.seq_len)
    # from rlhf.ppo_from on, ppo_v{i} (trained from this model) is iteration i's chat model, `rlhf-v{i}`
    alias = f"rs-v{iteration}" if iteration >= ctx.cfg.rlhf.ppo_from else f"rlhf-v{iteration}"
    version = ctx.register_model(f"{ctx.cfg.run.name}-chat", ctx.out_dir / "hf", alias)
    (ctx.out_dir / "winners.json").write_text(json.dumps(winners))
    metrics = {"prompts": len(prompts), "temperature": temperature, "pool.size": len(new_pool),
               "reward.max": curve["max"][-1], "reward.median": curve["median"][-1],
               "reward.gain": curve["max"][-1] - curve["median"][-1],
               "train_loss": result.final.get("loss"), "first_loss": result.history[0]["loss"],
               "registry_version": version, **{f"data.{k}": v for k, v in stats.items()}}
    metrics.update({f"pool.from_v{src}": n / len(winners) for src, n in sorted(provenance.items())})
    return metrics


def _log_curve_figure(ctx, curve: dict, temperature: float, iteration: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(curve["k"], curve["max"], marker="o", label="max of k")
    ax.plot(curve["k"], curve["median"], marker="o", label="median of k")
    ax.set_xlabel("samples per prompt (k)")
    ax.set_ylabel("gated reward")
    ax.set_title(f"rs_v{iteration}: best of k at T={temperature}")
    ax.legend()
    fig.tight_layout()
    ctx.log_figure(fig, "reward_vs_k.png")
    plt.close(fig)
