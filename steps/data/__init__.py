"""Data step (RECIPE.md section 1): raw corpora -> cleaned, deduplicated, mixed Parquet.

    read     one Ray Data task per file: readers.py turns each raw format into documents
    clean    clean.py: per-source quality rules, language ID, PII scrub (reason per drop)
    lines    CCNet line dedup: web lines repeated across many documents are boilerplate
    dedup    dedup.py: exact and MinHash near duplicates within and across sources
    mix      mixture.py: per-source epochs (up-sample factual sources), deterministic
    write    docs/part-*.parquet with the document schema, reports beside them

Nothing vanishes silently: corrupt input is listed in `errors.jsonl` (or stops the step with
file and line when data.on_error=fail), every dropped document has a reason in
`drop_reasons.json`, every removed duplicate names the document it duplicated in
`duplicates.parquet`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from steps.data import dedup as dd
from steps.data.clean import clean_batch
from steps.data.config import DataConfig
from steps.data.mixture import apply_batch, plan_mixture, plan_table
from steps.data.readers import READERS, ReadReport, expand_paths
from steps.data.schema import DOCUMENT_SCHEMA, DUPLICATE_SCHEMA

VERSION = "1"
REPO_ROOT = Path(__file__).resolve().parents[2]
WEB_KINDS = ("jsonl", "parquet")


def source_files(cfg: DataConfig) -> list[tuple[int, Path]]:
    """(source index, file) for every input file; relative paths resolve against the repo root
    when they do not exist relative to the working directory."""
    out = []
    for i, src in enumerate(cfg.sources):
        files = expand_paths(src.paths, None) or expand_paths(src.paths, REPO_ROOT)
        if not files:
            raise FileNotFoundError(
                f"data.sources[{i}] ({src.name}): no file matches {src.paths}. For the tiny preset run "
                f"`python scripts/fetch_demo_data.py` (part of scripts/setup.sh).")
        out.extend((i, f) for f in files)
    return out


def fingerprint_inputs(cfg, **_params) -> str:
    """Raw inputs by path, size and modification time (content hashing TBs is not an option)."""
    h = hashlib.sha256()
    for i, f in source_files(cfg.data):
        for p in [f] if f.is_file() else sorted(x for x in f.rglob("*") if x.is_file()):
            st = p.stat()
            h.update(f"{i}|{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def read_file(item: dict, sources: list[dict], on_error: str) -> list[dict]:
    """Ray Data flat_map: one input file -> its documents, plus one row per recorded error."""
    from steps.data.config import SourceConfig

    src = SourceConfig.model_validate(sources[item["source_index"]])
    report = ReadReport()
    path = Path(item["path"])
    rows = [{**d, "order": f"{item['source_index']:03d}/{d['id']}", "error": ""}
            for d in READERS[src.kind](src, [path], report, on_error)]
    if src.max_docs:
        rows = rows[: src.max_docs]
    rows += [{"id": "", "source": src.name, "text": "", "metadata": json.dumps(dict(report.skipped)),
              "order": "", "error": json.dumps(e)} for e in report.errors]
    if report.skipped and not report.errors:  # carry skip counts (licences, redirects) to the report
        rows.append({"id": "", "source": src.name, "text": "", "metadata": json.dumps(dict(report.skipped)),
                     "order": "", "error": "skipped"})
    return rows


def strip_common_lines(batch: dict, common: set[int], web_sources: set[str]) -> dict:
    texts, dropped = [], 0
    for text, source in zip(batch["text"], batch["source"]):
        if source in web_sources:
            text, n = dd.drop_lines(str(text), common)
            dropped += n
        texts.append(text)
    return {**batch, "text": texts, "lines_dropped": [dropped] + [0] * (len(texts) - 1)}


def run(ctx) -> dict[str, float]:
    import ray.data

    cfg: DataConfig = ctx.cfg.data
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.execution_options.preserve_order = True
    # Hash shuffles (dedup groupby) default to 200 partitions: far too many for small clusters.
    data_ctx.default_hash_shuffle_parallelism = max(2, int(ray.cluster_resources().get("CPU", 2)))
    data_ctx.enable_progress_bars = os.environ.get("LLAMA2_PROGRESS", "1") != "0"
    sources = [s.model_dump() for s in cfg.sources]
    kinds = {s.name: s.kind for s in cfg.sources}
    quality = {s.name: s.quality_filter for s in cfg.sources}
    files = source_files(cfg)

    # read: one task per file; errors travel as rows so none is lost
    items = [{"source_index": i, "path": str(f)} for i, f in files]
    raw = (ray.data.from_items(items, override_num_blocks=min(len(items), 64))
           .flat_map(read_file, fn_kwargs={"sources": sources, "on_error": cfg.on_error})
           .materialize())
    notes = raw.filter(lambda r: r["error"] != "").take_all()
    errors = [json.loads(r["error"]) for r in notes if r["error"] != "skipped"]
    skipped = Counter()
    for r in notes:
        skipped.update(json.loads(r["metadata"]))
    docs = raw.filter(lambda r: r["error"] == "").drop_columns(["error"])

    # clean: quality rules, language, PII (every document keeps a reason)
    cleaned = docs.map_batches(clean_batch, batch_format="numpy",
                               fn_kwargs={"kinds": kinds, "quality": quality, "qcfg": cfg.quality,
                                          "pii": cfg.pii}).materialize()
    reasons, pii, docs_in = clean_stats(cleaned)
    kept = cleaned.filter(lambda r: r["reason"] == "").select_columns(["id", "source", "text", "metadata", "order"])

    # CCNet line dedup over web sources
    lines_dropped = 0
    web = {s.name for s in cfg.sources if s.kind in WEB_KINDS}
    if cfg.dedup.line_dedup and web:
        counts = (kept.filter(lambda r: r["source"] in web)
                  .flat_map(lambda r: [{"h": h} for h in dd.line_hashes(r["text"])])
                  .groupby("h").count())
        common = {r["h"] for r in counts.filter(lambda r: r["count()"] >= cfg.dedup.line_min_count).take_all()}
        if common:
            kept = kept.map_batches(strip_common_lines, batch_format="numpy",
                                    fn_kwargs={"common": common, "web_sources": web}).materialize()
            lines_dropped = int(kept.sum("lines_dropped") or 0)
            kept = kept.drop_columns(["lines_dropped"])

    # exact + near dedup, within and across sources
    kept, removed = dd.dedup_dataset(kept, cfg.dedup)
    kept = kept.materialize()

    # mixture
    stats: dict[str, tuple[int, int]] = {}
    for b in kept.map_batches(_word_counts, batch_format="numpy").iter_batches(batch_format="numpy"):
        for source, words in zip(b["source"], b["words"]):
            d, w = stats.get(str(source), (0, 0))
            stats[str(source)] = (d + 1, w + int(words))
    plans = plan_mixture(stats, cfg.sources, cfg.total_tokens)
    epochs = {name: p.epochs for name, p in plans.items()}
    mixed = kept.map_batches(apply_batch, batch_format="numpy", fn_kwargs={"epochs": epochs, "seed": ctx.seed})

    n_out = write_shards(mixed, ctx.out_dir / "docs", cfg.num_shards)
    write_reports(ctx.out_dir, errors, reasons, pii, removed, plans, skipped)
    ctx.log_table(plan_table(plans), "mixture.json")
    ctx.log_dict({"drop_reasons": reasons, "pii": pii, "skipped": dict(skipped)}, "cleaning.json")
    in_total = sum(docs_in.values())
    metrics = {
        "docs_in": in_total, "docs_after_clean": reasons.get("kept", 0),
        "docs_dropped_quality": in_total - reasons.get("kept", 0),
        "duplicates_removed": len(removed),
        "exact_duplicates": sum(r["kind"] == "exact" for r in removed),
        "near_duplicates": sum(r["kind"] == "near" for r in removed),
        "lines_dropped": lines_dropped, "corrupt_records": len(errors), "docs_out": n_out,
        **{f"pii_{k}": v for k, v in pii.items()},
        **{f"epochs.{k}": round(v, 4) for k, v in epochs.items()},
        **{f"share.{k}": round(p.share, 4) for k, p in plans.items()},
        **{f"words_in.{k}": p.tokens_in for k, p in plans.items()},
    }
    return metrics


def clean_stats(cleaned) -> tuple[dict[str, int], dict[str, int], Counter]:
    """Drop reasons, PII counts and documents per source, from the small columns only."""
    reasons: Counter = Counter()
    pii: Counter = Counter()
    per_source: Counter = Counter()
    cols = ["reason", "source", "pii_email", "pii_phone", "pii_ip", "pii_card"]
    for b in cleaned.select_columns(cols).iter_batches(batch_size=8192, batch_format="numpy"):
        reasons.update(str(r) or "kept" for r in b["reason"])
        per_source.update(str(s) for s in b["source"])
        for k in ("email", "phone", "ip", "card"):
            pii[k] += int(b[f"pii_{k}"].sum())
    return dict(reasons), dict(pii), per_source


def _word_counts(batch: dict) -> dict:
    return {"source": batch["source"], "words": [len(str(t).split()) for t in batch["text"]]}


def write_shards(ds, out: Path, num_shards: int) -> int:
    """Documents into `num_shards` Parquet files in a deterministic round-robin by row."""
    out.mkdir(parents=True, exist_ok=True)
    writers = [pq.ParquetWriter(out / f"part-{i:05d}.parquet", DOCUMENT_SCHEMA) for i in range(num_shards)]
    n = 0
    try:
        for batch in ds.iter_batches(batch_size=1024, batch_format="pyarrow"):
            table = pa.table({f.name: batch.column(f.name).cast(f.type) for f in DOCUMENT_SCHEMA},
                             schema=DOCUMENT_SCHEMA)
            for i in range(num_shards):
                part = table.take(list(range(i, len(table), num_shards)))
                if len(part):
                    writers[i].write_table(part)
            n += len(table)
    finally:
        for w in writers:
            w.close()
    return n


def write_reports(out: Path, errors: list[dict], reasons: dict, pii: dict, removed: list[dict],
                  plans: dict, skipped: Counter) -> None:
    with open(out / "errors.jsonl", "w") as f:
        for e in errors:
            f.write(json.dumps(e) + "\n")
    (out / "drop_reasons.json").write_text(json.dumps({"reasons": reasons, "pii": pii, "skipped": dict(skipped)},
                                                      indent=2, sort_keys=True))
    pq.write_table(pa.Table.from_pylist(removed, schema=DUPLICATE_SCHEMA), out / "duplicates.parquet")
    (out / "mixture.json").write_text(json.dumps(plan_table(plans), indent=2))
