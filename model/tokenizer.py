"""SentencePiece BPE tokenizer, trained and used the LLaMA way (RECIPE.md section 2).

BPE, numbers split into single digits, unknown UTF-8 falling back to bytes (so any text
round-trips exactly), ids 0/1/2 = <unk>/<s>/</s> as in LLaMA, plus a pad id and the chat
template's control strings as single user-defined pieces.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

# The chat template's control strings (model/chat.py). One token each keeps tiny models' sequences
# short; chat.py encodes user content separately so typed "[INST]" never becomes a control token.
CHAT_SYMBOLS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")


class Tokenizer:
    def __init__(self, model_path: str | Path):
        self.model_path = Path(model_path)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        self.vocab_size: int = self.sp.get_piece_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.unk_id: int = self.sp.unk_id()
        # LLaMA has no pad token; we reserve one so batches can be padded without aliasing EOS.
        pad = self.sp.pad_id()
        self.pad_id: int = pad if pad >= 0 else self.eos_id
        self._unprefixed: spm.SentencePieceProcessor | None = None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_unprefixed(self, text: str) -> list[int]:
        """Ids of `text` without SentencePiece's dummy-prefix space: how a Hugging Face tokenizer
        built from this model (Metaspace, prepend_scheme "first") encodes text that follows a
        control symbol. The chat format's segments are encoded this way (model/chat.py)."""
        if self._unprefixed is None:
            # the same model with normalizer_spec.add_dummy_prefix = false: a second occurrence of
            # ModelProto field 3 (normalizer_spec) holding field 3 (add_dummy_prefix) = 0, which
            # protobuf merges into the first (no protobuf import needed)
            proto = self.model_path.read_bytes() + b"\x1a\x02\x18\x00"
            self._unprefixed = spm.SentencePieceProcessor(model_proto=proto)
        return self._unprefixed.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def special_id(self, piece: str) -> int:
        i = self.sp.piece_to_id(piece)
        if i == self.unk_id and piece != self.sp.id_to_piece(self.unk_id):
            raise KeyError(f"{piece!r} is not a piece of {self.model_path}")
        return i

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    @staticmethod
    def train(
        texts: Iterable[str] | Iterator[str],
        model_prefix: str | Path,
        vocab_size: int,
        *,
        split_digits: bool = True,
        byte_fallback: bool = True,
        character_coverage: float = 0.99995,
        input_sentence_size: int = 10_000_000,
        max_sentence_length: int = 16_384,
        seed: int = 0,
        num_threads: int = 2,
    ) -> Tokenizer:
        """Train a LLaMA-style BPE model on `texts` (one sentence/line per item); returns it loaded.

        `<prefix>.model` is written; the vocab is fixed at `vocab_size` (byte pieces included).
        """
        model_prefix = Path(model_prefix)
        model_prefix.parent.mkdir(parents=True, exist_ok=True)
        proto = io.BytesIO()
        spm.set_random_generator_seed(seed)  # input sampling/shuffling is seeded: same corpus, same vocab
        spm.SentencePieceTrainer.train(
            sentence_iterator=(t for t in texts if t),
            model_writer=proto,
            model_type="bpe",
            vocab_size=vocab_size,
            split_digits=split_digits,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=max_sentence_length,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            user_defined_symbols=list(CHAT_SYMBOLS),
            # LLaMA's settings: keep whitespace runs (code), no NFKC so text round-trips exactly.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_by_unicode_script=True,
            num_threads=num_threads,
            minloglevel=2,
        )
        path = model_prefix.with_suffix(".model")
        path.write_bytes(proto.getvalue())
        return Tokenizer(path)
