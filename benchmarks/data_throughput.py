"""Clean + dedup throughput: this project's data stage vs datatrove, same corpus, same run.

Both sides run on one core in one process over the same documents:
    ours:      C4 line filter + Gopher quality rules (steps/data/clean.py), then exact and
               MinHash dedup (steps/data/dedup.py: signatures, LSH bands, union-find)
    datatrove: C4QualityFilter + GopherQualityFilter, then MinhashDedupSignature ->
               MinhashDedupBuckets -> MinhashDedupCluster -> MinhashDedupFilter (its four stages,
               run in-process with rank 0 / world size 1, on a local temp folder)
MinHash parameters match (5-gram shingles, 14 bands x 8 rows = 112 hashes). Differences that
remain: datatrove tokenises words with spaCy and hashes shingles with xxhash/sha1, we use
whitespace words and crc32 word hashes; datatrove's C4 filter also drops citations and long
words; our run adds an exact-dedup pass datatrove's MinHash stages do not have. Language ID is
off on both sides (datatrove's needs a downloaded fastText model).

Corpus: the demo texts fetched by scripts/fetch_demo_data.py (C4 web pages, Wikipedia, books cut into ~400-word
documents), plus near-duplicate copies (a few words edited) to give dedup work; "4x" adds
three more edited copies of everything.

    pip install -r benchmarks/requirements.txt
    python benchmarks/data_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.fetch_demo_data import ensure  # noqa: E402
from steps.data.clean import clean_text  # noqa: E402
from steps.data.config import DedupConfig, QualityConfig, SourceConfig  # noqa: E402
from steps.data.dedup import find_duplicates  # noqa: E402
from steps.data.readers import read_source  # noqa: E402

QUALITY = QualityConfig(languages=[], c4_min_sentences=5)  # datatrove's C4 default: 5 sentences
DEDUP = DedupConfig(ngram=5, num_perm=112, bands=14, threshold=0.8, line_dedup=False)


def base_corpus(limit: int | None) -> list[str]:
    demo = ensure(verbose=False)
    docs = []
    for kind, pattern, kw in [("jsonl", "web/*.jsonl", {}), ("mediawiki", "wikixml/*.bz2", {}),
                              ("text", "wiki/*.txt", {"line_documents": True}), ("gutenberg", "books/*.txt", {})]:
        src = SourceConfig(name=kind, kind=kind, paths=[str(demo / pattern)], epochs=1.0, **kw)
        for d in read_source(src):
            words = d["text"].split(" ")
            if kind == "gutenberg":  # books -> ~400-word documents, as web-page-sized units
                docs += [" ".join(words[i:i + 400]) for i in range(0, len(words), 400)]
            else:
                docs.append(d["text"])
    random.Random(0).shuffle(docs)
    return docs[:limit] if limit else docs


def edited(text: str, rng: random.Random, n: int = 3) -> str:
    words = text.split(" ")
    for _ in range(n):
        i = rng.randrange(len(words))
        words[i] = rng.choice(words)
    return " ".join(words)


def make_corpus(scale: int, limit: int | None) -> list[str]:
    base = base_corpus(limit)
    rng = random.Random(1)
    docs = base + [edited(t, rng) for t in base[: len(base) // 10]]  # 10% near duplicates
    for _ in range(scale - 1):
        docs += [edited(t, rng) for t in base]
    return docs


def run_ours(docs: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    kept = [t for t in (clean_text(d, "jsonl", QUALITY) for d in docs) if not t[1]]
    removed = find_duplicates([t[0] for t in kept], DEDUP)
    return time.perf_counter() - start, len(kept) - len(removed)


def run_datatrove(docs: list[str]) -> tuple[float, int]:
    from datatrove.data import Document
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter

    cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        c4, gopher = C4QualityFilter(), GopherQualityFilter()
        stream = (Document(text=t, id=str(i)) for i, t in enumerate(docs))
        kept = list(gopher.run(c4.run(stream)))
        MinhashDedupSignature(output_folder=f"{tmp}/sigs", config=cfg).run(iter(kept), rank=0, world_size=1)
        for bucket in range(cfg.num_buckets):
            MinhashDedupBuckets(input_folder=f"{tmp}/sigs", output_folder=f"{tmp}/buckets",
                                config=cfg).run(None, rank=bucket, world_size=cfg.num_buckets)
        MinhashDedupCluster(input_folder=f"{tmp}/buckets", output_folder=f"{tmp}/remove", config=cfg).run(None, 0, 1)
        final = list(MinhashDedupFilter(input_folder=f"{tmp}/remove").run(iter(kept), rank=0, world_size=1))
    return time.perf_counter() - start, len(final)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small corpus (smoke test, < 1 minute)")
    args = p.parse_args()
    os.environ.setdefault("LOGURU_LEVEL", "WARNING")
    from loguru import logger

    logger.remove()
    limit = 400 if args.quick else None
    warm = make_corpus(1, 50)  # one-time costs (spaCy's tokenizer load, imports) stay out of the timings
    run_ours(warm)
    run_datatrove(warm)
    print(f"{'scale':>5} {'docs':>7} {'ours docs/s':>12} {'datatrove docs/s':>17} {'ratio':>6}  kept (ours / datatrove)")
    for scale in (1, 4):
        docs = make_corpus(scale, limit)
        ours_s, ours_kept = run_ours(docs)
        dt_s, dt_kept = run_datatrove(docs)
        print(f"{scale:>4}x {len(docs):>7} {len(docs) / ours_s:>12.0f} {len(docs) / dt_s:>17.0f} "
              f"{dt_s / ours_s:>5.2f}x  {ours_kept} / {dt_kept}", flush=True)
    print("one core each, same process; ratio = datatrove time / our time")


if __name__ == "__main__":
    main()
