"""The data stage end to end vs datatrove end to end: same input files, same rules, same
tokenization, same MinHash parameters, documents out to Parquet on both sides.

    ours       `python pipelines/full.py --config <yaml> --until data`, as a user runs the stage
               (Ray start-up, readers, C4 + Gopher rules, MinHash with exact-Jaccard
               verification and distributed components, Parquet out, reports)
    datatrove  LocalPipelineExecutor, 4 stages: JsonlReader -> C4QualityFilter ->
               GopherRepetitionFilter -> GopherQualityFilter -> JsonlWriter + MinhashDedupSignature;
               MinhashDedupBuckets; MinhashDedupCluster; JsonlReader -> MinhashDedupFilter ->
               ParquetWriter. tasks = workers = cores.

Made equal: both split words on whitespace (datatrove's spaCy word and sentence splitters are
replaced by whitespace words and our sentence-end count), normalise shingle text the same way
(lower case, punctuation removed; no digit or diacritic folding), use 5-gram shingles and 20
bands x 5 rows. Not equal, by design of each tool: ours decides a candidate pair by its exact
Jaccard (>= 0.8), datatrove merges every bucket collision; ours applies C4's lorem-ipsum and
curly-bracket rules to the whole page as the paper says, datatrove only to lines that survived
the line filter. Language ID, PII and exact/line dedup are off on our side (datatrove's chain
has none of them).

Corpus: the demo texts in ~/.cache/llama2-recipe/demo (web pages, Wikipedia, books cut into
~400-word documents) plus copies with a few words edited, to --docs documents, written as
JSONL shards. Prints docs/s per core for each side, documents kept and their overlap, then
`ratio_vs_datatrove: X` (our docs/s per core over datatrove's) as the last line.

    pip install -r requirements-bench.txt
    python benchmarks/data_throughput.py [--docs 24000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEMO = Path(os.environ.get("LLAMA2_DEMO_DIR", "~/.cache/llama2-recipe/demo")).expanduser()
BANDS, ROWS, NGRAM, THRESHOLD = 20, 5, 5, 0.8


def base_docs() -> list[str]:
    from steps.data.config import SourceConfig
    from steps.data.readers import read_source

    docs = []
    for kind, pattern, kw in [("jsonl", "web/*.jsonl", {}), ("mediawiki", "wikixml/*.bz2", {}),
                              ("text", "wiki/*.txt", {"line_documents": True}), ("gutenberg", "books/*.txt", {})]:
        src = SourceConfig(name=kind, kind=kind, paths=[str(DEMO / pattern)], epochs=1.0, **kw)
        for d in read_source(src):
            words = d["text"].split(" ")
            if kind == "gutenberg":  # books -> ~400-word documents, web-page-sized units
                docs += [" ".join(words[i:i + 400]) for i in range(0, len(words), 400)]
            else:
                docs.append(d["text"])
    return docs


def make_corpus(directory: Path, n_docs: int, shards: int) -> int:
    base = base_docs()
    rng = random.Random(0)
    docs = list(base)
    while len(docs) < n_docs:  # edited copies: near duplicates for dedup to find
        words = rng.choice(base).split(" ")
        for _ in range(3):
            words[rng.randrange(len(words))] = rng.choice(words)
        docs.append(" ".join(words))
    docs = docs[:n_docs]
    rng.shuffle(docs)
    directory.mkdir(parents=True)
    files = [open(directory / f"corpus-{s:02d}.jsonl", "w") for s in range(shards)]
    for i, text in enumerate(docs):
        files[i % shards].write(json.dumps({"id": f"doc{i}", "text": text}) + "\n")
    for f in files:
        f.close()
    return len(docs)


def run_ours(corpus: Path, out: Path) -> tuple[float, set[str]]:
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["data"] = {
        "sources": [{"name": "web", "kind": "jsonl", "paths": [str(corpus / "*.jsonl")], "epochs": 1.0}],
        "quality": {"languages": []},  # Gopher's and C4's paper thresholds (the defaults)
        "dedup": {"exact": False, "line_dedup": False, "ngram": NGRAM, "num_perm": BANDS * ROWS, "bands": BANDS,
                  "threshold": THRESHOLD},
        "pii": False,
    }
    path = out.parent / "ours.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "LLAMA2_PROGRESS": "0"}
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "pipelines" / "full.py"), "--config", str(path), "--output-dir",
                    str(out), "--until", "data"], check=True, env=env, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    docs = next(out.glob("data/*/docs"))
    ids = {json.loads(m)["id"] for m in pq.read_table(docs, columns=["metadata"]).column("metadata").to_pylist()}
    return seconds, ids


def run_datatrove(corpus: Path, out: Path, workers: int) -> tuple[float, set[str]]:
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--datatrove-only", str(corpus), str(out), str(workers)], check=True)
    seconds = time.perf_counter() - start
    ids = set(pq.read_table(out / "final", columns=["id"]).column("id").to_pylist())
    return seconds, ids


def datatrove_pipeline(corpus: str, out: str, workers: int) -> None:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter, ParquetWriter
    from datatrove.utils.text import TextNormConfig

    _same_tokenization()
    mh = MinhashConfig(n_grams=NGRAM, num_buckets=BANDS, hashes_per_bucket=ROWS,
                       norm_config=TextNormConfig(norm_unicode_diacritics=False, norm_numbers=False))
    signature = MinhashDedupSignature(output_folder=f"{out}/sigs", config=mh)
    signature.word_tokenizer = _Whitespace()
    # fork: workers inherit _same_tokenization (the default forkserver would start them without it)
    # logs beside the outputs (datatrove writes ./logs/<timestamp> when no folder is given)
    run = dict(tasks=workers, workers=workers, logging_dir=f"{out}/logs", skip_completed=False, start_method="fork")
    LocalPipelineExecutor([JsonlReader(corpus), C4QualityFilter(), GopherRepetitionFilter(), GopherQualityFilter(),
                           JsonlWriter(f"{out}/filtered"), signature], **run).run()
    LocalPipelineExecutor([MinhashDedupBuckets(input_folder=f"{out}/sigs", output_folder=f"{out}/buckets", config=mh)],
                          **{**run, "tasks": BANDS}).run()
    LocalPipelineExecutor([MinhashDedupCluster(input_folder=f"{out}/buckets", output_folder=f"{out}/remove", config=mh)],
                          **{**run, "tasks": 1, "workers": 1}).run()
    LocalPipelineExecutor([JsonlReader(f"{out}/filtered"), MinhashDedupFilter(input_folder=f"{out}/remove"),
                           ParquetWriter(f"{out}/final")], **run).run()


class _Whitespace:
    def word_tokenize(self, text: str) -> list[str]:
        return text.split()


def _same_tokenization() -> None:
    """datatrove's filters split words and sentences with spaCy; use ours on both sides."""
    import datatrove.pipeline.filters.c4_filters as c4
    import datatrove.pipeline.filters.gopher_quality_filter as gq
    import datatrove.pipeline.filters.gopher_repetition_filter as gr

    from steps.data.clean import SENTENCE_END

    gq.split_into_words = gr.split_into_words = lambda text, language=None: text.split()
    c4.split_into_sentences = lambda text, language=None: [""] * max(1, len(SENTENCE_END.findall(text)))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--datatrove-only":
        os.environ.setdefault("LOGURU_LEVEL", "WARNING")
        from loguru import logger

        logger.remove()
        datatrove_pipeline(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=24000)
    p.add_argument("--cores", type=int, default=os.cpu_count())
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = make_corpus(tmp / "corpus", args.docs, shards=args.cores)
        dt_s, dt_ids = run_datatrove(tmp / "corpus", tmp / "datatrove", args.cores)
        ours_s, ours_ids = run_ours(tmp / "corpus", tmp / "ours")
    ours_rate, dt_rate = n / ours_s / args.cores, n / dt_s / args.cores
    both = len(ours_ids & dt_ids)
    print(f"input: {n} documents in {args.cores} JSONL shards; {args.cores} cores each side")
    print(f"ours:      {ours_s:8.1f} s  {ours_rate:8.1f} docs/s per core  kept {len(ours_ids)}")
    print(f"datatrove: {dt_s:8.1f} s  {dt_rate:8.1f} docs/s per core  kept {len(dt_ids)}")
    print(f"kept by both: {both} ({both / max(1, len(ours_ids | dt_ids)):.3f} of either's); "
          f"only ours {len(ours_ids - dt_ids)}, only datatrove {len(dt_ids - ours_ids)}")
    print(f"ratio_vs_datatrove: {ours_rate / dt_rate:.2f}")


if __name__ == "__main__":
    main()
