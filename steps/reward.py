"""Reward models (RECIPE.md section 7): `rm_helpfulness_v{i}` and `rm_safety_v{i}`.

Each is the newest chat model with its LM head replaced by a scalar head (model/reward.py),
trained on the shared engine with the binary ranking loss with a margin,
    L = -log(sigmoid(r(x, y_chosen) - r(x, y_rejected) - m(strength))),
on every preference batch accepted so far (`prefs_v{i}`'s pairs.parquet, train split), mixed
as in the paper:
  - helpfulness RM: every helpfulness pair of ours + `helpful_mix_other_ratio` (1.0: an equal
    amount) drawn uniformly, without replacement, from the pool {our safety pairs} U {every
    open-source pair};
  - safety RM: every safety pair of ours + every open-source safety ("harmless") pair, mixed
    `safety_mix_ratio` : 1 - ratio (90/10) with helpfulness pairs, ours and open-source.
"Ours" means `source == "vendor"` (the batches our annotation vendor delivers, including the
simulated vendor of the tiny preset); every other source (anthropic-hh, shp, ...) is
open-source. When a pool is smaller than the amount asked for, all of it is taken (never
duplicated) and the achieved share is logged (`data.other_share`).

A chosen and a rejected row of each pair go into one micro-batch ([2B, T], right-padded);
the engine sums the per-pair losses, divides by the number of pairs (`Objective.weight`) and
turns the count of correctly ranked pairs into accuracy (`mean_metrics`). Evaluation on the
held-out (`eval`) pairs of the RM's axis, per strength (the paper's Table 8), runs after
training in a Ray task (steps/reward_eval.py); the tiny preset also probes the demo world.
The RM is exported as `LlamaForSequenceClassification` (hf/) and registered as
`<run.name>-rm-<axis>` with alias `rlhf-v{i}`, tagged with the preference batches it saw.
`reward.tune.enabled` replaces the single training by a Ray Tune sweep (steps/reward_tune.py).
"""

from __future__ import annotations

import json
import re
from functools import partial
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field

from model.config import Section
from steps.engine.config import OptimConfig, StepResources, TrainConfig
from steps.preference_schema import STRENGTHS

if TYPE_CHECKING:  # steps receive artifacts; the runner (pipelines/) makes them
    from pipelines.artifacts import Artifact

VERSION = "1"

Margin = Literal["none", "small", "large"]
# m(strength) in STRENGTHS order: significantly_better, better, slightly_better, negligibly_better
MARGINS: dict[str, tuple[float, ...]] = {"none": (0.0, 0.0, 0.0, 0.0), "small": (1.0, 2 / 3, 1 / 3, 0.0),
                                         "large": (3.0, 2.0, 1.0, 0.0)}
AXES = ("helpfulness", "safety")
OURS = "vendor"  # `source` of our own annotation batches; anything else is open-source


class RewardTuneConfig(Section):
    """A Ray Tune grid over learning rate x margin table; the trial with the best accuracy on
    `validation_fraction` of the train split (never the eval split) becomes the step's model."""

    enabled: bool = False
    lrs: list[float] = Field(default_factory=lambda: [5e-6, 1e-5, 2e-5], min_length=1)
    margins: list[Margin] = Field(default_factory=lambda: ["small", "large"], min_length=1)
    num_samples: int = Field(1, ge=1)  # repeats of the grid, each with its own seed
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    axes: list[Literal["helpfulness", "safety"]] = Field(default_factory=lambda: list(AXES))
    # RLHF iterations that sweep; the others train once with `reward.optim` / `reward.margin`
    # (a sweep costs several trainings, and the data recipe it tunes stays the same)
    iterations: list[int] = Field(default_factory=lambda: [1])
    max_concurrent_trials: int = Field(1, ge=1)
    driver_cpus: float = Field(0.1, ge=0)  # each trial's driver; its Ray Train workers ask for the rest


class RewardConfig(Section):
    train: TrainConfig = TrainConfig(global_batch_size=512, epochs=1.0, num_workers=64, use_gpu=True,
                                     gpus_per_worker=1, cpus_per_worker=8)
    optim: OptimConfig = OptimConfig(lr=1e-5, warmup_fraction=0.03, min_warmup_steps=5)
    margin: Margin = "small"
    helpful_mix_other_ratio: float = Field(1.0, ge=0)  # helpfulness RM: + equal amount of safety/open data
    safety_mix_ratio: float = Field(0.9, gt=0, le=1)  # safety RM: 90% safety data, 10% helpfulness
    seq_len: int = Field(4096, ge=8)
    # The held-out share is not set here: each pair's split is fixed at ingestion
    # (`preference.eval_fraction`, pairs.parquet `split`), the same for both RMs and every iteration.
    tune: RewardTuneConfig = RewardTuneConfig()
    scorer: StepResources = StepResources(num_cpus=8, num_gpus=1)  # the Ray task scoring held-out pairs
    score_batch_size: int = Field(64, ge=1)
    world_eval: bool = False  # tiny preset: probe the demo world (refusals vs compliance, look-alikes)
    # tiny preset: the demo world's hand-made pairs on its unsafe and look-alike TRAIN prompts stand in
    # for the paper's open-source harmless data (Anthropic Harmless), source "demo-world"; see world_pairs
    demo_world_pairs: bool = False


# ----------------------------------------------------------------------------- data mixes
def is_ours(row: dict) -> bool:
    return row["source"] == OURS


def mix_pairs(rows: list[dict], axis: str, cfg: RewardConfig, seed: int) -> tuple[list[dict], dict[str, float]]:
    """The training pairs of the `axis` RM (rows: train split), and the mix's statistics."""
    rng = np.random.default_rng([seed, AXES.index(axis)])

    def draw(pool: list[dict], n: int) -> list[dict]:
        n = min(n, len(pool))
        return [pool[i] for i in sorted(rng.choice(len(pool), n, replace=False))] if n else []

    if axis == "helpfulness":
        core = [r for r in rows if r["axis"] == "helpfulness" and is_ours(r)]
        pool = [r for r in rows if (r["axis"] == "safety" and is_ours(r)) or not is_ours(r)]
        other = draw(pool, round(cfg.helpful_mix_other_ratio * len(core)))
    elif axis == "safety":
        core = [r for r in rows if r["axis"] == "safety"]  # ours + open-source harmless
        pool = [r for r in rows if r["axis"] == "helpfulness"]  # ours + open-source helpful
        other = draw(pool, round(len(core) * (1 - cfg.safety_mix_ratio) / cfg.safety_mix_ratio))
    else:
        raise ValueError(f"axis {axis!r} is not one of {AXES}")
    mixed = core + other
    stats = {"data.core_pairs": len(core), "data.other_pairs": len(other), "data.other_pool": len(pool),
             "data.other_share": len(other) / max(len(mixed), 1), "data.train_pairs": len(mixed)}
    return [mixed[i] for i in rng.permutation(len(mixed))], stats


def world_pairs(seed: int) -> list[dict]:
    """Open-source-style pairs from the demo world (tiny preset): for each unsafe and look-alike
    prompt of its train split, the gold answer against a worse one (world.preference_pair: a
    compliance to an unsafe request, a refusal or a useless answer to a harmless look-alike).
    They play the part of Anthropic Harmless in the safety mix: the simulated vendor's batches
    hold almost no false-refusal pairs (the SFT model seldom refuses a look-alike), so without
    them nothing tells the safety RM that refusing a harmless request is wrong."""
    import random

    from steps.world import REFUSAL, World, is_refusal, judge, strength

    world, rng = World(seed), random.Random(f"{seed}-reward-world-pairs")
    pairs = []
    for it in world.items("train"):
        if it.kind == "unsafe":
            pairs.append((it, *world.preference_pair(it, rng)))
        elif it.kind == "lookalike":  # always the false refusal, plus the world's other worse answer
            gap = judge(it, it.answer)["helpfulness"] - judge(it, REFUSAL)["helpfulness"]
            pairs.append((it, it.answer, REFUSAL, strength(gap)))
            chosen, rejected, s = world.preference_pair(it, rng)
            if not is_refusal(rejected):
                pairs.append((it, chosen, rejected, s))
    rows = []
    for i, (it, chosen, rejected, level) in enumerate(pairs):
        safety = it.kind == "unsafe" or is_refusal(rejected)
        rows.append({"pair_id": f"demo-world-{seed}-{i}", "prompt": [{"role": t.role, "content": t.content}
                                                                  for t in it.dialogue.turns],
                     "chosen": chosen, "rejected": rejected, "strength": level,
                     "axis": "safety" if safety else "helpfulness",
                     "safety_label": ("chosen_safe_rejected_unsafe" if it.kind == "unsafe" else "both_safe") if safety
                     else None, "source": "demo-world", "batch": f"demo-world-{seed}", "split": "train"})
    return rows


def split_validation(rows: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, validation): a fixed share of the train split by pair id (Tune's choice only)."""
    from steps.preference_schema import pair_split

    val = [r for r in rows if pair_split("validation:" + r["pair_id"], fraction) == "eval"]
    ids = {r["pair_id"] for r in val}
    return [r for r in rows if r["pair_id"] not in ids], val


# ----------------------------------------------------------------------------- tokenized pairs
PAIR_TOKENS = pa.schema([pa.field("chosen", pa.list_(pa.int32())), pa.field("rejected", pa.list_(pa.int32())),
                         pa.field("strength_id", pa.int8()), pa.field("pair_id", pa.string())])


def dialogue_of(prompt: list[dict]):
    from model.chat import Dialogue, Turn

    system = prompt[0]["content"] if prompt and prompt[0]["role"] == "system" else None
    turns = [Turn(t["role"], t["content"]) for t in prompt[1 if system is not None else 0:]]
    return Dialogue(turns, system)


def tokenize_pairs(tok, rows: list[dict], seq_len: int) -> tuple[pa.Table, int]:
    """Pairs -> PAIR_TOKENS rows (prompt + response + </s>, ends kept when too long), truncated count."""
    from model.reward import encode_example

    cols: dict[str, list] = {k: [] for k in PAIR_TOKENS.names}
    truncated = 0
    for r in rows:
        d = dialogue_of(r["prompt"])
        (c, tc), (j, tj) = encode_example(tok, d, r["chosen"], seq_len), encode_example(tok, d, r["rejected"], seq_len)
        truncated += tc + tj
        cols["chosen"].append(c)
        cols["rejected"].append(j)
        cols["strength_id"].append(STRENGTHS.index(r["strength"]))
        cols["pair_id"].append(r["pair_id"])
    return pa.table(cols, schema=PAIR_TOKENS), truncated


# ----------------------------------------------------------------------------- the objective
def collate_pairs(rows: dict, pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> one micro-batch: chosen rows 0..B-1, rejected rows B..2B-1, right-padded."""
    from model.reward import pad_right

    tokens, lengths = pad_right(list(rows["chosen"]) + list(rows["rejected"]), pad_id)
    return {"tokens": tokens, "lengths": lengths,
            "strength": torch.as_tensor(np.asarray(rows["strength_id"], dtype=np.int64))}


def ranking_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """SUM over pairs of -log(sigmoid(r_chosen - r_rejected - margin)) (= softplus of the negation,
    which stays finite for any gap)."""
    return torch.nn.functional.softplus(margin - (r_chosen - r_rejected)).sum()


def pair_loss(module: torch.nn.Module, batch: dict[str, torch.Tensor], margins: tuple[float, ...]):
    """Engine contract: (loss summed over the micro-batch's pairs, summed metrics)."""
    rewards = module(batch["tokens"], batch["lengths"])
    n = batch["strength"].shape[0]
    r_c, r_r = rewards[:n], rewards[n:]
    m = torch.tensor(margins, dtype=rewards.dtype, device=rewards.device)[batch["strength"]]
    return ranking_loss(r_c, r_r, m), {"accuracy": float((r_c > r_r).sum())}


def pair_count(batch: dict[str, torch.Tensor]) -> float:
    return float(batch["strength"].shape[0])


def build_objective(axis: str, mcfg, pad_id: int, margin: str, train_file: str, eval_files: list[str],
                    init_weights: str):
    from model.reward import RewardModel
    from steps.engine import Objective

    return Objective(name=f"rm_{axis}", build_module=partial(RewardModel, mcfg),
                     loss=partial(pair_loss, margins=MARGINS[margin]), train_files=[train_file],
                     eval_files=eval_files, columns=["chosen", "rejected", "strength_id"],
                     collate=partial(collate_pairs, pad_id=pad_id), init_weights=init_weights,
                     model_cfg=mcfg, weight=pair_count, mean_metrics=("accuracy",))


def trunk_weights(chat_weights, dest_dir) -> str:
    """The chat model's weights minus its LM head (the RM has none), streamed tensor by tensor."""
    from model.weights import ShardedWriter, WeightsReader

    writer = ShardedWriter(dest_dir)
    with WeightsReader(chat_weights) as reader:
        for name, t in reader.items():
            if name != "output.weight":
                writer.add(name, t)
    return str(writer.close())


# ----------------------------------------------------------------------------- the step
def run(ctx, prefs: Artifact, model: Artifact, axis: str, iteration: int = 1) -> dict[str, float]:
    from model.reward import export_hf_reward
    from steps.engine import train
    from steps.reward_eval import evaluate_rm
    from steps.sft import load_chat_model

    rcfg: RewardConfig = ctx.cfg.reward
    mcfg, tok = load_chat_model(model.path)
    rows = pq.read_table(prefs.file("pairs.parquet")).to_pylist()
    train_split = [r for r in rows if r["split"] == "train"] + (world_pairs(ctx.seed) if rcfg.demo_world_pairs else [])
    train_rows, stats = mix_pairs(train_split, axis, rcfg, ctx.seed)
    eval_rows = [r for r in rows if r["split"] == "eval" and r["axis"] == axis]
    batches = sorted({r["batch"] for r in train_rows + eval_rows})
    ctx.log_params({"reward.axis": axis, "reward.batches": ",".join(batches)})
    ctx.set_tags({"axis": axis, "data.batches": ",".join(batches)})

    data = ctx.out_dir / "pairs"
    data.mkdir(parents=True)
    eval_table, _ = tokenize_pairs(tok, eval_rows, rcfg.seq_len)
    pq.write_table(eval_table, data / "eval.parquet")
    init = trunk_weights(model.path, ctx.work_dir / "init")
    tune_on = rcfg.tune.enabled and axis in rcfg.tune.axes and iteration in rcfg.tune.iterations
    if tune_on:
        from steps.reward_tune import sweep

        fit_rows, val_rows = split_validation(train_rows, rcfg.tune.validation_fraction)
        stats["data.validation_pairs"] = len(val_rows)
    else:
        fit_rows = train_rows
    train_table, truncated = tokenize_pairs(tok, fit_rows, rcfg.seq_len)
    pq.write_table(train_table, data / "train.parquet")
    stats["data.truncated_sequences"] = truncated
    ctx.log_metrics(stats)

    def objective(margin: str, eval_file: str = "eval.parquet"):
        eval_files = [str(data / eval_file)] if pq.ParquetFile(data / eval_file).metadata.num_rows else []
        return build_objective(axis, mcfg, tok.pad_id, margin, str(data / "train.parquet"), eval_files, init)

    metrics: dict[str, float] = dict(stats)
    if tune_on:
        val_table, _ = tokenize_pairs(tok, val_rows, rcfg.seq_len)
        pq.write_table(val_table, data / "validation.parquet")
        # trials evaluate on the validation pairs (the engine's eval_accuracy), never the eval split
        result, margin, tuned = sweep(ctx, rcfg, partial(objective, eval_file="validation.parquet"))
        metrics.update(tuned)
    else:
        margin = rcfg.margin
        result = train(objective(margin), rcfg.train, rcfg.optim, work_dir=ctx.work_dir / "train",
                       out_dir=ctx.out_dir, seed=ctx.seed, tracking_uri=ctx.tracking_uri,
                       mlflow_run_id=ctx.mlflow_run_id)
    ctx.log_history_figure(result.history, ["loss", "eval_loss"], f"rm_{axis}_loss_curve.png", f"rm {axis} loss")
    (ctx.out_dir / "model_config.json").write_text(mcfg.model_dump_json(indent=2))
    metrics.update({"train_loss": result.final.get("loss"), "train_accuracy": result.final.get("accuracy"),
                    "steps": result.final.get("step"), "launch_seconds": result.launch_seconds})

    metrics.update(evaluate_rm(ctx, axis, mcfg, tok, ctx.out_dir / "model.safetensors", rows))
    export_hf_reward(ctx.out_dir / "model.safetensors", mcfg, ctx.out_dir / "hf", model.path / "hf", tok.pad_id)
    (ctx.out_dir / "reward.json").write_text(json.dumps(
        {"axis": axis, "margin": margin, "batches": batches, "metrics": metrics}, indent=2, default=float))
    # MLflow reserves aliases of the form v<N>: RLHF iteration i's RMs get `rlhf-v<i>`, as its chat model
    alias = f"rlhf-{m.group(1)}" if (m := re.search(r"_(v\d+)$", ctx.step)) else ctx.step
    metrics["registry_version"] = ctx.register_model(
        f"{ctx.cfg.run.name}-rm-{axis}", ctx.out_dir / "hf", alias,
        tags={"axis": axis, "data.batches": ",".join(batches), "margin": margin})
    return metrics
