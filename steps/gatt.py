"""Ghost Attention (GAtt, RECIPE.md section 8): teach a chat model to keep obeying a system
instruction many turns after it was given. A switchable step (`rlhf.gatt.enabled`) of the
RLHF loop, applied to the chat model of iteration `rlhf.gatt.after_iteration`.

Data construction (steps/gatt_data.py), for each synthetic conversation (an instruction,
2..`turns` user messages):
  1. draw the instruction as in the paper: synthetic constraints (a hobby, a language, a
     public figure) randomly combined, after one of the fixed `instructions` when given;
  2. attach it to every user message (on later turns sometimes in a shortened wording), so the
     current model, sampling turn by turn, answers every turn under it (it follows an
     instruction in the message it answers; the problem GAtt fixes is forgetting one given turns
     earlier); with reward models as inputs each turn's answer is the best of `num_samples` by
     the gated reward, as in rejection sampling;
  3. rebuild the dialogue with the full instruction only at the start (the system prompt) and
     the original user messages after it;
  4. train only on the last assistant answer: the loss on every earlier turn, assistant
     answers included, is zeroed (Turn.train=False; the SFT packer honours it).
Conversations of random length train every later turn position. Answers cut off at
`max_new_tokens` are dropped with their conversation (a half answer is no target). The
fine-tuning set mixes in `replay_ratio` times as many of the input model's own training
dialogues, so the new skill does not wear down the old ones.

On the tiny preset the demo world supplies the user messages and measures the outcome: over
held-out multi-turn conversations under a system instruction, the fraction of answers after
the first that still obey it, for the model before and after GAtt (greedy, each model
answering on top of its own earlier answers).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from model.chat import Dialogue
from model.config import Section
from steps.engine.config import OptimConfig, StepResources, TrainConfig
from steps.gatt_data import (
    TEMPLATES,
    gatt_dialogues,
    make_instruction,
    roll_out,
    sampling_messages,
    with_instruction,
)

__all__ = ["GAttConfig", "gatt_dialogues", "roll_out", "run", "with_instruction"]  # data helpers live in gatt_data

if TYPE_CHECKING:  # steps receive artifacts; the runner (pipelines/) makes them
    from pipelines.artifacts import Artifact

VERSION = "4"  # 2: wider demo world, held-out figures on its test split; 3: transformers chat layout;
# 4: varied instructions, answers chosen by the reward models


class GAttConfig(Section):
    """Ghost Attention (RECIPE 8): synthetic multi-turn data under a system instruction."""

    enabled: bool = True
    after_iteration: int = Field(3, ge=0)  # applied to the RLHF V3 model (0: the SFT model)
    num_dialogues: int = Field(1000, ge=1)
    min_turns: int = Field(2, ge=2)
    turns: int = Field(3, ge=2)  # conversations have min_turns..turns user messages
    # Fixed instructions, one of which leads every conversation's instruction when given (the tiny
    # preset: the demo world's styles, which its judge checks), and the paper's synthetic
    # constraints by category (steps/gatt_data.py TEMPLATES), 0..max_constraints of them added
    # (1.. without fixed ones), from distinct categories, in random order.
    instructions: list[str] = Field(default_factory=list)
    constraints: dict[str, list[str]] = Field(default_factory=lambda: {
        "hobby": ["tennis", "gardening", "chess", "painting", "hiking", "astronomy"],
        "language": ["French", "Spanish", "German", "Italian"],
        "persona": ["Napoleon", "Oscar Wilde", "Marie Curie", "a pirate", "Sherlock Holmes"]})
    max_constraints: int = Field(2, ge=0)
    shorten: float = Field(0.5, ge=0, le=1)  # chance a later turn carries the shortened instruction
    # K answers per turn, the best by the gated reward kept (when the step gets reward models)
    num_samples: int = Field(4, ge=1)
    sources: list[str] = Field(default_factory=list)  # dialogue files whose first user turns are the messages
    max_user_tokens: int = Field(256, ge=1)  # user messages longer than this are not used
    demo_world: bool = False  # tiny preset: messages and the outcome measure from the demo world
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(1024, ge=1)
    sample_batch_size: int = Field(64, ge=1)
    sampler: StepResources = StepResources(num_cpus=8, num_gpus=1)  # the Ray task that samples answers
    replay_ratio: float = Field(1.0, ge=0)  # + this many input-model training dialogues per GAtt dialogue
    seq_len: int = 4096
    train: TrainConfig = TrainConfig(global_batch_size=64, epochs=1.0, num_workers=64, use_gpu=True,
                                     gpus_per_worker=1, cpus_per_worker=8)
    optim: OptimConfig = OptimConfig(lr=1e-5, warmup_steps=0)

    @model_validator(mode="after")
    def _turns_ordered(self) -> GAttConfig:
        if self.min_turns > self.turns:
            raise ValueError(f"min_turns ({self.min_turns}) exceeds turns ({self.turns})")
        unknown = set(self.constraints) - set(TEMPLATES)
        if unknown:
            raise ValueError(f"constraints: unknown categories {sorted(unknown)} (known: {sorted(TEMPLATES)})")
        if not self.instructions and not any(self.constraints.values()):
            raise ValueError("instructions and constraints are both empty: no instruction to train on")
        return self

def follow_rates(model, tok, conversations, max_new_tokens: int) -> tuple[dict[str, float], list[Dialogue]]:
    """Greedy roll-out of each world InstructionDialogue (system prompt, then its questions);
    the fraction of first answers and of later answers that obey the instruction, and the
    rolled-out dialogues."""
    from model.generate import SamplingParams
    from steps.sft import model_answerer
    from steps.world import follows

    answer = model_answerer(model, tok, SamplingParams(max_new_tokens=max_new_tokens, temperature=0))
    rollouts = [d for d, _ in roll_out([(c.system, c.questions) for c in conversations], answer,
                                       stop_unfinished=False)]
    first, later = [], []
    for c, d in zip(conversations, rollouts):
        for t, reply in enumerate(d.turns[1::2]):
            (first if t == 0 else later).append(follows(c.style, reply.content))
    return {"first_turn": float(np.mean(first)), "later_turns": float(np.mean(later))}, rollouts


def sample_gatt_dialogues(model_dir: str, conversations, params, batch_size: int, rm_dirs: dict[str, str] | None = None,
                          threshold: float = 0.15) -> tuple[list[Dialogue | None], dict[str, list[float]]]:
    """gatt_dialogues with the model of the artifact at model_dir (on its GPU in bf16 where
    the worker has one), each turn's answer the best of params.num_samples by the gated reward
    when reward models are given (else the one sample); runs as its own Ray task
    (engine.run_on_worker). Also returns the first and chosen answers' rewards."""
    import dataclasses

    from steps.gatt_data import best_of_k_answerer
    from steps.sft import load_chat_model, load_model, model_answerer

    mcfg, tok = load_chat_model(Path(model_dir))
    model = load_model(mcfg, Path(model_dir))  # on the worker's GPU in bf16 where it has one
    if rm_dirs:
        answer, log = best_of_k_answerer(model, tok, params, rm_dirs, threshold, batch_size)
        return gatt_dialogues(conversations, answer), log
    single = dataclasses.replace(params, num_samples=1)  # no reward models: answers as they come
    return gatt_dialogues(conversations, model_answerer(model, tok, single, batch_size)), {}


def user_messages(cfg, world, tok) -> list[str]:
    """The pool of user messages conversations are drawn from: the demo world's plain
    questions, or the first user turns of `sources` dialogue files short enough to stack."""
    from steps.sft import resolve
    from steps.sft_data import read_dialogues

    pool = world.user_messages("train") if cfg.demo_world else []
    for src in cfg.sources:
        for f in resolve(src):
            pool += [d.turns[0].content for d in read_dialogues(f)
                     if len(tok.encode(d.turns[0].content)) <= cfg.max_user_tokens]
    if len(pool) < cfg.turns:
        raise ValueError(f"rlhf.gatt: {len(pool)} user messages, need at least turns={cfg.turns}")
    return pool


def run(ctx, model: Artifact, rm_helpfulness: Artifact | None = None, rm_safety: Artifact | None = None
        ) -> dict[str, float]:
    from model.generate import SamplingParams
    from steps.engine import run_on_worker
    from steps.sft import finetune, judge_model, load_chat_model, load_model
    from steps.sft_data import from_table
    from steps.world import STYLES, World, follows

    gcfg = ctx.cfg.rlhf.gatt
    mcfg, tok = load_chat_model(model.path)
    world = World(ctx.seed)
    rng = random.Random(ctx.seed)
    pool = user_messages(gcfg, world, tok)
    conversations = []
    for _ in range(gcfg.num_dialogues):
        instruction = make_instruction(rng, gcfg.instructions, gcfg.constraints, gcfg.max_constraints)
        msgs = rng.sample(pool, rng.randint(gcfg.min_turns, gcfg.turns))
        conversations.append((instruction.text, msgs, sampling_messages(instruction, msgs, rng, gcfg.shorten)))
    params = SamplingParams(max_new_tokens=gcfg.max_new_tokens, temperature=gcfg.temperature,
                            top_p=gcfg.top_p, num_samples=gcfg.num_samples, seed=ctx.seed)
    both = rm_helpfulness is not None and rm_safety is not None
    rm_dirs = {"helpfulness": str(rm_helpfulness.path), "safety": str(rm_safety.path)} if both else None
    built, rewards = run_on_worker(sample_gatt_dialogues, gcfg.sampler, str(model.path), conversations, params,
                                   gcfg.sample_batch_size, rm_dirs, ctx.cfg.rlhf.safety_threshold)
    dialogues = [d for d in built if d is not None]
    if not dialogues:
        raise RuntimeError("rlhf.gatt: no conversation had every answer finish within max_new_tokens")
    data = {"conversations": len(conversations), "kept": len(dialogues),
            "instructions.distinct": len({c[0] for c in conversations}),
            "instructions.shortened_turns": float(np.mean([c[0] not in m for c in conversations for m in c[2][1:]]))}
    if rewards:  # best of K by the gated reward: what choosing gained over the first sample
        data |= {"reward.first": float(np.mean(rewards["first"])), "reward.chosen": float(np.mean(rewards["chosen"]))}
    if gcfg.demo_world:  # how often the sampled target answers obey the instruction (judge-side only)
        styled = [(next((p for s, p in STYLES.items() if d.system.startswith(s)), None), d) for d in dialogues]
        data["target_follows"] = float(np.mean([follows(p, d.turns[-1].content) for p, d in styled if p]))
    # the input model's own fine-tuning data rides along, so GAtt adds a skill without
    # wearing down the others (the paper merges GAtt data into an iteration's fine-tuning set)
    own = from_table(pq.read_table(model.file("dialogues.parquet")))
    replay = rng.sample(own, min(len(own), round(gcfg.replay_ratio * len(dialogues))))
    data["replayed"] = len(replay)
    ctx.log_metrics({f"data.{k}": v for k, v in data.items()})
    mixed = dialogues + replay
    rng.shuffle(mixed)
    result, stats = finetune(ctx, "gatt", model, mixed, [], gcfg.train, gcfg.optim, gcfg.seq_len)
    metrics = {"train_loss": result.final.get("loss"), "first_loss": result.history[0]["loss"],
               "steps": result.final.get("step"), **{f"data.{k}": v for k, v in {**data, **stats}.items()}}
    if gcfg.demo_world:
        held_out = world.instruction_dialogues("test", gcfg.turns)
        items = world.items("test")
        report, shown = {}, {"model": [], "system": [], "dialogue": []}
        for name, weights in (("before", model.file("model.safetensors")), ("gatt", result.weights)):
            m = load_model(mcfg, weights)
            rates, rollouts = follow_rates(m, tok, held_out, 32)
            report[name] = {f"follow.{k}": v for k, v in rates.items()}
            report[name]["helpfulness"] = judge_model(m, tok, items, 32)[0]["helpfulness"]
            for d in rollouts[::3]:
                shown["model"].append(name)
                shown["system"].append(d.system)
                shown["dialogue"].append(" | ".join(t.content for t in d.turns))
        ctx.log_table(shown, "gatt_heldout_rollouts.json")  # the same conversations, before and after
        for name, values in report.items():
            metrics.update({f"judge.{name}.{k}": v for k, v in values.items()})
        (ctx.out_dir / "judge.json").write_text(json.dumps(report, indent=2))
        sample = dialogues[:50]  # GAtt dialogues only, not the replay
        ctx.log_table({"system": [d.system for d in sample],
                       "dialogue": [" | ".join(t.content for t in d.turns) for d in sample]}, "gatt_dialogues.json")
    metrics["registry_version"] = ctx.register_model(f"{ctx.cfg.run.name}-chat", ctx.out_dir / "hf", "gatt")
    return metrics
