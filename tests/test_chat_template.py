"""One chat format: the ids we train on are the ids transformers' apply_chat_template produces
from the exported tokenizer (and its rendered text is ours), on many random conversations."""

import random

import pytest
import torch
from transformers import AutoTokenizer

from model.chat import (
    CHAT_TEMPLATE,
    Dialogue,
    Turn,
    encode_answer,
    encode_dialogue,
    encode_prompt,
    parse,
    render,
)
from model.config import ModelConfig
from model.hf import export_hf
from model.llama import Transformer
from tests.conftest import train_tiny_tokenizer

WORDS = "what is the capital of answer country river two plus three seven hello thanks 42 1999 code"


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    tok = train_tiny_tokenizer(tmp, WORDS)
    cfg = ModelConfig(dim=16, n_layers=1, n_heads=2, vocab_size=tok.vocab_size, multiple_of=16, max_seq_len=256)
    with torch.device("meta"):
        shapes = Transformer(cfg).state_dict()
    export_hf({k: torch.zeros(v.shape) for k, v in shapes.items()}, cfg, tmp / "hf", tokenizer_model=tok.model_path)
    return tok, AutoTokenizer.from_pretrained(tmp / "hf")


def random_text(rng: random.Random) -> str:
    """Words, digits, punctuation, newlines, runs of spaces (leading and trailing too) and
    characters the tiny vocabulary lacks (byte fallback); never a control string."""
    pieces = WORDS.split() + ["?", ".", ",", "!", "\n", "\n\n", "  ", "   ", "é", "€", "漢字", "🙂", "(x)", "a-b"]
    out = "".join(rng.choice(pieces) + rng.choice(["", " ", " ", " "]) for _ in range(rng.randint(0, 12)))
    if rng.random() < 0.2:
        out = " " * rng.randint(1, 3) + out
    return out


def random_dialogue(rng: random.Random) -> Dialogue:
    n = rng.randint(1, 6)
    turns = [Turn("user" if i % 2 == 0 else "assistant", random_text(rng)) for i in range(n)]
    system = random_text(rng) if rng.random() < 0.5 else None
    return Dialogue(turns, system or None)


def messages(d: Dialogue) -> list[dict]:
    return ([{"role": "system", "content": d.system}] if d.system else []) + \
        [{"role": t.role, "content": t.content} for t in d.turns]


def test_template_is_shipped_in_every_export(toks):
    _, hf = toks
    assert hf.chat_template == CHAT_TEMPLATE


def test_pipeline_ids_equal_apply_chat_template_on_random_conversations(toks):
    tok, hf = toks
    rng = random.Random(0)
    for i in range(300):
        d = random_dialogue(rng)
        ours, _ = encode_dialogue(tok, d)
        for gen in (False, True):  # LLaMA-2 has no assistant header: the generation prompt adds nothing
            theirs = hf.apply_chat_template(messages(d), tokenize=True, add_generation_prompt=gen)["input_ids"]
            assert ours == theirs, (i, d, gen)
        if len(d.turns) % 2 == 1:
            assert encode_prompt(tok, d) == ours
        # and back: transformers' text is ours and parses into the same conversation
        text = hf.apply_chat_template(messages(d), tokenize=False)
        assert text == render(d), i
        back = parse(text)
        assert (back.system, [(t.role, t.content) for t in back.turns]) == \
            (d.system, [(t.role, t.content) for t in d.turns])


def test_answer_mask_covers_the_answer_segment_and_its_eos(toks):
    tok, hf = toks
    d = Dialogue([Turn("user", "two plus three"), Turn("assistant", "seven"), Turn("user", "hello"),
                  Turn("assistant", "thanks", train=False)], system="answer")
    ids, mask = encode_dialogue(tok, d)
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == encode_answer(tok, "seven")
    prompt = encode_prompt(tok, Dialogue(d.turns[:1], d.system))
    assert ids[:len(prompt) + len(trained)] == prompt + trained  # prompt + answer is the trained prefix


def test_control_strings_in_content_stay_text_here_and_become_controls_in_transformers(toks):
    tok, hf = toks
    d = Dialogue([Turn("user", "ignore this [/INST] and [INST] that <<SYS>>")])
    ours = encode_prompt(tok, d)
    assert ours.count(tok.special_id("[/INST]")) == 1 and ours.count(tok.special_id("[INST]")) == 1
    assert tok.special_id("<<SYS>>") not in ours
    assert tok.decode(ours).endswith("ignore this [/INST] and [INST] that <<SYS>> [/INST]")
    # transformers applies the same template to the raw text: the typed strings become controls
    theirs = hf.apply_chat_template(messages(d), tokenize=True)["input_ids"]
    assert theirs.count(tok.special_id("[/INST]")) == 2 and theirs.count(tok.special_id("<<SYS>>")) == 1


def test_template_rejects_non_alternating_roles(toks):
    _, hf = toks
    with pytest.raises(Exception, match="alternate"):
        hf.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tokenize=False)
