"""The Arrow schema of ingested preference pairs (RECIPE.md section 6): the table every
`prefs_v{i}` artifact holds as `pairs.parquet` and the reward models, rejection sampling and
evaluation read. The vendor-facing batch contract (JSONL/Parquet rows a vendor writes) is
documented in the README and validated by steps/preferences.py; this is what it becomes once
accepted: the prompt normalised to a list of turns, plus the accepted batch's version and a
fixed train/eval split per pair.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

STRENGTHS = ("significantly_better", "better", "slightly_better", "negligibly_better")
AXES = ("helpfulness", "safety")
SAFETY_LABELS = ("chosen_safe_rejected_unsafe", "both_safe", "both_unsafe")
ROLES = ("system", "user", "assistant")

TURN = pa.struct([pa.field("role", pa.string(), nullable=False), pa.field("content", pa.string(), nullable=False)])

PAIR_SCHEMA = pa.schema([
    pa.field("pair_id", pa.string(), nullable=False),
    # earlier turns, an optional system turn first, ending with the user turn being answered
    pa.field("prompt", pa.list_(TURN), nullable=False),
    pa.field("chosen", pa.string(), nullable=False),
    pa.field("rejected", pa.string(), nullable=False),
    pa.field("strength", pa.string(), nullable=False),  # one of STRENGTHS
    pa.field("axis", pa.string(), nullable=False),  # one of AXES
    pa.field("safety_label", pa.string()),  # one of SAFETY_LABELS; null unless axis == safety
    pa.field("source", pa.string(), nullable=False),  # "vendor", "anthropic-hh", ...
    pa.field("annotator_id", pa.string()),
    pa.field("annotated_at", pa.string()),
    pa.field("model_chosen", pa.string()),
    pa.field("model_rejected", pa.string()),
    pa.field("batch", pa.string(), nullable=False),  # accepted batch version "<seq:04d>-<digest[:12]>"
    pa.field("split", pa.string(), nullable=False),  # "train" | "eval": fixed per pair (pair_split)
])


def pair_split(pair_id: str, eval_fraction: float) -> str:
    """A pair's held-out membership, fixed forever by its id (never by arrival order)."""
    h = int.from_bytes(hashlib.blake2b(pair_id.encode(), digest_size=8).digest(), "little")
    return "eval" if h / 2**64 < eval_fraction else "train"
