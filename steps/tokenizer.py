"""Tokenizer step (RECIPE.md section 2): train SentencePiece BPE on the mixed corpus, then
tokenize it into packed fixed-length sequences for pretraining.

Input: the data step's artifact (`docs/*.parquet`, one row per document, with repeats from
the mixture). Output:
    tokenizer.model            SentencePiece BPE: split digits, byte fallback, chat symbols
    train/*.parquet val/*.parquet   `tokens`: int32[seq_len + 1] (input = [:-1], target = [1:])
    meta.json                  vocab/ids, counts, and the unigram baseline loss of the val set

Documents are split into train/val by a hash of their id, so the mixture's repeated copies
of a document never straddle the split. Each document is `<s> text </s>`; documents are
concatenated and cut into sequences inside each Ray Data batch (the tail of a batch that
does not fill a sequence is dropped: at most one sequence per batch of documents).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from model.config import Section
from model.tokenizer import Tokenizer

if TYPE_CHECKING:  # steps receive artifacts; the runner (pipelines/) makes them
    from pipelines.artifacts import Artifact

VERSION = "1"


class TokenizerConfig(Section):
    vocab_size: int = Field(32_000, ge=64)
    model_type: Literal["bpe"] = "bpe"
    split_digits: bool = True
    byte_fallback: bool = True
    character_coverage: float = Field(0.99995, gt=0, le=1)
    input_sentence_size: int = 10_000_000  # sentences SentencePiece samples for training
    max_sentence_length: int = 16_384
    seq_len: int = Field(4096, ge=8)  # packed pretraining sequence length
    val_fraction: float = Field(0.01, ge=0, lt=0.5)
SEQUENCE_SCHEMA = pa.schema([pa.field("tokens", pa.list_(pa.int32()), nullable=False)])
ENCODE_BATCH = 512  # documents per Ray Data batch
SHARD_ROWS = 65_536  # sequences per output Parquet file


def in_val_split(doc_id: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")
    return h / 2**64 < val_fraction


def training_sentences(docs: Path, limit: int, max_len: int) -> Iterator[str]:
    """Lines of the corpus for SentencePiece (it learns from 'sentences'); bounded in count."""
    n = 0
    for file in sorted(docs.glob("*.parquet")):
        for batch in pq.ParquetFile(file).iter_batches(columns=["text"], batch_size=1024):
            for text in batch.column("text").to_pylist():
                for line in text.split("\n"):
                    if line.strip():
                        yield line[:max_len]
                        n += 1
                        if n >= limit:
                            return


def pack(token_lists: list[list[int]], length: int) -> np.ndarray:
    """Concatenate documents and cut into rows of `length` tokens; drops the last partial row."""
    flat = np.fromiter((t for ids in token_lists for t in ids), dtype=np.int32)
    rows = len(flat) // length
    return flat[: rows * length].reshape(rows, length)


@lru_cache(maxsize=2)
def _tokenizer(model_path: str) -> Tokenizer:
    return Tokenizer(model_path)  # loaded once per worker process, not once per batch


def encode_and_pack(batch: dict[str, np.ndarray], model_path: str, length: int) -> dict[str, list]:
    """Ray Data map_batches: a batch of documents -> packed `<s> doc </s> <s> doc ...` rows."""
    tok = _tokenizer(model_path)
    ids = tok.encode_batch([str(t) for t in batch["text"]])
    return {"tokens": list(pack([[tok.bos_id, *x, tok.eos_id] for x in ids], length))}


def tokenize_split(docs_dir: Path, out_dir: Path, model_path: Path, length: int, val_fraction: float,
                   split: str) -> int:
    """Encode and pack one split with Ray Data; returns the number of sequences written."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same corpus -> same sequence order
    want_val = split == "val"
    ds = ray.data.read_parquet(str(docs_dir), columns=["id", "text"])
    ds = ds.filter(lambda row: in_val_split(row["id"], val_fraction) == want_val)
    ds = ds.map_batches(encode_and_pack, fn_kwargs={"model_path": str(model_path), "length": length},
                        batch_size=ENCODE_BATCH, batch_format="numpy")
    out_dir.mkdir(parents=True, exist_ok=True)
    n, part, writer, writer_rows = 0, 0, None, 0
    try:  # stream to shards of SHARD_ROWS sequences: memory stays bounded whatever the corpus size
        for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
            if writer is None or writer_rows >= SHARD_ROWS:
                if writer is not None:
                    writer.close()
                    part += 1
                writer = pq.ParquetWriter(out_dir / f"part-{part:05d}.parquet", SEQUENCE_SCHEMA)
                writer_rows = 0
            rows = [np.asarray(r, dtype=np.int32) for r in batch["tokens"]]
            writer.write_table(pa.table({"tokens": pa.array(rows, type=pa.list_(pa.int32()))},
                                        schema=SEQUENCE_SCHEMA))
            writer_rows += len(rows)
            n += len(rows)
    finally:
        if writer is not None:
            writer.close()
    return n


def unigram_loss(train_dir: Path, val_dir: Path, vocab_size: int) -> tuple[float, float]:
    """Cross-entropy (nats/token) of the val targets under the train unigram distribution
    (add-one smoothed), and the entropy of the train unigram: the baseline pretraining must beat."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for f in sorted(train_dir.glob("*.parquet")):
        flat = pq.read_table(f).column("tokens").combine_chunks().flatten().to_numpy()
        counts += np.bincount(flat, minlength=vocab_size)[:vocab_size]
    logp = np.log(counts / counts.sum())
    val = np.zeros(vocab_size, dtype=np.float64)
    for f in sorted(val_dir.glob("*.parquet")):
        col = pq.read_table(f).column("tokens").combine_chunks()
        if len(col):
            targets = col.flatten().to_numpy().reshape(len(col), -1)[:, 1:]  # what the model predicts
            val += np.bincount(targets.ravel(), minlength=vocab_size)[:vocab_size]
    p = counts / counts.sum()
    entropy = float(-(p * logp).sum())
    return (float(-(val * logp).sum() / max(val.sum(), 1)), entropy)


def roundtrip_rate(tok: Tokenizer, docs_dir: Path, n: int = 200) -> float:
    """Fraction of sampled documents whose text decodes back exactly (byte fallback: 1.0)."""
    files = sorted(docs_dir.glob("*.parquet"))
    texts = pq.read_table(files[0], columns=["text"]).column("text").to_pylist()[:n] if files else []
    ok = sum(tok.decode(tok.encode(t)) == t for t in texts)
    return ok / max(len(texts), 1)


def run(ctx, corpus: Artifact) -> dict[str, float]:
    tcfg = ctx.cfg.tokenizer
    docs = corpus.path / "docs"
    tok = Tokenizer.train(
        training_sentences(docs, limit=2 * tcfg.input_sentence_size, max_len=tcfg.max_sentence_length),
        ctx.out_dir / "tokenizer",
        tcfg.vocab_size,
        split_digits=tcfg.split_digits,
        byte_fallback=tcfg.byte_fallback,
        character_coverage=tcfg.character_coverage,
        input_sentence_size=tcfg.input_sentence_size,
        max_sentence_length=tcfg.max_sentence_length,
        seed=ctx.seed,
    )
    length = tcfg.seq_len + 1
    n_train = tokenize_split(docs, ctx.out_dir / "train", tok.model_path, length, tcfg.val_fraction, "train")
    n_val = tokenize_split(docs, ctx.out_dir / "val", tok.model_path, length, tcfg.val_fraction, "val")
    if n_train == 0 or n_val == 0:
        raise ValueError(f"tokenizer: the corpus gives {n_train} train / {n_val} val sequences of "
                         f"{length} tokens; lower tokenizer.seq_len or tokenizer.val_fraction, or add data")
    val_unigram, train_entropy = unigram_loss(ctx.out_dir / "train", ctx.out_dir / "val", tok.vocab_size)
    meta = {
        "vocab_size": tok.vocab_size, "seq_len": tcfg.seq_len,
        "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id, "unk_id": tok.unk_id,
        "n_train": n_train, "n_val": n_val,
        "train_tokens": n_train * tcfg.seq_len, "val_tokens": n_val * tcfg.seq_len,
        "unigram_entropy_nats": val_unigram, "train_unigram_entropy_nats": train_entropy,
    }
    (ctx.out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    metrics = {
        "vocab_size": tok.vocab_size, "train_sequences": n_train, "val_sequences": n_val,
        "train_tokens": n_train * tcfg.seq_len, "unigram_loss": val_unigram,
        "unigram_perplexity": math.exp(val_unigram), "roundtrip_exact": roundtrip_rate(tok, docs),
    }
    ctx.log_artifact(tok.model_path)
    return metrics
