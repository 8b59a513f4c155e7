"""Ghost Attention (GAtt) as a data transformation (RECIPE.md section 8, used after RLHF V3).

Given a multi-turn dialogue (its user messages) and a system instruction ("Answer in French."):
  1. attach the instruction to every user message, so the current model, sampling turn by
     turn, answers every turn under the instruction;
  2. rebuild the dialogue with the instruction only at the start (the system prompt of the
     first turn) and the original user messages after it;
  3. train only on the last assistant answer: the loss on every earlier turn, assistant
     answers included, is zeroed (Turn.train=False; the SFT packer honours it).
The model then learns to keep following an instruction it saw many turns ago.
"""

from __future__ import annotations

from collections.abc import Callable

from model.chat import Dialogue, Turn

Answerer = Callable[[Dialogue], str]  # a dialogue ending with a user turn -> the model's answer


def gatt_dialogue(user_messages: list[str], instruction: str, answer: Answerer) -> Dialogue:
    sampled: list[Turn] = []
    for msg in user_messages:
        sampled.append(Turn("user", f"{instruction}\n{msg}"))
        sampled.append(Turn("assistant", answer(Dialogue(list(sampled)))))
    turns = []
    for i, msg in enumerate(user_messages):
        last = i == len(user_messages) - 1
        turns.append(Turn("user", msg))
        turns.append(Turn("assistant", sampled[2 * i + 1].content, train=last))
    return Dialogue(turns, system=instruction, meta={"gatt": True})


def sampler_answerer(sampler, tok, params) -> Answerer:
    """Adapt model/generate.py's sampler (one prompt at a time) to an Answerer."""
    from model.chat import encode_prompt

    def answer(d: Dialogue) -> str:
        sample = sampler.generate([encode_prompt(tok, d)], params)[0]
        return tok.decode(sample.tokens).strip()

    return answer
