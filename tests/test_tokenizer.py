"""SentencePiece BPE the LLaMA way: exact round trips of any UTF-8, digits split, byte
fallback, chat symbols as single pieces; packing and the train/val split."""

import random

import numpy as np
import pytest

from model.tokenizer import CHAT_SYMBOLS, Tokenizer
from steps.tokenizer import in_val_split, pack


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = random.Random(0)
    words = ("the river stone light over under market bridge people night day water 12 305 "
             "2024 def return value").split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(3000)]
    return Tokenizer.train(lines, tmp_path_factory.mktemp("sp") / "tok", vocab_size=400)


@pytest.mark.parametrize("text", ["plain words over the bridge", "price: 1234.50 € (2024)", "emoji 😀🚀 ok",
                                  "中文和日本語のテキスト", "  indented\n\tcode  with  spaces ", "ß ∑ ∫ 🏳️‍🌈",
                                  "[INST] typed by a user [/INST]"])
def test_any_utf8_round_trips_exactly(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_numbers_are_split_into_digits(tok):
    pieces = [tok.id_to_piece(i) for i in tok.encode("2024")]
    assert [p.lstrip("▁") for p in pieces if p.lstrip("▁")] == ["2", "0", "2", "4"]


def test_unknown_characters_fall_back_to_bytes(tok):
    pieces = [tok.id_to_piece(i) for i in tok.encode("€")]
    assert pieces[-3:] == ["<0xE2>", "<0x82>", "<0xAC>"] and tok.unk_id not in tok.encode("€")


def test_special_ids_and_chat_symbols(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 2, 3, 400)
    for sym in CHAT_SYMBOLS:
        assert len(tok.sp.encode(sym)) in (1, 2) and tok.special_id(sym) > 3
    assert tok.encode("x", bos=True, eos=True)[0] == 1 and tok.encode("x", eos=True)[-1] == 2


def test_training_is_deterministic(tmp_path):
    lines = [f"line {i} of the corpus with words and numbers {i * 7}" for i in range(500)]
    a = Tokenizer.train(lines, tmp_path / "a", 320)
    b = Tokenizer.train(lines, tmp_path / "b", 320)
    assert a.model_path.read_bytes() == b.model_path.read_bytes()


def test_pack_concatenates_and_drops_only_the_tail():
    rows = pack([[1, 5, 6, 2], [1, 7, 2], [1, 8, 9, 9, 2]], length=4)
    assert rows.tolist() == [[1, 5, 6, 2], [1, 7, 2, 1], [8, 9, 9, 2]]
    assert rows.dtype == np.int32


def test_val_split_is_by_document_and_stable():
    ids = [f"src/doc{i}" for i in range(10_000)]
    val = [i for i in ids if in_val_split(i, 0.05)]
    assert 400 < len(val) < 600 and val == [i for i in ids if in_val_split(i, 0.05)]


def test_unprefixed_encoding_drops_only_the_dummy_prefix(tok):
    """What a Hugging Face tokenizer does with text after a control symbol (model/chat.py)."""
    assert tok.encode_unprefixed(" the river") == tok.encode("the river")  # the typed space is the prefix
    pieces = [tok.id_to_piece(i) for i in tok.encode_unprefixed("the river")]
    assert not pieces[0].startswith("\u2581") and tok.id_to_piece(tok.encode("the river")[0]).startswith("\u2581")
    for text in ("\nthe river\n", "  two  spaces ", "price 1234 €"):
        # the decoder drops one leading space, taking it for the prefix: nothing else is lost
        assert tok.sp.decode(tok.encode_unprefixed(text)) == (text[1:] if text.startswith(" ") else text)
