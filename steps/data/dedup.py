"""Deduplication: exact (normalised-text hash), CCNet line-level, and fuzzy (MinHash + LSH).

The numeric core is plain numpy and runs in-process (unit tests, the benchmark); the Ray Data
path (`dedup_dataset`) distributes the same functions: signatures and band keys in
`map_batches`, candidate grouping with a Ray Data `groupby` on (band, key), and a union-find
over the (small) set of candidate pairs on the driver. Within each duplicate cluster the
document that comes first in the pipeline's order (source order in the config, then id) is
kept, and every removed document records which document it duplicated.

MinHash: words are hashed once (crc32), word n-gram shingles are combined from word hashes
with vectorised arithmetic (no per-shingle string hashing), and the permutations are
`(a * h + b) mod (2^61 - 1)` over 32-bit shingle hashes, so products fit in uint64.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from steps.data.config import DedupConfig

MERSENNE = np.uint64((1 << 61) - 1)
MAX_HASH = np.uint64((1 << 32) - 1)
_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """NFKC, lower case, punctuation removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def exact_key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(normalize(text).encode(), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class Permutations:
    a: np.ndarray  # [num_perm] uint64
    b: np.ndarray

    @classmethod
    def make(cls, num_perm: int, seed: int = 1) -> Permutations:
        rng = np.random.default_rng(seed)
        a = rng.integers(1, (1 << 32) - 1, size=num_perm, dtype=np.uint64)
        b = rng.integers(0, (1 << 32) - 1, size=num_perm, dtype=np.uint64)
        return cls(a, b)


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """32-bit hashes of the word n-grams of the normalised text (unique). [S] uint64"""
    words = normalize(text).split()
    if not words:
        return np.zeros(1, dtype=np.uint64)
    w = np.fromiter((zlib.crc32(x.encode()) for x in words), dtype=np.uint64, count=len(words))
    n = min(ngram, len(w))
    h = np.zeros(len(w) - n + 1, dtype=np.uint64)
    for k in range(n):  # polynomial combination of the n word hashes, wrapping in uint64
        h = h * np.uint64(0x100000001B3) + w[k: len(w) - n + 1 + k]
    h ^= h >> np.uint64(29)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(32)
    return np.unique(h & MAX_HASH)


def signature(hashes: np.ndarray, perms: Permutations, chunk: int = 8192) -> np.ndarray:
    """MinHash signature [num_perm] uint32 of one document's shingle hashes."""
    sig = np.full(len(perms.a), MAX_HASH, dtype=np.uint64)
    for start in range(0, len(hashes), chunk):  # bounded memory for book-sized documents
        h = hashes[start: start + chunk, None]
        np.minimum(sig, (((h * perms.a) + perms.b) % MERSENNE & MAX_HASH).min(axis=0), out=sig)
    return sig.astype(np.uint32)


def minhash_signatures(texts: Iterable[str], cfg: DedupConfig) -> np.ndarray:
    """[N, num_perm] uint32 signatures."""
    perms = Permutations.make(cfg.num_perm)
    return np.stack([signature(shingle_hashes(t, cfg.ngram), perms) for t in texts]) if texts else \
        np.zeros((0, cfg.num_perm), np.uint32)


def band_keys(sigs: np.ndarray, bands: int) -> np.ndarray:
    """[N, bands] uint64: one hash per band of rows (LSH)."""
    n, p = sigs.shape
    rows = p // bands
    view = np.ascontiguousarray(sigs).reshape(n, bands, rows).astype(np.uint64)
    mult = np.uint64(0x9E3779B97F4A7C15) ** np.arange(rows, dtype=np.uint64)
    keys = (view * mult).sum(axis=2, dtype=np.uint64)
    return keys ^ (np.arange(bands, dtype=np.uint64) << np.uint64(56))


def candidate_pairs_from_keys(keys: np.ndarray) -> set[tuple[int, int]]:
    """Index pairs sharing at least one band key; each pair linked to its group's first member."""
    pairs: set[tuple[int, int]] = set()
    n, bands = keys.shape
    for b in range(bands):
        col = keys[:, b]
        order = np.argsort(col, kind="stable")
        sorted_keys = col[order]
        boundaries = np.flatnonzero(np.diff(sorted_keys)) + 1
        for group in np.split(order, boundaries):
            if len(group) > 1:
                first = int(group.min())
                pairs.update((first, int(j)) for j in group if j != first)
    return pairs


class UnionFind:
    def __init__(self) -> None:
        self.parent: dict = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller (earlier in pipeline order) root wins: it is the kept document
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self.parent[hi] = lo


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Estimated Jaccard similarity: the share of equal MinHash values."""
    return float(np.mean(a == b))


def resolve(pairs: Iterable[tuple], sigs: dict, threshold: float, kind: str = "near") -> list[dict]:
    """Union-find over verified pairs of order keys; returns removed records."""
    uf, sims = UnionFind(), {}
    for a, b in pairs:
        s = 1.0 if kind == "exact" else similarity(sigs[a], sigs[b])
        if s >= threshold:
            uf.union(a, b)
            sims[max(a, b)] = max(s, sims.get(max(a, b), 0.0))
    removed = []
    for x in list(uf.parent):
        root = uf.find(x)
        if root != x:
            removed.append({"removed": x, "kept": root, "kind": kind, "similarity": sims.get(x, 1.0)})
    return sorted(removed, key=lambda r: r["removed"])


def find_duplicates(texts: Sequence[str], cfg: DedupConfig) -> list[dict]:
    """In-process dedup of documents in pipeline order (index = order): exact, then near.

    Returns records {removed, kept, kind, similarity} with indices into `texts`.
    """
    removed: list[dict] = []
    alive = list(range(len(texts)))
    if cfg.exact:
        keys = np.array([exact_key(t) for t in texts], dtype=np.uint64).reshape(-1, 1)
        removed += resolve(candidate_pairs_from_keys(keys), {}, 1.0, "exact")
        gone = {r["removed"] for r in removed}
        alive = [i for i in alive if i not in gone]
    if cfg.minhash and alive:
        sigs = minhash_signatures([texts[i] for i in alive], cfg)
        pairs = candidate_pairs_from_keys(band_keys(sigs, cfg.bands))
        local = resolve(pairs, dict(enumerate(sigs)), cfg.threshold, "near")
        removed += [{**r, "removed": alive[r["removed"]], "kept": alive[r["kept"]]} for r in local]
    return removed


# ----------------------------------------------------------------------------- line-level (CCNet)
def line_hashes(text: str) -> list[int]:
    """Hashes of a document's distinct normalised non-empty lines."""
    return sorted({zlib.crc32(n.encode()) | (len(n) << 32) for line in text.split("\n") if (n := normalize(line))})


def drop_lines(text: str, common: set[int]) -> tuple[str, int]:
    """Remove lines whose hash is in `common`; returns (text, lines removed)."""
    kept, dropped = [], 0
    for line in text.split("\n"):
        n = normalize(line)
        if n and (zlib.crc32(n.encode()) | (len(n) << 32)) in common:
            dropped += 1
        else:
            kept.append(line)
    return "\n".join(kept), dropped


# ----------------------------------------------------------------------------- Ray Data
def signature_batch(batch: dict, cfg: DedupConfig) -> dict:
    """Ray Data map_batches: exact key, MinHash signature and LSH band keys per document.
    Keys are folded to int64 so Arrow hashes and sorts them natively."""
    perms = _permutations(cfg.num_perm)
    texts = [str(t) for t in batch["text"]]
    sigs = np.stack([signature(shingle_hashes(t, cfg.ngram), perms) for t in texts])
    mask = np.uint64((1 << 63) - 1)
    exact = np.array([exact_key(t) for t in texts], dtype=np.uint64) & mask
    return {"order": batch["order"], "exact": exact.astype(np.int64), "sig": list(sigs),
            "bands": list((band_keys(sigs, cfg.bands) & mask).astype(np.int64))}


@lru_cache(maxsize=4)
def _permutations(num_perm: int) -> Permutations:
    return Permutations.make(num_perm)


def _explode(row: dict, minhash: bool) -> list[dict]:
    out = [{"band": -1, "key": int(row["exact"]), "order": row["order"]}]
    if minhash:
        out += [{"band": b, "key": int(k), "order": row["order"]} for b, k in enumerate(row["bands"])]
    return out


def _group_pairs(group: dict) -> dict:
    """map_groups over (band, key): link every member to the group's first (in pipeline order)."""
    orders = sorted(str(o) for o in group["order"])
    first = orders[0]
    rest = orders[1:]
    return {"band": [int(group["band"][0])] * len(rest), "a": [first] * len(rest), "b": rest}


def dedup_dataset(ds, cfg: DedupConfig):
    """Distributed dedup of a Ray Dataset with columns id, order, text, ...

    Returns (dataset without duplicates, removed records {removed_id, kept_id, kind, similarity}).
    `order` is the pipeline order key: in each cluster the smallest is kept.
    """
    if not (cfg.exact or cfg.minhash):
        return ds, []
    sigs = ds.map_batches(signature_batch, fn_kwargs={"cfg": cfg}, batch_format="numpy").materialize()
    groups = (sigs.flat_map(_explode, fn_kwargs={"minhash": cfg.minhash})
              .filter(lambda r: cfg.exact or r["band"] >= 0)
              .groupby(["band", "key"]).map_groups(_group_pairs, batch_format="numpy"))
    pairs = groups.take_all()
    exact_pairs = {(p["a"], p["b"]) for p in pairs if p["band"] < 0}
    removed = resolve(exact_pairs, {}, 1.0, "exact") if cfg.exact else []
    gone = {r["removed"] for r in removed}
    near_pairs = {(p["a"], p["b"]) for p in pairs if p["band"] >= 0 and p["a"] not in gone and p["b"] not in gone}
    if near_pairs:
        involved = {x for pair in near_pairs for x in pair}
        table = {r["order"]: np.asarray(r["sig"]) for r in
                 sigs.filter(lambda r: r["order"] in involved).select_columns(["order", "sig"]).take_all()}
        removed += resolve(near_pairs, table, cfg.threshold, "near")
    drop = {r["removed"] for r in removed}
    ids = {r["order"]: r["id"] for r in ds.filter(lambda r: r["order"] in drop or r["order"] in
                                                  {x["kept"] for x in removed}).select_columns(["order", "id"]).take_all()}
    records = [{"removed_id": ids[r["removed"]], "kept_id": ids[r["kept"]], "kind": r["kind"],
                "similarity": float(r["similarity"])} for r in removed]
    return ds.filter(lambda r: r["order"] not in drop), records
