"""The LLaMA-2 chat template, shared by SFT, reward models, sampling and evaluation.

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] {user} [/INST] ...

Control strings ([INST], [/INST], <<SYS>>, <</SYS>>) are single pieces of our tokenizer and are
only ever emitted by this module: content is encoded separately, and a control string typed
inside content is spelled with byte pieces, so "[INST]" in a user message stays text (no
prompt injection through the template). Loss masks are True on assistant answer tokens and
the </s> that ends each answer, nothing else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from model.tokenizer import CHAT_SYMBOLS, Tokenizer

_CONTROL = re.compile("|".join(re.escape(s) for s in sorted(CHAT_SYMBOLS, key=len, reverse=True)))


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    content: str
    train: bool = True  # assistant turns: whether the loss covers them (GAtt zeroes earlier turns)


@dataclass
class Dialogue:
    turns: list[Turn]
    system: str | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i, t in enumerate(self.turns):
            want = "user" if i % 2 == 0 else "assistant"
            if t.role != want:
                raise ValueError(f"turn {i}: expected a {want} turn, got {t.role!r} (turns alternate, user first)")


_SENTINEL = "\U000F0000"  # a private-use character: never in real text, always byte-encoded


def encode_content(tok: Tokenizer, text: str) -> list[int]:
    """Text -> ids, with any control string inside it spelled as bytes (never a control token).

    Each control string is swapped for a sentinel character before encoding (so the text
    around it tokenizes exactly as without the split), then the sentinel's byte pieces are
    replaced by the control string's own bytes."""
    found = _CONTROL.findall(text)
    if not found:
        return tok.encode(text)
    ids = tok.encode(_CONTROL.sub(_SENTINEL, text))
    byte = [tok.sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
    marker = [byte[b] for b in _SENTINEL.encode()]
    out, i, k = [], 0, 0
    while i < len(ids):
        if ids[i:i + len(marker)] == marker:
            out += [byte[b] for b in found[k].encode()]
            i, k = i + len(marker), k + 1
        else:
            out.append(ids[i])
            i += 1
    return out


def encode_dialogue(tok: Tokenizer, d: Dialogue, for_generation: bool = False) -> tuple[list[int], list[bool]]:
    """(token ids, loss mask). With for_generation the sequence ends after the last [/INST]."""
    inst, end_inst = tok.special_id("[INST]"), tok.special_id("[/INST]")
    ids: list[int] = []
    mask: list[bool] = []

    def add(new: list[int], train: bool) -> None:
        ids.extend(new)
        mask.extend([train] * len(new))

    for i in range(0, len(d.turns), 2):
        user = d.turns[i]
        prompt = [tok.bos_id, inst]
        if i == 0 and d.system:
            prompt += [tok.special_id("<<SYS>>")] + encode_content(tok, f"\n{d.system}\n") + \
                      [tok.special_id("<</SYS>>")] + tok.encode("\n\n")
        prompt += encode_content(tok, user.content) + [end_inst]
        add(prompt, False)
        if i + 1 < len(d.turns):
            answer = d.turns[i + 1]
            add(encode_content(tok, answer.content) + [tok.eos_id], answer.train)
    if for_generation and (len(d.turns) % 2 == 0):
        raise ValueError("a generation prompt must end with a user turn")
    return ids, mask


def encode_prompt(tok: Tokenizer, d: Dialogue) -> list[int]:
    return encode_dialogue(tok, d, for_generation=True)[0]


def render(d: Dialogue) -> str:
    """The dialogue as template text."""
    out = []
    for i in range(0, len(d.turns), 2):
        sys = f"<<SYS>>\n{d.system}\n<</SYS>>\n\n" if i == 0 and d.system else ""
        out.append(f"<s>[INST] {sys}{d.turns[i].content} [/INST]")
        if i + 1 < len(d.turns):
            out.append(f" {d.turns[i + 1].content} </s>")
    return "".join(out)


_TURN = re.compile(r"<s>\[INST\] (?:<<SYS>>\n(?P<sys>.*?)\n<</SYS>>\n\n)?(?P<user>.*?) \[/INST\]"
                   r"(?: (?P<answer>.*?) </s>)?", re.S)


def parse(text: str) -> Dialogue:
    """Inverse of render()."""
    turns, system = [], None
    pos = 0
    for m in _TURN.finditer(text):
        if m.start() != pos:
            raise ValueError(f"not chat-template text at offset {pos}: {text[pos:pos + 40]!r}")
        pos = m.end()
        if m.group("sys") is not None:
            system = m.group("sys")
        turns.append(Turn("user", m.group("user")))
        if m.group("answer") is not None:
            turns.append(Turn("assistant", m.group("answer")))
    if pos != len(text):
        raise ValueError(f"not chat-template text at offset {pos}: {text[pos:pos + 40]!r}")
    return Dialogue(turns, system)
