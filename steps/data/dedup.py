"""Deduplication core: exact (normalised-text hash), CCNet line-level, MinHash + LSH candidates
decided by EXACT Jaccard, connected components. Plain numpy, in-process; dedup_ray.py runs the
same functions on Ray Data (shuffles, joins, distributed components).

What the threshold measures: the Jaccard similarity |A & B| / |A | B| of the sets of word
`ngram`-grams of the two documents' normalised text (NFKC, lower case, punctuation replaced by
spaces, split on whitespace); each n-gram is hashed to 32 bits (a collision changes a
document-sized set by at most a few elements in 10^5). MinHash (num_perm permutations, LSH
with `bands` x `rows`) only proposes candidate pairs; a pair is a duplicate when its exact
Jaccard over those shingle sets is >= threshold. Documents with fewer than `ngram` words have
no shingle and are never near-duplicates (only exact ones), so emptied or one-line pages cannot
be merged as "similar".

Within each cluster (connected component of exact/near-duplicate links, so chains A~B~C with
A !~ C are one cluster) the document first in pipeline order (config source order, then id) is
kept; every removed document names that survivor.
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
INT63 = np.uint64((1 << 63) - 1)
UNVERIFIED = -1.0  # the similarity recorded for a near duplicate when dedup.verify is off
_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """NFKC, lower case, punctuation removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def exact_key(text: str) -> int:
    """63-bit hash of the normalised text; -1 for a document with no words (never merged)."""
    norm = normalize(text)
    if not norm:
        return -1
    return int.from_bytes(hashlib.blake2b(norm.encode(), digest_size=8).digest(), "little") & int(INT63)


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


@lru_cache(maxsize=4)
def permutations(num_perm: int) -> Permutations:
    return Permutations.make(num_perm)


def word_hashes(words: list[str]) -> np.ndarray:
    return np.fromiter((zlib.crc32(x.encode()) for x in words), dtype=np.uint64, count=len(words))


def shingles_of_words(words: list[str], ngram: int) -> np.ndarray:
    """Sorted unique 32-bit hashes of the word n-grams; empty when there are fewer than `ngram` words."""
    if len(words) < ngram:
        return np.zeros(0, dtype=np.uint32)
    w = word_hashes(words)
    n_out = len(w) - ngram + 1
    h = np.zeros(n_out, dtype=np.uint64)
    for k in range(ngram):  # polynomial combination of the n word hashes, wrapping in uint64
        h = h * np.uint64(0x100000001B3) + w[k: n_out + k]
    h ^= h >> np.uint64(29)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(32)
    return np.unique((h & MAX_HASH).astype(np.uint32))


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    return shingles_of_words(normalize(text).split(), ngram)


def signature(shingles: np.ndarray, perms: Permutations, chunk: int = 8192) -> np.ndarray:
    """MinHash signature [num_perm] uint32 of one document's shingle hashes."""
    sig = np.full(len(perms.a), MAX_HASH, dtype=np.uint64)
    hashes = shingles.astype(np.uint64)
    for start in range(0, len(hashes), chunk):  # bounded memory for book-sized documents
        x = hashes[start: start + chunk, None] * perms.a + perms.b  # < 2^64: h, a, b < 2^32
        np.minimum(sig, (_mod_mersenne(x) & MAX_HASH).min(axis=0), out=sig)
    return sig.astype(np.uint32)


def _mod_mersenne(x: np.ndarray) -> np.ndarray:
    """x mod (2^61 - 1) for uint64 x, by shifts and adds (2^61 = 1 mod p): the same values as
    x % MERSENNE at a fraction of the cost of numpy's 64-bit division."""
    r = (x & MERSENNE) + (x >> np.uint64(61))  # < 2^61 + 8
    r -= MERSENNE * (r >= MERSENNE)
    return r


def band_keys(sig: np.ndarray, bands: int) -> np.ndarray:
    """[bands] int64: one 63-bit hash per band of rows (LSH), the band index mixed in."""
    rows = len(sig) // bands
    view = sig.reshape(bands, rows).astype(np.uint64)
    mult = np.uint64(0x9E3779B97F4A7C15) ** np.arange(1, rows + 1, dtype=np.uint64)
    keys = (view * mult).sum(axis=1, dtype=np.uint64) + np.arange(bands, dtype=np.uint64) * np.uint64(0x632BE59BD9B4E019)
    keys ^= keys >> np.uint64(31)
    return (keys & INT63).astype(np.int64)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard of two sorted unique shingle arrays (0 when either is empty)."""
    if not len(a) or not len(b):
        return 0.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def bucket_pairs(members: Sequence, max_all_pairs: int) -> list[tuple]:
    """Candidate pairs of one LSH bucket (members sorted). Small buckets: every pair, so a chain
    whose ends are not similar still links through the middle. Large buckets (boilerplate shared
    by thousands): each member with its neighbour in order and with the first, linear in size.
    max_all_pairs = 1: the first with each other member only (unverified dedup: a star connects
    the bucket, and no pair needs checking)."""
    n = len(members)
    if max_all_pairs == 1:
        return [(members[0], m) for m in members[1:]]
    if n <= max_all_pairs:
        return [(members[i], members[j]) for i in range(n) for j in range(i + 1, n)]
    pairs = {(members[0], m) for m in members[1:]}
    pairs.update((members[i], members[i + 1]) for i in range(n - 1))
    return sorted(pairs)


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


def components(edges: Iterable[tuple]) -> dict:
    """node -> smallest node of its connected component (reference for the distributed version)."""
    uf = UnionFind()
    for a, b in edges:
        uf.union(a, b)
    return {x: uf.find(x) for x in list(uf.parent)}


def find_duplicates(texts: Sequence[str], cfg: DedupConfig, stats: dict | None = None) -> list[dict]:
    """In-process dedup of documents in pipeline order (index = order): exact, then near.

    Returns records {removed, kept, kind, similarity} with indices into `texts`; `similarity`
    is the removed document's highest exact Jaccard to a document of its cluster (1.0 exact;
    UNVERIFIED when dedup.verify is off).
    `stats`, when given, receives candidate_pairs and verified_pairs.
    """
    removed: list[dict] = []
    alive = list(range(len(texts)))
    if cfg.exact:
        keys = [exact_key(t) for t in texts]
        groups: dict[int, list[int]] = {}
        for i, k in enumerate(keys):
            if k >= 0:
                groups.setdefault(k, []).append(i)
        for g in groups.values():
            removed += [{"removed": i, "kept": g[0], "kind": "exact", "similarity": 1.0} for i in g[1:]]
        gone = {r["removed"] for r in removed}
        alive = [i for i in alive if i not in gone]
    if cfg.minhash and alive:
        perms = permutations(cfg.num_perm)
        shingles = {i: shingle_hashes(texts[i], cfg.ngram) for i in alive}
        buckets: dict[int, list[int]] = {}
        for i in alive:
            if len(shingles[i]):
                for k in band_keys(signature(shingles[i], perms), cfg.bands):
                    buckets.setdefault(int(k), []).append(i)
        max_all_pairs = cfg.max_bucket_all_pairs if cfg.verify else 1
        candidates = {p for m in buckets.values() if len(m) > 1 for p in bucket_pairs(m, max_all_pairs)}
        edges, best = [], {}
        for a, b in sorted(candidates):
            j = jaccard(shingles[a], shingles[b]) if cfg.verify else UNVERIFIED
            if not cfg.verify or j >= cfg.threshold:
                edges.append((a, b))
                best[a], best[b] = max(best.get(a, UNVERIFIED), j), max(best.get(b, UNVERIFIED), j)
        if stats is not None:
            stats.update(candidate_pairs=len(candidates), verified_pairs=len(edges))
        removed += [{"removed": x, "kept": root, "kind": "near", "similarity": best[x]}
                    for x, root in components(edges).items() if x != root]
    return sorted(removed, key=lambda r: r["removed"])


# ----------------------------------------------------------------------------- line-level (CCNet)
def line_hash(norm: str) -> int:
    return zlib.crc32(norm.encode()) | (len(norm) << 32)


def line_hashes(text: str) -> list[int]:
    """Hashes of a document's distinct normalised non-empty lines."""
    return sorted({line_hash(n) for line in text.split("\n") if (n := normalize(line))})


def drop_lines(text: str, common: set[int] | frozenset[int]) -> tuple[str, int]:
    """Remove lines whose hash is in `common`; returns (text, lines removed)."""
    kept, dropped = [], 0
    for line in text.split("\n"):
        n = normalize(line)
        if n and line_hash(n) in common:
            dropped += 1
        else:
            kept.append(line)
    return "\n".join(kept), dropped
