"""The planted corpus (steps/data/synthetic.py, composition documented there) through the data
stage's rules with the 7b preset's quality and dedup settings: what the issue's "done when" asks.

Ground truth for near duplicates: exact 5-gram Jaccard over every pair of a family, on the
text dedup sees (after the C4 line filter); true clusters are its connected components."""

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from steps.data import dedup as dd
from steps.data.clean import clean_doc
from steps.data.config import DataConfig, DedupConfig, QualityConfig
from steps.data.synthetic import planted_corpus

PRESET = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "7b.yaml").read_text())["data"]
QUALITY = QualityConfig(**PRESET.get("quality", {}))
DEDUP = DedupConfig(**PRESET["dedup"])


def truth(docs, texts):
    """doc index -> true cluster root (smallest index) for every doc with an identical or a
    J >= threshold partner."""
    fams: dict[str, list[int]] = {}
    for i, d in enumerate(docs):
        if d.family:
            fams.setdefault(d.family, []).append(i)
    sh = {i: dd.shingle_hashes(texts[i], DEDUP.ngram) for m in fams.values() for i in m}
    edges, first = [], {}
    for i, t in enumerate(texts):  # identical after normalisation, planted or not (boilerplate pages)
        k = dd.exact_key(t)
        if k >= 0:
            edges.append((first.setdefault(k, i), i))
    for members in fams.values():
        for x in members:
            for y in members:
                if x < y and (dd.exact_key(texts[x]) == dd.exact_key(texts[y]) or
                              dd.jaccard(sh[x], sh[y]) >= DEDUP.threshold):
                    edges.append((x, y))
    return dd.components(edges)


@pytest.fixture(scope="module")
def outcome():
    corpus = planted_corpus(seed=0, threshold=DEDUP.threshold)
    cleaned = [clean_doc(d.text, "jsonl", QUALITY) for d in corpus.docs]
    kept = [i for i, (_, reason, _) in enumerate(cleaned) if not reason]
    texts = {i: cleaned[i][0] for i in kept}
    removed = dd.find_duplicates([texts[i] for i in kept], DEDUP)
    removed = [{**r, "removed": kept[r["removed"]], "kept": kept[r["kept"]]} for r in removed]
    docs = [corpus.docs[i] for i in kept]
    roots = truth(docs, [texts[i] for i in kept])
    roots = {kept[i]: kept[r] for i, r in roots.items()}
    return corpus, cleaned, removed, roots


def test_exact_duplicate_recall_is_one(outcome):
    corpus, cleaned, removed, roots = outcome
    index = {d.id: i for i, d in enumerate(corpus.docs)}
    planted = [(i, index[d.family]) for i, d in enumerate(corpus.docs) if d.kind == "exact"]
    gone = {r["removed"]: r for r in removed}
    assert len(planted) == 40
    for copy, original in planted:  # the later of the two in pipeline order goes, as an exact duplicate
        later = max(copy, original)
        assert gone[later]["kind"] == "exact" and gone[later]["kept"] == min(copy, original)


def test_near_duplicate_recall_and_false_merges(outcome):
    corpus, cleaned, removed, roots = outcome
    should_go = {i for i, r in roots.items() if i != r}  # every non-first member of a true cluster
    gone = {r["removed"] for r in removed}
    near = [i for i in should_go if corpus.docs[i].kind in ("near", "cluster")]
    assert len(near) >= 50
    assert len(gone & set(near)) / len(near) >= 0.95
    false = [r for r in removed if roots.get(r["removed"]) is None or roots.get(r["removed"]) != roots.get(r["kept"])]
    assert len(false) / len(removed) <= 0.01


def test_each_cluster_keeps_exactly_one(outcome):
    corpus, cleaned, removed, roots = outcome
    gone = {r["removed"] for r in removed}
    clusters: dict[int, list[int]] = {}
    for i, r in roots.items():
        clusters.setdefault(r, []).append(i)
    assert len(clusters) >= 100
    for members in clusters.values():
        assert sum(i not in gone for i in members) == 1
    chained = [c for c in clusters.values() if corpus.docs[c[0]].family.startswith("cluster")]
    assert sorted(len(c) for c in chained)[-1] >= 5  # the 2..10-copy chains stayed connected


def test_planted_low_quality_goes_and_good_pages_stay(outcome):
    corpus, cleaned, removed, roots = outcome
    low = [(d.kind[4:], cleaned[i][1]) for i, d in enumerate(corpus.docs) if d.kind.startswith("low:")]
    assert sum(bool(reason) for _, reason in low) / len(low) >= 0.95
    by_rule = Counter(rule for rule, reason in low if reason == rule)
    assert len(by_rule) >= 11  # most planted pages fall to the rule they were written for
    good = [i for i, d in enumerate(corpus.docs) if d.kind in ("good", "near", "cluster", "exact", "boiler")]
    assert sum(bool(cleaned[i][1]) for i in good) / len(good) <= 0.02


@pytest.mark.slow
def test_stage_on_the_planted_corpus_is_independent_of_workers_and_blocks(ray_local, tmp_path):
    """The whole stage (readers -> rules -> line dedup -> dedup -> mixture -> Parquet), twice:
    one worker at a time and 1 partition with big blocks, two workers and 3 partitions with small
    blocks; documents out, drops and duplicates must be identical."""
    from steps.data import process

    corpus = planted_corpus(seed=0)
    raw = tmp_path / "web.jsonl"
    raw.write_text("".join(json.dumps({"text": d.text, "planted": d.kind}) + "\n" for d in corpus.docs))
    results = []
    for name, extra in (("one", {"cpus_per_task": 2.0, "num_partitions": 1, "block_bytes": 1 << 22}),
                        ("two", {"cpus_per_task": 1.0, "num_partitions": 3, "block_bytes": 20_000})):
        cfg = DataConfig(sources=[{"name": "web", "kind": "jsonl", "paths": [str(raw)], "epochs": 1.0}],
                         quality=QUALITY, dedup=DEDUP, **extra)
        out = tmp_path / name
        metrics, _, _ = process(cfg, out, seed=0)
        docs = pq.read_table(out / "docs").to_pylist()
        dups = pq.read_table(out / "duplicates").to_pylist()
        dropped = pq.read_table(out / "dropped").to_pylist()
        results.append((metrics, sorted((d["id"], d["text"]) for d in docs),
                        sorted((d["removed_id"], d["kept_id"], d["kind"]) for d in dups),
                        sorted((d["id"], d["reason"], d["value"]) for d in dropped)))
    (m1, docs1, dups1, drop1), (m2, docs2, dups2, drop2) = results
    assert docs1 == docs2 and dups1 == dups2 and drop1 == drop2
    assert m1["docs_out"] == m2["docs_out"] and m1["blocks"] < m2["blocks"]
    # boilerplate-only pages are emptied by line dedup and dropped with their own reason, not merged
    planted = {f"web/web.jsonl#{i + 1}": d.kind for i, d in enumerate(corpus.docs)}
    emptied = Counter(planted[d[0]] for d in drop1 if d[1] == "line_dedup_too_short")
    assert emptied["boiler_only"] >= 9 and set(emptied) <= {"boiler_only", "good", "cluster", "near", "exact"}
    assert not any(planted[r] == "boiler_only" for r, _, _ in dups1)
    # a page emptied because its lines repeat in other pages loses nothing: every family of
    # copies (each good page with its planted copies, each chain) still has a document out
    family = {f"web/web.jsonl#{i + 1}": d.family for i, d in enumerate(corpus.docs) if d.family}
    out_families = {family.get(i) for i, _ in docs1}
    assert set(family.values()) <= out_families
    assert Counter(planted[i] for i, _ in docs1)["boiler"] >= 19  # their own text kept
    assert sum(t.count("newsletter") for _, t in docs1) <= 1  # the boilerplate survives once at most
    # copies that line dedup emptied first are dropped as such, the rest as duplicates
    copies_gone = m1["duplicates_removed"] + sum(emptied[k] for k in ("good", "cluster", "near", "exact"))
    assert copies_gone >= 75 and m1["exact_duplicates"] >= 30 and m1["candidate_pairs_per_doc"] > 0
