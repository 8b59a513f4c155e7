"""Ghost Attention (GAtt, RECIPE.md section 8): teach a chat model to keep obeying a system
instruction many turns after it was given. A switchable step (`rlhf.gatt.enabled`) of the
RLHF loop, applied to the chat model of iteration `rlhf.gatt.after_iteration`.

Data construction, for each synthetic conversation (an instruction, 2..`turns` user messages):
  1. attach the instruction to every user message, so the current model, sampling turn by
     turn, answers every turn under the instruction (it follows an instruction in the
     message it answers; the problem GAtt fixes is forgetting one given turns earlier);
  2. rebuild the dialogue with the instruction only at the start (the system prompt) and the
     original user messages after it;
  3. train only on the last assistant answer: the loss on every earlier turn, assistant
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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from model.chat import Dialogue, Turn
from model.config import Section
from steps.engine.config import OptimConfig, StepResources, TrainConfig

if TYPE_CHECKING:  # steps receive artifacts; the runner (pipelines/) makes them
    from pipelines.artifacts import Artifact

VERSION = "3"  # 2: wider demo world, held-out figures on its test split; 3: transformers chat layout


class GAttConfig(Section):
    """Ghost Attention (RECIPE 8): synthetic multi-turn data under a system instruction."""

    enabled: bool = True
    after_iteration: int = Field(3, ge=0)  # applied to the RLHF V3 model (0: the SFT model)
    num_dialogues: int = Field(1000, ge=1)
    min_turns: int = Field(2, ge=2)
    turns: int = Field(3, ge=2)  # conversations have min_turns..turns user messages
    # The paper's synthetic constraints: hobbies, a language, a public figure to act as.
    instructions: list[str] = Field(default_factory=lambda: [
        "Always answer in French.", "Act as Napoleon.", "Act as Oscar Wilde.", "You enjoy tennis.",
        "You love gardening.", "Always answer in Spanish.", "Answer with a haiku.",
        "Act as a pirate."], min_length=1)
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
        return self

# dialogues ending with a user turn -> the model's answers, and whether each ended at EOS
# (steps/sft.py:model_answerer is the one backed by a model)
Answerer = Callable[[list[Dialogue]], list[tuple[str, bool]]]


def with_instruction(instruction: str, message: str) -> str:
    return f"{instruction} {message}"


def roll_out(prompts: list[tuple[str | None, list[str]]], answer: Answerer,
             stop_unfinished: bool = True) -> list[tuple[Dialogue, bool]]:
    """(system prompt, user messages) per conversation -> (the dialogue with the model's answer
    after every message, whether every answer finished). Turn by turn, one batch per turn over
    the conversations still going; with stop_unfinished a conversation ends at its first
    answer cut off at max_new_tokens."""
    turns: list[list[Turn]] = [[] for _ in prompts]
    ok = [True] * len(prompts)
    for t in range(max(len(msgs) for _, msgs in prompts)):
        live = [i for i, (_, msgs) in enumerate(prompts) if t < len(msgs) and (ok[i] or not stop_unfinished)]
        for i in live:
            turns[i].append(Turn("user", prompts[i][1][t]))
        for i, (text, finished) in zip(live, answer([Dialogue(list(turns[i]), prompts[i][0]) for i in live])):
            turns[i].append(Turn("assistant", text))
            ok[i] = ok[i] and finished
    return [(Dialogue(tr, system), good) for (system, _), tr, good in zip(prompts, turns, ok)]


def gatt_dialogues(conversations: list[tuple[str, list[str]]], answer: Answerer) -> list[Dialogue | None]:
    """(instruction, user messages) per conversation -> GAtt training dialogues; None where an
    answer did not finish."""
    sampled = roll_out([(None, [with_instruction(ins, m) for m in msgs]) for ins, msgs in conversations], answer)
    out: list[Dialogue | None] = []
    for (instruction, msgs), (d, finished) in zip(conversations, sampled):
        if not finished:
            out.append(None)
            continue
        rebuilt = []
        for t, msg in enumerate(msgs):
            rebuilt += [Turn("user", msg), Turn("assistant", d.turns[2 * t + 1].content, train=t == len(msgs) - 1)]
        out.append(Dialogue(rebuilt, system=instruction, meta={"gatt": True}))
    return out


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


def sample_gatt_dialogues(model_dir: str, conversations, params, batch_size: int) -> list[Dialogue | None]:
    """gatt_dialogues with the model of the artifact at model_dir (on its GPU in bf16 where
    the worker has one); runs as its own Ray task (engine.run_on_worker)."""

    from steps.sft import load_chat_model, load_model, model_answerer

    mcfg, tok = load_chat_model(Path(model_dir))
    model = load_model(mcfg, Path(model_dir))  # on the worker's GPU in bf16 where it has one
    return gatt_dialogues(conversations, model_answerer(model, tok, params, batch_size))


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


def run(ctx, model: Artifact) -> dict[str, float]:
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
    conversations = [(rng.choice(gcfg.instructions), rng.sample(pool, rng.randint(gcfg.min_turns, gcfg.turns)))
                     for _ in range(gcfg.num_dialogues)]
    params = SamplingParams(max_new_tokens=gcfg.max_new_tokens, temperature=gcfg.temperature,
                            top_p=gcfg.top_p, seed=ctx.seed)
    built = run_on_worker(sample_gatt_dialogues, gcfg.sampler, str(model.path), conversations, params,
                          gcfg.sample_batch_size)
    dialogues = [d for d in built if d is not None]
    if not dialogues:
        raise RuntimeError("rlhf.gatt: no conversation had every answer finish within max_new_tokens")
    data = {"conversations": len(conversations), "kept": len(dialogues)}
    if gcfg.demo_world:  # how often the sampled target answers obey the instruction (judge-side only)
        data["target_follows"] = float(np.mean([follows(STYLES[d.system], d.turns[-1].content)
                                                for d in dialogues if d.system in STYLES]))
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
