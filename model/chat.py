"""The LLaMA-2 chat format, defined once: the text, the token ids we train on, and the Jinja
`chat_template` every HF export carries (model/hf.py), which produce the same thing.

    <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s><s>[INST] {user} [/INST] ...

The ids: `encode_dialogue` cuts the text at its control symbols (<s>, </s>, [INST], [/INST],
<<SYS>>, <</SYS>>: one id each) and encodes each stretch of text between them on its own,
without SentencePiece's dummy-prefix space. That is exactly what a Hugging Face tokenizer
built from our tokenizer.model does with the rendered text (`apply_chat_template`): its
added tokens split the text, and its Metaspace pre-tokenizer adds no prefix to a stretch that
does not start the string. So a model trained here sees at serving time, through transformers
or any stack that applies the shipped template, the ids it was trained on
(tests/test_chat_template.py checks this on many random conversations).

Injection safety: on our side a control string typed inside content ("[INST]" in a user
message) is spelled with byte pieces, never the control id, so user text cannot open or close
a turn. A transformers tokenizer does not do this: applying the template to such text makes
the typed "[INST]" (and "<s>", "</s>") the control token, as with Meta's own template. Content
that contains control strings is therefore encoded differently on the two sides, by design;
serve untrusted text through this module's encoder (or strip control strings first).

Loss masks are True on an assistant answer's tokens (the text between [/INST] and </s>,
including its leading and trailing space) and the </s> that ends it, nothing else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from model.tokenizer import CHAT_SYMBOLS, Tokenizer

# The format as a Jinja chat template (transformers' apply_chat_template, vLLM, TGI). An optional
# first "system" message; then user and assistant messages alternating, user first. Content is
# used verbatim (Meta's template strips it; we do not, so text and ids round-trip exactly).
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('roles must alternate user/assistant, user first (after an optional system message)') }}"
    "{%- endif -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{ bos_token + '[INST] ' }}"
    "{%- if loop.first and system -%}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{%- endif -%}"
    "{{ m['content'] + ' [/INST]' }}"
    "{%- else -%}"
    "{{ ' ' + m['content'] + ' ' + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

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


def encode_content(tok: Tokenizer, text: str, prefix: bool = True) -> list[int]:
    """Text -> ids, with any control string inside it spelled as bytes (never a control token).
    prefix=False: without SentencePiece's dummy-prefix space (text that follows a control symbol).

    Each control string is swapped for a sentinel character before encoding (so the text
    around it tokenizes exactly as without the split), then the sentinel's byte pieces are
    replaced by the control string's own bytes."""
    encode = tok.encode if prefix else tok.encode_unprefixed
    found = _CONTROL.findall(text)
    if not found:
        return encode(text)
    ids = encode(_CONTROL.sub(_SENTINEL, text))
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


def _parts(tok: Tokenizer, d: Dialogue):
    """The rendered dialogue as (control id or text, trained) pieces, in order: render()'s text
    cut at its control symbols."""
    for i in range(0, len(d.turns), 2):
        yield tok.bos_id, False
        yield tok.special_id("[INST]"), False
        if i == 0 and d.system:
            yield " ", False
            yield tok.special_id("<<SYS>>"), False
            yield f"\n{d.system}\n", False
            yield tok.special_id("<</SYS>>"), False
            yield f"\n\n{d.turns[i].content} ", False
        else:
            yield f" {d.turns[i].content} ", False
        yield tok.special_id("[/INST]"), False
        if i + 1 < len(d.turns):
            answer = d.turns[i + 1]
            yield f" {answer.content} ", answer.train
            yield tok.eos_id, answer.train


def encode_dialogue(tok: Tokenizer, d: Dialogue, for_generation: bool = False) -> tuple[list[int], list[bool]]:
    """(token ids, loss mask). With for_generation the sequence ends after the last [/INST]."""
    if for_generation and (len(d.turns) % 2 == 0):
        raise ValueError("a generation prompt must end with a user turn")
    ids: list[int] = []
    mask: list[bool] = []
    for part, train in _parts(tok, d):
        new = [part] if isinstance(part, int) else encode_content(tok, part, prefix=False)
        ids.extend(new)
        mask.extend([train] * len(new))
    return ids, mask


def encode_answer(tok: Tokenizer, text: str) -> list[int]:
    """An assistant answer as it follows encode_prompt's ids: its text segment and </s>."""
    return encode_content(tok, f" {text} ", prefix=False) + [tok.eos_id]


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
