"""Planted exact and near duplicates are found (within and across sources); distinct
documents are kept; the Ray Data path agrees with the in-process one; line-level dedup."""

import random

import numpy as np
import pytest

from steps.data.config import DedupConfig
from steps.data.dedup import drop_lines, find_duplicates, line_hashes, minhash_signatures, similarity

CFG = DedupConfig(num_perm=128, bands=32, threshold=0.7)
VOCAB = [f"w{i}" for i in range(5000)]


def article(seed: int, n: int = 300) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def edit(text: str, seed: int, fraction: float) -> str:
    rng = random.Random(seed)
    words = text.split()
    for i in rng.sample(range(len(words)), int(len(words) * fraction)):
        words[i] = rng.choice(VOCAB)
    return " ".join(words)


def corpus():
    base = [article(i) for i in range(40)]
    docs = list(base)
    docs.append(base[3].upper().replace(" ", "  ") + " !!!")  # 40: exact dup of 3 (case, spaces, punct)
    docs.append(edit(base[7], 1, 0.02))  # 41: near dup of 7 (2% of words changed)
    docs.append(edit(base[7], 2, 0.03))  # 42: near dup of 7
    docs.append(edit(base[11], 3, 0.5))  # 43: half rewritten: a different document
    return docs


def test_planted_duplicates_are_found_and_distinct_docs_kept():
    removed = find_duplicates(corpus(), CFG)
    got = {(r["removed"], r["kept"], r["kind"]) for r in removed}
    assert got == {(40, 3, "exact"), (41, 7, "near"), (42, 7, "near")}
    assert all(r["similarity"] >= 0.7 for r in removed)


def test_minhash_estimates_jaccard():
    a = article(100, 2000)
    b = edit(a, 5, 0.1)
    sa, sb = minhash_signatures([a, b], DedupConfig(num_perm=256, bands=32, ngram=1))
    words_a, words_b = set(a.split()), set(b.split())
    true = len(words_a & words_b) / len(words_a | words_b)
    assert abs(similarity(sa, sb) - true) < 0.08


def test_signatures_are_deterministic():
    texts = [article(i) for i in range(3)]
    assert np.array_equal(minhash_signatures(texts, CFG), minhash_signatures(texts, CFG))


def test_line_level_dedup_removes_only_common_lines():
    boiler = "Subscribe to our newsletter for more updates"
    docs = [f"Unique opening line number {i}\n{boiler}\nAnother unique line {i}" for i in range(5)]
    counts = {}
    for d in docs:
        for h in line_hashes(d):
            counts[h] = counts.get(h, 0) + 1
    common = {h for h, c in counts.items() if c >= 3}
    text, n = drop_lines(docs[0], common)
    assert n == 1 and boiler not in text and "Unique opening line number 0" in text


@pytest.mark.slow
def test_ray_data_path_matches_in_process(ray_local):
    import ray.data

    from steps.data.dedup import dedup_dataset

    docs = corpus()
    rows = [{"id": f"src/{i}", "order": f"{i:05d}", "text": t} for i, t in enumerate(docs)]
    ds = ray.data.from_items(rows, override_num_blocks=4)
    kept, removed = dedup_dataset(ds, CFG)
    expected = {(f"src/{r['removed']}", f"src/{r['kept']}", r["kind"]) for r in find_duplicates(docs, CFG)}
    assert {(r["removed_id"], r["kept_id"], r["kind"]) for r in removed} == expected
    assert sorted(r["id"] for r in kept.take_all()) == sorted(f"src/{i}" for i in range(len(docs)) if i not in (40, 41, 42))
