"""Dedup: banding guarantees, decisions by exact Jaccard, chains and clusters, no merging of
empty documents, distributed components and the distributed path agreeing with the in-process one."""

import random

import numpy as np
import pytest

from steps.data import dedup as dd
from steps.data.config import DedupConfig, candidate_probability

CFG = DedupConfig(num_perm=80, bands=20, threshold=0.7)
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


def true_j(a: str, b: str, n: int = 5) -> float:
    return dd.jaccard(dd.shingle_hashes(a, n), dd.shingle_hashes(b, n))


def test_banding_must_make_the_threshold_a_candidate_with_p_099():
    assert candidate_probability(0.8, 14, 8) < 0.93  # the old 7b setting
    with pytest.raises(ValueError, match="probability"):
        DedupConfig(num_perm=112, bands=14, threshold=0.8)
    assert candidate_probability(0.8, 20, 5) > 0.999 and DedupConfig(num_perm=100, bands=20).rows == 5
    assert candidate_probability(0.7, 20, 4) > 0.99


def test_exact_jaccard_decides_not_the_estimate():
    """Pairs just above and just below the threshold: only the first is merged, every time."""
    cfg = DedupConfig(num_perm=100, bands=20, threshold=0.8)
    above = below = 0
    for seed in range(40):
        a = article(seed, 400)
        b = edit(a, seed + 1000, random.Random(seed).uniform(0.01, 0.035))
        j = true_j(a, b)
        removed = dd.find_duplicates([a, b], cfg)
        if j >= 0.8:
            above += 1
            assert [(r["removed"], r["kept"]) for r in removed] == [(1, 0)] and removed[0]["similarity"] == j
        else:
            below += 1
            assert removed == []
    assert above >= 5 and below >= 5  # both sides of the threshold were exercised


def test_unverified_dedup_merges_every_collision():
    """dedup.verify=False (datatrove's rule): colliding pairs below the threshold are merged too."""
    cfg = DedupConfig(num_perm=100, bands=20, threshold=0.8)
    unverified = cfg.model_copy(update={"verify": False})
    below_merged = 0
    for seed in range(20):
        a = article(seed, 400)
        b = edit(a, seed + 2000, 0.06)  # J around 0.6: a candidate with p ~ 0.8 at 20 x 5
        assert true_j(a, b) < 0.8 and dd.find_duplicates([a, b], cfg) == []
        removed = dd.find_duplicates([a, b], unverified)
        below_merged += len(removed)
        assert all(r["similarity"] == dd.UNVERIFIED and (r["removed"], r["kept"]) == (1, 0) for r in removed)
    assert below_merged >= 10


def test_chain_is_one_cluster_with_one_survivor():
    a = article(1, 400)
    b = edit(a, 2, 0.03)
    c = edit(b, 3, 0.03)
    assert true_j(a, b) >= 0.7 and true_j(b, c) >= 0.7 and true_j(a, c) < 0.7
    removed = dd.find_duplicates([c, article(9), a, b], CFG)  # c first in order: it is kept
    assert {(r["removed"], r["kept"]) for r in removed} == {(2, 0), (3, 0)}


@pytest.mark.parametrize("size", range(2, 11))
def test_clusters_of_2_to_10_chained_copies_keep_one(size):
    docs = [article(100 + size, 400)]
    for k in range(size - 1):
        docs.append(edit(docs[-1], 1000 * size + k, 0.02))
    others = [article(500 + i) for i in range(5)]
    removed = dd.find_duplicates(others + docs, CFG)
    truth = dd.components((i, j) for i in range(size) for j in range(i + 1, size) if true_j(docs[i], docs[j]) >= 0.7)
    expected_clusters = len(set(truth.values())) + (size - len(truth))
    assert len(removed) == size - expected_clusters and all(r["removed"] >= 5 for r in removed)


def test_empty_and_too_short_documents_are_never_near_duplicates():
    docs = ["", "   ", "...", "one two", "one two three", article(1)]
    assert dd.find_duplicates(docs, DedupConfig(num_perm=80, bands=20, threshold=0.7, exact=False)) == []
    assert [dd.exact_key(d) for d in docs[:3]] == [-1, -1, -1]
    exact = dd.find_duplicates(docs, CFG)
    assert [(r["removed"], r["kept"]) for r in exact] == []  # "one two" != "one two three"


def test_large_buckets_pair_linearly_and_stay_connected():
    members = list(range(1000))
    pairs = dd.bucket_pairs(members, 32)
    assert len(pairs) < 2000 and set(dd.components(pairs).values()) == {0}
    assert len(dd.bucket_pairs(list(range(10)), 32)) == 45


def test_signatures_are_deterministic():
    perms = dd.permutations(80)
    s = [dd.signature(dd.shingle_hashes(article(i), 5), perms) for i in range(3)]
    assert all(np.array_equal(x, dd.signature(dd.shingle_hashes(article(i), 5), perms)) for i, x in enumerate(s))


def test_line_level_dedup_removes_only_common_lines():
    boiler = "Subscribe to our newsletter for more updates"
    docs = [f"Unique opening line number {i}\n{boiler}\nAnother unique line {i}" for i in range(5)]
    counts = {}
    for d in docs:
        for h in dd.line_hashes(d):
            counts[h] = counts.get(h, 0) + 1
    common = {h for h, c in counts.items() if c >= 3}
    text, n = dd.drop_lines(docs[0], common)
    assert n == 1 and boiler not in text and "Unique opening line number 0" in text


@pytest.mark.slow
def test_distributed_components_match_union_find(ray_local):
    import pyarrow as pa

    from steps.data.components import connected_components

    rng = random.Random(0)
    nodes = [f"n{i:04d}" for i in range(300)]
    edges = [(rng.choice(nodes), rng.choice(nodes)) for _ in range(220)]
    edges += [(nodes[i], nodes[i + 1]) for i in range(200, 240)]  # a long chain
    expected = {n: r for n, r in dd.components(edges).items() if n != r}
    for parts in (1, 3):
        blocks = [ray_local.put(pa.table({"u": [a for a, _ in edges[i:i + 50]], "v": [b for _, b in edges[i:i + 50]]}))
                  for i in range(0, len(edges), 50)]
        out = pa.concat_tables(ray_local.get([r for part in connected_components(blocks, parts) for r in part]))
        assert dict(zip(out.column("node").to_pylist(), out.column("root").to_pylist())) == expected


def test_near_records_pair_each_node_with_its_own_best_similarity():
    """Arrow's group_by may order its groups differently from call to call on a many-chunk
    table (as the shuffle hands over): each removed document must get its own best Jaccard
    (this failed once in CI when nodes and maxima came from two aggregations)."""
    import pyarrow as pa

    from steps.data.dedup_ray import _near_records

    rng = np.random.default_rng(0)
    chunks, best = [], {}
    for k in range(30):
        nodes = [f"0/d{(i * 7 + k) % 50:03d}" for i in range(40)]
        js = rng.random(40)
        for n, j in zip(nodes, js):
            best[n] = max(best.get(n, 0.0), float(j))
        chunks.append(pa.table({"node": pa.array(nodes), "j": pa.array(js)}))
    table = pa.concat_tables(chunks)
    roots = pa.table({"node": pa.array(sorted(best)), "root": pa.array(["0/root"] * len(best))})
    for _ in range(50):
        rec = _near_records(table, roots).to_pylist()
        assert {r["order"]: r["similarity"] for r in rec} == best


@pytest.mark.slow
def test_distributed_dedup_matches_in_process(ray_local):
    import pyarrow as pa

    from steps.data.dedup_ray import dedup_blocks

    base = [article(i) for i in range(40)]
    docs = list(base) + [base[3].upper() + " !!!", edit(base[7], 1, 0.02), edit(base[7], 2, 0.03),
                         edit(base[11], 3, 0.5), base[3], "", ""]
    a = article(999, 400)
    docs += [a, edit(a, 4, 0.03), edit(edit(a, 4, 0.03), 5, 0.03)]  # a chain
    rows = [{"id": f"s/{i:04d}", "order": f"000/s/{i:04d}", "text": t} for i, t in enumerate(docs)]
    unverified = CFG.model_copy(update={"verify": False})
    for parts, block, cfg in ((1, 100, CFG), (2, 7, CFG), (3, 5, CFG), (2, 9, CFG.model_copy(update={"exact": False})),
                              (2, 7, unverified)):
        expected = {(f"s/{r['removed']:04d}", f"s/{r['kept']:04d}", r["kind"], round(r["similarity"], 9))
                    for r in dd.find_duplicates(docs, cfg)}
        blocks = [ray_local.put(pa.Table.from_pylist(rows[i:i + block])) for i in range(0, len(rows), block)]
        refs, stats = dedup_blocks(blocks, cfg, parts)
        got = pa.concat_tables(ray_local.get(refs)).to_pylist()
        assert {(r["removed_id"], r["kept_id"], r["kind"], round(r["similarity"], 9)) for r in got} == expected
        assert stats["verified_pairs"] >= 4


def test_mersenne_reduction_equals_the_modulo():
    rng = np.random.default_rng(0)
    p = dd.MERSENNE
    x = np.concatenate([rng.integers(0, 2**64 - 1, size=100_000, dtype=np.uint64),
                        np.array([0, 1, p - 1, p, p + 1, 2 * p, 2**61, 2**61 + 6, 2**63, 2**64 - 1], dtype=np.uint64)])
    assert np.array_equal(dd._mod_mersenne(x), x % p)
