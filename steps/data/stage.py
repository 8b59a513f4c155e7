"""The data stage's per-block tasks: read, clean, line dedup, remove duplicates, mix and write.

A block is a pyarrow Table of documents (id, source, text, metadata, order) of about
`block_bytes` of text; each function here runs as one Ray task per block and returns the
block plus a small stats dict (counts only), so the driver holds ObjectRefs and counters.
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from steps.data import dedup as dd
from steps.data.clean import clean_batch
from steps.data.config import QualityConfig, SourceConfig
from steps.data.mixture import copies
from steps.data.readers import READERS, ReadReport
from steps.data.schema import DOCUMENT_SCHEMA, DROPPED_SCHEMA, DUPLICATE_SCHEMA

DOC_COLUMNS = ("id", "source", "text", "metadata", "order")
BLOCK_SCHEMA = pa.schema([(c, pa.string()) for c in DOC_COLUMNS])


def _block(rows: list[dict]) -> pa.Table:
    return pa.table({c: pa.array([r[c] for r in rows], pa.string()) for c in DOC_COLUMNS}, schema=BLOCK_SCHEMA)


def read_blocks(source_index: int, path: str, sources: list[dict], on_error: str, block_bytes: int):
    """Streaming generator task: one input file -> blocks of documents, then one notes dict
    (errors, skip counts). Nothing holds more than a block of the file."""
    src = SourceConfig.model_validate(sources[source_index])
    report = ReadReport()
    rows, size, n = [], 0, 0
    for d in READERS[src.kind](src, [Path(path)], report, on_error):
        if src.max_docs and n >= src.max_docs:
            break
        n += 1
        rows.append({**d, "order": f"{source_index:03d}/{d['id']}"})
        size += len(d["text"])
        if size >= block_bytes:
            yield _block(rows)
            rows, size = [], 0
    if rows:
        yield _block(rows)
    yield {"errors": report.errors, "skipped": dict(report.skipped), "source": src.name}


def audit(table: pa.Table, out_dir: str, name: str, fraction: float) -> None:
    """Dropped documents with reason and measured value; a deterministic share when fraction < 1."""
    if not table.num_rows:
        return
    if fraction < 1.0:
        keep = [zlib.crc32(i.encode()) / 2**32 < fraction for i in table.column("id").to_pylist()]
        table = table.filter(pa.array(keep, pa.bool_()))
    if table.num_rows:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        pq.write_table(table.select([f.name for f in DROPPED_SCHEMA]).cast(DROPPED_SCHEMA),
                       Path(out_dir) / f"{name}.parquet")


def clean_block(block: pa.Table, name: str, kinds: dict, quality: dict, qcfg: QualityConfig, pii: bool,
                audit_dir: str, audit_fraction: float):
    """Quality rules, language, PII. Returns (kept documents, stats)."""
    cols = {c: block.column(c).to_pylist() for c in ("id", "source", "text")}
    out = clean_batch(cols, kinds, quality, qcfg, pii)
    reasons = out["reason"]
    stats = {"reasons": Counter(r or "kept" for r in reasons), "docs_in": Counter(cols["source"]),
             "pii": {k: int(sum(out[f"pii_{k}"])) for k in ("email", "phone", "ip", "card")},
             "bytes": sum(map(len, out["text"]))}
    kept = pa.array([not r for r in reasons], pa.bool_())
    cleaned = block.set_column(block.schema.get_field_index("text"), "text", pa.array(out["text"], pa.string()))
    dropped = cleaned.filter(pc.invert(kept)).append_column(
        "reason", pa.array([r for r in reasons if r], pa.string())).append_column(
        "value", pa.array([v for r, v in zip(reasons, out["value"]) if r], pa.float64()))
    audit(dropped, audit_dir, name, audit_fraction)
    return cleaned.filter(kept), stats


def line_rows(block: pa.Table, web: list[str]) -> pa.Table:
    """(line hash, document) for every distinct normalised line of web documents."""
    hs, orders = [], []
    for text, source, order in zip(*(block.column(c).to_pylist() for c in ("text", "source", "order"))):
        if source in web:
            h = dd.line_hashes(text)
            hs += h
            orders += [order] * len(h)
    return pa.table({"h": pa.array(hs, pa.int64()), "order": pa.array(orders, pa.string())})


def common_lines(rows: pa.Table, min_count: int) -> pa.Table:
    """Line hashes found in at least `min_count` documents (each document lists a line once),
    sorted, each with its first document in pipeline order: that one keeps the line."""
    if not rows.num_rows:
        return pa.table({"h": pa.array([], pa.int64()), "owner": pa.array([], pa.string())})
    rows = rows.sort_by([("h", "ascending"), ("order", "ascending")])
    h = rows.column("h").to_numpy()
    starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
    counts = np.diff(np.r_[starts, len(h)])
    first = starts[counts >= min_count]
    return pa.table({"h": pa.array(h[first], pa.int64()), "owner": rows.column("order").take(pa.array(first))})


def strip_block(block: pa.Table, name: str, web: list[str], quality: dict, qcfg: QualityConfig,
                audit_dir: str, audit_fraction: float, *common: pa.Table):
    """Remove common lines (common[i] holds the hashes with h % P == i, sorted) except in the
    line's first document, so repeated content survives once (a cluster of near copies keeps
    its shared paragraphs in one copy) while boilerplate leaves every later page. A document
    left below the minimum length goes with reason line_dedup_too_short: an emptied page must
    not survive to be 'duplicated' by other emptied pages."""
    parts = [(c.column("h").to_numpy(), c.column("owner").to_pylist()) for c in common]
    texts, reasons, values, dropped_lines = [], [], [], 0
    cols = (block.column(c).to_pylist() for c in ("text", "source", "order"))
    for text, source, order in zip(*cols):
        reason, value = "", 0.0
        if source in web and parts:
            kept, n = [], 0
            for line in text.split("\n"):
                norm = dd.normalize(line)
                if norm:
                    h = dd.line_hash(norm)
                    hashes, owners = parts[h % len(parts)]
                    i = np.searchsorted(hashes, h)
                    if i < len(hashes) and hashes[i] == h and owners[i] != order:
                        n += 1
                        continue
                kept.append(line)
            if n:
                text = "\n".join(kept)
                dropped_lines += n
                words = len(text.split())
                if words < (qcfg.min_words if quality[source] else 1):
                    reason, value = "line_dedup_too_short", float(words)
        texts.append(text)
        reasons.append(reason)
        values.append(value)
    table = block.set_column(block.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
    keep = pa.array([not r for r in reasons], pa.bool_())
    dropped = table.filter(pc.invert(keep))
    audit(dropped.append_column("reason", pa.array([r for r in reasons if r], pa.string()))
          .append_column("value", pa.array([v for r, v in zip(reasons, values) if r], pa.float64())),
          audit_dir, name, audit_fraction)
    return table.filter(keep), {"lines_dropped": dropped_lines, "line_dedup_too_short": dropped.num_rows}


def remove_block(block: pa.Table, *records: pa.Table):
    """Documents whose order key is not in the removal records; stats per source for the mixture."""
    removed = [r.column("order") for r in records if r.num_rows]
    table = block
    if removed:
        gone = pc.is_in(block.column("order"), value_set=pa.concat_arrays(
            [c.combine_chunks() for c in removed]))
        table = block.filter(pc.invert(gone))
    stats: dict[str, list[int]] = {}
    for source, text in zip(table.column("source").to_pylist(), table.column("text").to_pylist()):
        s = stats.setdefault(source, [0, 0, 0])
        s[0] += 1
        s[1] += len(text.split())
        s[2] += len(text.encode())
    return table, stats


def record_counts(records: pa.Table) -> dict:
    return dict(Counter(records.column("kind").to_pylist())) if records.num_rows else {}


def write_records(records: pa.Table, path: str) -> int:
    if records.num_rows:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(records.select([f.name for f in DUPLICATE_SCHEMA]).cast(DUPLICATE_SCHEMA), path)
    return records.num_rows


def write_docs(path: str, epochs: dict[str, float], seed: int, row_group_rows: int, *blocks: pa.Table) -> int:
    """Blocks (in pipeline order) -> one Parquet file with the document schema, each document
    repeated per its source's epochs (mixture.copies: seeded by id, so order-independent).
    Row groups hold `row_group_rows` documents or 128 MiB of text, whichever comes first."""
    writer, buffered, n = None, [], 0

    def flush():
        nonlocal writer, buffered
        if buffered:
            t = pa.concat_tables(buffered)
            writer = writer or pq.ParquetWriter(path, DOCUMENT_SCHEMA)
            writer.write_table(t, row_group_size=row_group_rows)
            buffered = []

    try:
        for block in blocks:
            ids, sources = block.column("id").to_pylist(), block.column("source").to_pylist()
            reps = [copies(i, epochs[s], seed) for i, s in zip(ids, sources)]
            idx = np.repeat(np.arange(len(ids)), reps)
            copy = np.concatenate([np.arange(r) for r in reps]).astype(np.int32) if len(idx) else \
                np.zeros(0, np.int32)
            t = block.take(pa.array(idx, pa.int64()))
            t = pa.table({"id": t.column("id"), "source": t.column("source"), "text": t.column("text"),
                          "metadata": t.column("metadata"), "copy": pa.array(copy, pa.int32())}).cast(DOCUMENT_SCHEMA)
            buffered.append(t)
            n += t.num_rows
            if sum(b.num_rows for b in buffered) >= row_group_rows or sum(b.nbytes for b in buffered) >= 128 * 2**20:
                flush()
        flush()
    finally:
        if writer is not None:
            writer.close()
    return n


def notes_summary(notes: list[dict]) -> tuple[list[dict], Counter]:
    errors, skipped = [], Counter()
    for note in notes:
        errors += note["errors"]
        skipped.update(note["skipped"])
    return errors, skipped


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
