"""Ghost Attention's data (RECIPE.md section 8; steps/gatt.py runs the step).

Instructions, as in the paper: synthetic constraints drawn from categories (a hobby, a language,
a public figure to act as), randomly combined, plus optional fixed instructions (the tiny
preset's demo-world styles, which its judge can check). Each constraint has a full and a
shortened wording ("Act as Napoleon." / "Figure: Napoleon."): while sampling, the full
instruction goes with the first user message and, on later turns, sometimes the shortened one,
so the model learns to answer under varied phrasings; the training dialogue keeps the full
instruction as its system prompt.

Answers are sampled turn by turn (`roll_out`) and, when reward models are given, chosen like
rejection sampling: K answers per turn, the one with the highest gated reward kept
(steps/gated_reward.py, the reward rejection sampling and PPO use), unfinished answers last.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np

from model.chat import Dialogue, Turn

# category -> (full wording, shortened wording) of one constraint
TEMPLATES: dict[str, tuple[str, str]] = {
    "hobby": ("You enjoy {}.", "Hobby: {}."),
    "language": ("Always answer in {}.", "Language: {}."),
    "persona": ("Act as {}.", "Figure: {}."),
}

# dialogues ending with a user turn -> the model's answers, and whether each ended at EOS
Answerer = Callable[[list[Dialogue]], list[tuple[str, bool]]]


@dataclasses.dataclass(frozen=True)
class Instruction:
    text: str  # full wording: the training dialogue's system prompt, and the first turn's
    short: str  # the shortened wording some later turns carry while sampling


def make_instruction(rng: random.Random, fixed: list[str], constraints: dict[str, list[str]],
                     max_constraints: int) -> Instruction:
    """One fixed instruction (if any are given) followed by 0..max_constraints synthetic
    constraints (at least one when there is no fixed instruction) from distinct categories, in
    random order. Fixed instructions keep their wording in the shortened form."""
    cats = [c for c, values in constraints.items() if values]
    lo = 0 if fixed else 1
    n = min(rng.randint(lo, max(lo, max_constraints)), len(cats))
    full, short = ([rng.choice(fixed)] * 2) if fixed else ("", "")
    full, short = [full] if full else [], [short] if short else []
    for cat in rng.sample(cats, n):
        value = rng.choice(constraints[cat])
        long_form, short_form = TEMPLATES[cat]
        full.append(long_form.format(value))
        short.append(short_form.format(value))
    if not full:
        raise ValueError("rlhf.gatt: no instruction to draw (instructions and constraints are empty)")
    return Instruction(" ".join(full), " ".join(short))


def with_instruction(instruction: str, message: str) -> str:
    return f"{instruction} {message}"


def sampling_messages(instruction: Instruction, messages: list[str], rng: random.Random,
                      shorten: float) -> list[str]:
    """The user messages the model answers while sampling: each with the instruction attached,
    the full wording first, the shortened one on a later turn with probability `shorten`."""
    return [with_instruction(instruction.short if t and rng.random() < shorten else instruction.text, m)
            for t, m in enumerate(messages)]


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


def gatt_dialogues(conversations: list[tuple], answer: Answerer) -> list[Dialogue | None]:
    """(instruction, user messages[, the messages as sampled]) per conversation -> GAtt training
    dialogues (the instruction as system prompt, the plain messages, the loss on the last answer
    only); None where an answer did not finish. Without sampled messages, the instruction is
    attached to every message as is."""
    sampled_msgs = [c[2] if len(c) > 2 else [with_instruction(c[0], m) for m in c[1]] for c in conversations]
    sampled = roll_out([(None, msgs) for msgs in sampled_msgs], answer)
    out: list[Dialogue | None] = []
    for (instruction, msgs, *_), (d, finished) in zip(conversations, sampled):
        if not finished:
            out.append(None)
            continue
        rebuilt = []
        for t, msg in enumerate(msgs):
            rebuilt += [Turn("user", msg), Turn("assistant", d.turns[2 * t + 1].content, train=t == len(msgs) - 1)]
        out.append(Dialogue(rebuilt, system=instruction, meta={"gatt": True}))
    return out


def best_of_k_answerer(model, tok, params, rm_dirs: dict[str, str], threshold: float,
                       batch_size: int = 64) -> tuple[Answerer, dict[str, list[float]]]:
    """An Answerer that samples params.num_samples answers per dialogue and returns the one with
    the highest gated reward (both reward models, loaded once); unfinished answers win only when
    no answer finished. Each call (one per turn) draws fresh streams (seed + call number). Also
    returns the rewards of the first and of the chosen answer per call, for the step's log."""
    from model.chat import encode_prompt
    from model.generate import TorchSampler
    from steps.engine.launch import report_progress
    from steps.gated_reward import gated_reward
    from steps.rejection import RewardScorer

    sampler = TorchSampler(model, tok.eos_id, tok.pad_id)
    scorers = {axis: RewardScorer(Path(d), tok) for axis, d in rm_dirs.items()}
    K, calls = params.num_samples, itertools.count()
    log: dict[str, list[float]] = {"first": [], "chosen": []}

    def answer(dialogues: list[Dialogue]) -> list[tuple[str, bool]]:
        p = dataclasses.replace(params, seed=params.seed + 7919 * next(calls))
        texts, done = [], []
        for s in range(0, len(dialogues), batch_size):
            samples = sampler.generate([encode_prompt(tok, d) for d in dialogues[s:s + batch_size]], p, first_index=s)
            for i in range(0, len(samples), K):
                texts.append([tok.decode(x.tokens).strip() for x in samples[i:i + K]])
                done.append([x.finished for x in samples[i:i + K]])
            report_progress(len(texts) * K, len(dialogues) * K, "answers")
        probs = {axis: sc.probs(dialogues, texts, K) for axis, sc in scorers.items()}
        reward = gated_reward(probs["helpfulness"], probs["safety"], np.zeros((len(dialogues), 1), bool), threshold)
        ranked = np.where(np.array(done), reward, reward - 10.0)  # rewards are probabilities: finished first
        best = ranked.argmax(axis=1)
        log["first"] += reward[:, 0].tolist()
        log["chosen"] += reward[np.arange(len(dialogues)), best].tolist()
        return [(texts[i][b], done[i][b]) for i, b in enumerate(best)]

    return answer, log
