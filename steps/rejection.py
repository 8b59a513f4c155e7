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

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from model.chat import Dialogue, Turn
from model.config import ModelConfig, Section
from steps.engine.config import OptimConfig, StepResources, TrainConfig
from steps.gated_reward import gated_reward, sigmoid

if TYPE_CHECKING:  # steps receive artifacts; the runner (pipelines/) makes them
    from pipelines.artifacts import Artifact

VERSION = "3"  # 2: batch-invariant sampling streams, RM-side tokenizers, temperature sweep, teacher;
# 3: the greedy answer as a candidate (include_greedy), SFT demonstrations replayed (sft_mix)
POOL_SCHEMA = pa.schema([("prompt_key", pa.string()), ("iteration", pa.int32()), ("answer", pa.string())])


class RejectionTuneConfig(Section):
    """A Ray Tune search over the sampling temperature (steps/rejection_tune.py), scored by the
    best-of-K gain (max minus median gated reward) on validation prompts: a fixed share of the
    train split's prompts, which the step then does not fine-tune on (never the eval split)."""

    enabled: bool = False
    temperatures: list[float] = Field(default_factory=lambda: [0.9, 1.0, 1.1, 1.2, 1.3, 1.4], min_length=1)
    iterations: list[int] = Field(default_factory=lambda: [1])  # RLHF iterations that sweep
    validation_fraction: float = Field(0.1, gt=0, lt=1)  # share of train prompts held out for the sweep
    num_prompts: int = Field(1000, ge=1)  # validation prompts a trial answers (at most)
    max_concurrent_trials: int = Field(1, ge=1)
    # what the chosen temperature maximises: "gain" (max minus median, the criterion) or
    # "max" (the best answer's reward, what the paper's Figure 8 compares). Gain favours hot
    # sampling: the median falls faster than the max (README: measured on the tiny preset)
    objective: Literal["gain", "max"] = "gain"

    @field_validator("temperatures")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(t <= 0 for t in v):
            raise ValueError(f"temperatures must be > 0 (greedy samples have no best-of-K gain): {v}")
        return v


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
    tune: RejectionTuneConfig = RejectionTuneConfig()
    # The sampling model's greedy answer joins each prompt's K samples as one more candidate
    # (the reward curve, Figure 7, stays over the K samples). Off in the paper's recipe; where the
    # reward models err more often than the sampler's hot samples beat its greedy answer, best of
    # K alone trains the model on answers worse than its own (configs/tiny.yaml: measured).
    include_greedy: bool = False
    # Share of the fine-tuning examples that replay the SFT step's demonstrations (its
    # dialogues.parquet), as InstructGPT mixes pretraining gradients into PPO: an anchor against
    # drifting from the gold answers. 0: winners only, the paper's recipe.
    sft_mix: float = Field(0.0, ge=0, lt=1)
    # The model that samples (the paper: 70B sampled for the smaller models, which were then
    # fine-tuned on its best answers). None: the model being fine-tuned. Else a registry alias of
    # this run's chat model (`rlhf-v2`), `name@alias` of another registered model, or a local
    # model directory (a pipeline artifact or an HF export). Answers travel as text, so its
    # tokenizer encodes the prompts and each reward model's its own inputs.
    teacher: str | None = None

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


def split_validation(prompts: list[tuple[str, list[dict], bool]], fraction: float
                     ) -> tuple[list[tuple[str, list[dict], bool]], list[tuple[str, list[dict], bool]]]:
    """(fine-tuning prompts, validation prompts): a fixed share of the prompts by key, the same in
    every iteration, for the temperature sweep only."""
    from steps.preference_schema import pair_split

    val = {k for k, _, _ in prompts if pair_split("rs-validation:" + k, fraction) == "eval"}
    return [p for p in prompts if p[0] not in val], [p for p in prompts if p[0] in val]


def subsample(prompts: list, limit: int, seed: int) -> list:
    """At most `limit` of the (key-sorted) prompts, seeded, in key order."""
    if len(prompts) <= limit:
        return prompts
    keep = set(np.random.default_rng(seed).choice(len(prompts), limit, replace=False).tolist())
    return [p for i, p in enumerate(prompts) if i in keep]


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


class RewardScorer:
    """One reward model with its own tokenizer (the sampler's may differ: a teacher's; `fallback`
    for a model directory without hf/tokenizer.model): probabilities (sigmoid of its scores) of
    answers to dialogues."""

    def __init__(self, rm_dir: Path, fallback):
        from model.reward import load_reward_model
        from model.tokenizer import Tokenizer

        self.cfg = ModelConfig.model_validate_json((rm_dir / "model_config.json").read_text())
        spm = rm_dir / "hf" / "tokenizer.model"
        self.tok = Tokenizer(spm) if spm.exists() else fallback
        self.model = load_reward_model(self.cfg, rm_dir)

    def probs(self, dialogues: list[Dialogue], candidates: list[list[str]], width: int) -> np.ndarray:
        """[len(dialogues), width]: candidate j of dialogue i in column j; -inf where none."""
        from model.reward import encode_example, score_sequences

        flat = [(i, j, encode_example(self.tok, dialogues[i], text, self.cfg.max_seq_len)[0])
                for i, cands in enumerate(candidates) for j, text in enumerate(cands)]
        grid = np.full((len(dialogues), width), -np.inf)
        if flat:
            scores = score_sequences(self.model, [ids for _, _, ids in flat], self.tok.pad_id).numpy()
            for (i, j, _), score in zip(flat, scores):
                grid[i, j] = sigmoid(score)
        return grid


def load_sampling_model(model_dir: Path):
    """(model on this worker's device, tokenizer) of a pipeline model artifact (model_config.json,
    model.safetensors, hf/) or of a Hugging Face Llama export (config.json, safetensors,
    tokenizer.model: what the MLflow registry holds)."""
    from model.generate import default_device_dtype
    from model.tokenizer import Tokenizer
    from steps.sft import load_chat_model, load_model

    if (model_dir / "model_config.json").exists():
        mcfg, tok = load_chat_model(model_dir)
        return load_model(mcfg, model_dir), tok
    from model.hf import import_hf

    device, dtype = default_device_dtype()
    model, _ = import_hf(model_dir, device=device, dtype=dtype)
    return model.eval(), Tokenizer(model_dir / "tokenizer.model")


def resolve_teacher(ctx, teacher: str) -> tuple[Path, dict[str, str]]:
    """The local directory of `rlhf.rejection.teacher` and what it resolved to (logged): a path
    as is; an alias through the MLflow registry, to the artifact directory of the step run that
    registered it (its `artifact_path` tag) or else a download of the registered HF export."""
    path = Path(teacher).expanduser()
    if path.is_dir():
        return path, {"teacher.path": str(path)}
    name, _, alias = teacher.removeprefix("models:/").rpartition("@")
    name = name or f"{ctx.cfg.run.name}-chat"
    if not ctx.tracking_uri:
        raise ValueError(f"rlhf.rejection.teacher={teacher!r} is not a directory, and this step runs without "
                         "MLflow tracking to resolve it as a registry alias")
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(ctx.tracking_uri)
    try:
        version = client.get_model_version_by_alias(name, alias)
    except Exception as e:
        raise ValueError(f"rlhf.rejection.teacher={teacher!r}: no model {name!r} with alias {alias!r} "
                         f"in the registry at {ctx.tracking_uri}") from e
    info = {"teacher.model": name, "teacher.alias": alias, "teacher.version": str(version.version),
            "teacher.run_id": str(version.run_id)}
    tagged = client.get_run(version.run_id).data.tags.get("artifact_path") if version.run_id else None
    if tagged and (Path(tagged) / "model_config.json").exists():
        return Path(tagged), {**info, "teacher.path": tagged}
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source,
                                                     dst_path=str(ctx.work_dir / "teacher"),
                                                     tracking_uri=ctx.tracking_uri))
    if (local / "MLmodel").exists() and (local / "model" / "config.json").exists():
        local = local / "model"  # an MLflow transformers model: the HF export sits in its model/ folder
    return local, {**info, "teacher.path": str(local)}


def sample_answers(sampler, tok, dialogues: list[Dialogue], params, batch_size: int) -> tuple[list[list[str]], int]:
    """K answers per dialogue (text), `batch_size` prompts per generate call (each prefilled once,
    its K continuations sharing the prefill), and the number of tokens generated."""
    from model.chat import encode_prompt
    from steps.engine.launch import report_progress

    answers: list[list[str]] = []
    tokens = 0
    for s in range(0, len(dialogues), batch_size):
        chunk = [encode_prompt(tok, d) for d in dialogues[s:s + batch_size]]
        samples = sampler.generate(chunk, params, first_index=s)  # streams follow the global index
        tokens += sum(len(x.tokens) + x.finished for x in samples)  # EOS counts as generated
        for i in range(len(chunk)):
            answers.append([tok.decode(x.tokens).strip() for x in samples[i * params.num_samples:
                                                                            (i + 1) * params.num_samples]])
        report_progress(len(answers) * params.num_samples, len(dialogues) * params.num_samples, "answers")
    return answers, tokens


def sample_and_score(policy_dir: str, rm_dirs: dict[str, str], dialogues: list[Dialogue], earlier: list[list[str]],
                     params, batch_size: int, include_greedy: bool = False
                     ) -> tuple[list[list[str]], dict[str, np.ndarray]]:
    """K answers per dialogue from the policy (K + 1 with `include_greedy`: its greedy answer
    last), then both reward models' probabilities for those answers and each dialogue's earlier
    winners: ({axis: [P, K (+1) + M]} with M = the most earlier winners of any prompt, missing
    ones scored -inf). Runs as one Ray task (engine.run_on_worker)."""
    from model.generate import TorchSampler

    policy, tok = load_sampling_model(Path(policy_dir))
    sampler = TorchSampler(policy, tok.eos_id, tok.pad_id)
    answers, _ = sample_answers(sampler, tok, dialogues, params, batch_size)
    if include_greedy:
        greedy, _ = sample_answers(sampler, tok, dialogues, dataclasses.replace(params, temperature=0.0, num_samples=1),
                                   batch_size)
        answers = [a + g for a, g in zip(answers, greedy)]
    del policy, sampler
    width = params.num_samples + include_greedy + max((len(e) for e in earlier), default=0)
    candidates = [a + e for a, e in zip(answers, earlier)]
    probs = {}
    for axis, rm_dir in rm_dirs.items():  # one reward model in memory at a time
        scorer = RewardScorer(Path(rm_dir), tok)
        probs[axis] = scorer.probs(dialogues, candidates, width)
        del scorer
    return answers, probs


def fingerprint_inputs(cfg, iteration: int) -> str | None:
    """A teacher given as a directory lies outside the artifact store: its identity (the
    artifact's fingerprint, or its files' names, sizes and times) joins rs_v{i}'s fingerprint, so
    new teacher weights re-run the step. A registry alias is resolved at run time (and logged);
    only its name is in the fingerprint: the DAG wires this pipeline's own versions as inputs."""
    teacher = cfg.rlhf.rejection.teacher
    path = Path(teacher).expanduser() if teacher else None
    if path is None or not path.is_dir():
        return None
    if (path / "manifest.json").exists():
        return "artifact:" + json.loads((path / "manifest.json").read_text())["fingerprint"]
    files = sorted(f for f in path.iterdir() if f.suffix in (".safetensors", ".json", ".model"))
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return "files:" + hashlib.blake2b(json.dumps(stamp).encode(), digest_size=8).hexdigest()


def replay_demonstrations(sft: Artifact, share: float, n_winners: int, seed: int) -> list[Dialogue]:
    """SFT demonstrations to mix with `n_winners` winners so that they make `share` of the mix:
    drawn without replacement (seeded; all of them, repeated, if the share asks for more)."""
    from steps.sft_data import from_table

    n = round(n_winners * share / (1 - share))
    if n == 0:
        return []
    demos = from_table(pq.read_table(sft.file("dialogues.parquet")))
    order = np.concatenate([np.random.default_rng([seed, r]).permutation(len(demos))
                            for r in range(-(-n // len(demos)))])[:n]
    return [demos[i] for i in order]


def run(ctx, model: Artifact, prefs: Artifact, rm_helpfulness: Artifact, rm_safety: Artifact, iteration: int,
        previous: Artifact | None = None, teacher: Artifact | None = None, sft: Artifact | None = None
        ) -> dict[str, float]:
    from model.generate import SamplingParams
    from steps.engine import run_on_worker
    from steps.sft import finetune

    rcfg: RejectionConfig = ctx.cfg.rlhf.rejection
    validation: list[tuple[str, list[dict], bool]] = []
    everything = prompts_of(pq.read_table(prefs.file("pairs.parquet")), 2**62, ctx.seed + iteration)
    if rcfg.tune.enabled:  # the sweep's validation prompts are never fine-tuned on, in any iteration
        everything, validation = split_validation(everything, rcfg.tune.validation_fraction)
    prompts = subsample(everything, rcfg.num_prompts, ctx.seed + iteration)
    if not prompts:
        raise ValueError(f"rs_v{iteration}: the accepted preference batches hold no train-split prompt")
    dialogues = [to_dialogue(turns) for _, turns, _ in prompts]
    is_safety = np.array([s for _, _, s in prompts])
    rm_dirs = {"helpfulness": str(rm_helpfulness.path), "safety": str(rm_safety.path)}
    metrics: dict[str, float] = {}

    sampler_dir = str(model.path)  # the paper's 70B sampling for a smaller model: a teacher
    if teacher is not None:  # wired by the DAG (an artifact of this pipeline: cached with it)
        sampler_dir = str(teacher.path)
        ctx.log_params({"teacher.path": sampler_dir, "teacher.step": teacher.step})
    elif rcfg.teacher:
        resolved, info = resolve_teacher(ctx, rcfg.teacher)
        sampler_dir = str(resolved)
        ctx.log_params(info)
        metrics["teacher.version"] = float(info.get("teacher.version", 0))

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
    if rcfg.tune.enabled and iteration in rcfg.tune.iterations and validation:
        from steps.rejection_tune import sweep

        validation = subsample(validation, rcfg.tune.num_prompts, ctx.seed + iteration)
        temperature, tuned = sweep(ctx, rcfg, sampler_dir, rm_dirs, [to_dialogue(t) for _, t, _ in validation],
                                   np.array([s for _, _, s in validation]), params, ctx.cfg.rlhf.safety_threshold)
        metrics.update(tuned)
        params = dataclasses.replace(params, temperature=temperature)  # the sweep's choice, this iteration
    answers, probs = run_on_worker(sample_and_score, rcfg.sampler, sampler_dir, rm_dirs, dialogues, earlier, params,
                                   rcfg.sample_batch_size, rcfg.include_greedy)
    reward = gated_reward(probs["helpfulness"], probs["safety"], is_safety[:, None], ctx.cfg.rlhf.safety_threshold)
    reward = np.where(np.isfinite(probs["safety"]), reward, -np.inf)  # absent earlier winners never win
    K = rcfg.num_samples
    greedy_won = float(np.mean(best_of(reward) == K)) if rcfg.include_greedy else None
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
    if rcfg.sft_mix > 0:
        if sft is None:
            raise ValueError(f"rs_v{iteration}: rlhf.rejection.sft_mix={rcfg.sft_mix} needs the SFT step's artifact")
        demos = replay_demonstrations(sft, rcfg.sft_mix, len(fine), ctx.seed + iteration)
        metrics["data.sft_replayed"] = len(demos)
        fine = [fine[i] if i < len(fine) else demos[i - len(fine)]  # interleaved, seeded
                for i in np.random.default_rng(ctx.seed + iteration).permutation(len(fine) + len(demos))]
    result, stats = finetune(ctx, f"rs_v{iteration}", model, fine, [], rcfg.train, rcfg.optim, rcfg.seq_len,
                             fit_check=True)
    # did it fit its winners? The engine's loss on them before the first step and after the last
    metrics |= {"loss.winners.before": result.history[0]["eval_loss_at_start"],
                "loss.winners.after": result.history[-1]["eval_loss"]}
    # from rlhf.ppo_from on, ppo_v{i} (trained from this model) is iteration i's chat model, `rlhf-v{i}`
    alias = f"rs-v{iteration}" if iteration >= ctx.cfg.rlhf.ppo_from else f"rlhf-v{iteration}"
    version = ctx.register_model(f"{ctx.cfg.run.name}-chat", ctx.out_dir / "hf", alias)
    (ctx.out_dir / "winners.json").write_text(json.dumps(winners))
    metrics |= {"prompts": len(prompts), "temperature": temperature, "pool.size": len(new_pool),
               "reward.max": curve["max"][-1], "reward.median": curve["median"][-1],
               "reward.gain": curve["max"][-1] - curve["median"][-1],
               "train_loss": result.final.get("loss"), "first_loss": result.history[0]["loss"],
               "registry_version": version, **{f"data.{k}": v for k, v in stats.items()},
               **result.epoch_losses(rcfg.train.epochs)}
    metrics.update({f"pool.from_v{src}": n / len(winners) for src, n in sorted(provenance.items())})
    if greedy_won is not None:
        metrics["winners.greedy"] = greedy_won  # share of prompts whose winner is the greedy answer
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
