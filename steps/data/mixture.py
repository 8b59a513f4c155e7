"""The pretraining mixture: per-source up- and down-sampling (RECIPE.md section 1).

A source sets either `epochs` (passes over its cleaned documents; Wikipedia 2.45 in LLaMA) or
`weight` (its share of the mixture's tokens, with `total_tokens` or, when unset, the size of
the cleaned corpus). Weights turn into epochs = weight * total / source_tokens. A source then
contributes floor(epochs) full copies plus a seeded sample of the fractional part: a
document's extra copy is kept when a hash of (seed, id, copy) falls below that fraction, so
the choice is deterministic, independent of order, and identical on every worker.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

from steps.data.config import SourceConfig


@dataclass(frozen=True)
class SourcePlan:
    source: str
    docs_in: int
    tokens_in: int
    epochs: float
    expected_tokens_out: float
    share: float  # of the mixture's tokens


def plan_mixture(stats: dict[str, tuple[int, int]], sources: list[SourceConfig],
                 total_tokens: int | None = None) -> dict[str, SourcePlan]:
    """Per-source epochs from cleaned (docs, tokens) counts and the config."""
    total_in = sum(t for _, t in stats.values())
    target = total_tokens or total_in
    epochs: dict[str, float] = {}
    for src in sources:
        docs, tokens = stats.get(src.name, (0, 0))
        if src.epochs is not None:
            epochs[src.name] = src.epochs
        else:
            epochs[src.name] = (src.weight * target / tokens) if tokens else 0.0
    out_tokens = {s.name: epochs[s.name] * stats.get(s.name, (0, 0))[1] for s in sources}
    total_out = sum(out_tokens.values()) or 1.0
    return {s.name: SourcePlan(s.name, stats.get(s.name, (0, 0))[0], stats.get(s.name, (0, 0))[1],
                               epochs[s.name], out_tokens[s.name], out_tokens[s.name] / total_out)
            for s in sources}


def unit_hash(seed: int, doc_id: str, copy: int) -> float:
    h = hashlib.blake2b(f"{seed}\x00{doc_id}\x00{copy}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


def copies(doc_id: str, epochs: float, seed: int) -> int:
    """How many times a document appears in the mixture."""
    whole = math.floor(epochs)
    frac = epochs - whole
    return whole + (1 if frac > 0 and unit_hash(seed, doc_id, whole) < frac else 0)


def apply_batch(batch: dict, epochs: dict[str, float], seed: int) -> dict[str, list]:
    """Ray Data map_batches: repeat/drop documents per their source's epochs; adds `copy`."""
    cols = ("id", "source", "text", "metadata")
    out: dict[str, list] = {c: [] for c in (*cols, "copy")}
    for i in range(len(batch["id"])):
        n = copies(str(batch["id"][i]), epochs[str(batch["source"][i])], seed)
        for k in range(n):
            for c in cols:
                out[c].append(batch[c][i])
            out["copy"].append(k)
    return out


def plan_table(plans: dict[str, SourcePlan]) -> dict[str, list]:
    rows = [asdict(p) for p in plans.values()]
    return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}
