"""Data step (RECIPE.md section 1): raw corpora -> cleaned, deduplicated, mixed Parquet.

    read     one streaming Ray task per file yields blocks of ~block_bytes (readers.py)
    clean    per block: per-source quality rules, language ID, PII scrub (clean.py)
    lines    CCNet line dedup: line hashes shuffled by hash, counted; lines in >= line_min_count
             web documents are removed; documents left too short are dropped, not merged
    dedup    exact and MinHash near duplicates within and across sources (dedup_ray.py:
             shuffles, exact-Jaccard verification, distributed connected components)
    mix      mixture.py: per-source epochs (up-sample factual sources), deterministic
    write    docs/part-*.parquet (DOCUMENT_SCHEMA), files of ~shard_bytes, row groups of
             <= row_group_rows, in pipeline order; reports beside them

Everything is plain Ray tasks over blocks in the object store (see shuffle.py for why not
Ray Data's shuffles); the driver holds ObjectRefs and counters, never documents, so its memory
does not grow with the corpus. Results depend only on the documents and the config, not on
block sizes, the number of partitions or workers: in each duplicate cluster the document first
in pipeline order (config source order, then id) is kept.

Nothing vanishes silently: corrupt input is listed in `errors.jsonl` (or stops the step with
file and line when data.on_error=fail); every dropped document is written to
`dropped/*.parquet` with its reason and the rule's measured value (all of them, or a
deterministic `drop_audit_fraction`), with counts in `drop_reasons.json`; every removed
duplicate names the document it duplicated in `duplicates/*.parquet`.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from steps.data import shuffle as sh
from steps.data import stage
from steps.data.config import DataConfig
from steps.data.dedup_ray import dedup_blocks
from steps.data.mixture import plan_mixture, plan_table
from steps.data.readers import expand_paths

VERSION = "3"  # 3: C4/Gopher rule details aligned with datatrove where the papers are silent
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


def step_resources(run_cfg, step: str = "data") -> dict[str, float]:
    """The custom Ray resources of the data step's own StepResources (`run.resources.data`):
    every task the step launches asks for them too, so on a cluster they run on the data
    image's nodes (`data_node`), not on whichever node has a free CPU."""
    res = run_cfg.resources.get(step)
    return dict(res.resources) if res is not None else {}


def run(ctx) -> dict[str, float]:
    cfg: DataConfig = ctx.cfg.data
    metrics, plans, reports = process(cfg, Path(ctx.out_dir), ctx.seed, step_resources(ctx.cfg.run, ctx.step))
    ctx.log_table(plan_table(plans), "mixture.json")
    ctx.log_dict(reports, "cleaning.json")
    return metrics


def process(cfg: DataConfig, out: Path, seed: int, resources: dict[str, float] | None = None,
            ) -> tuple[dict, dict, dict]:
    """The whole stage on the connected Ray cluster; returns (metrics, mixture plans, reports).
    `resources`: custom Ray resources every task of the stage asks for (see step_resources)."""
    import ray

    sh.configure(cfg.cpus_per_task, resources)
    out.mkdir(parents=True, exist_ok=True)
    sources = [s.model_dump() for s in cfg.sources]
    kinds = {s.name: s.kind for s in cfg.sources}
    quality = {s.name: s.quality_filter for s in cfg.sources}
    web = sorted(s.name for s in cfg.sources if s.kind in WEB_KINDS)
    audit = {"audit_dir": str(out / "dropped"), "audit_fraction": cfg.drop_audit_fraction}

    # read + clean, chained per block: a block is cleaned as soon as it is read
    reader = ray.remote(stage.read_blocks).options(**sh.task_options("streaming"))
    cleaner = sh.remote(stage.clean_block, num_returns=2)
    gens = [reader.remote(i, str(f), sources, cfg.on_error, cfg.block_bytes) for i, f in source_files(cfg)]
    blocks, clean_stats, notes = [], [], []
    for gen in gens:
        refs = list(gen)
        notes.append(refs[-1])
        for ref in refs[:-1]:
            b, st = cleaner.remote(ref, f"clean-{len(blocks):06d}", kinds, quality, cfg.quality, cfg.pii, **audit)
            blocks.append(b)
            clean_stats.append(st)
    errors, skipped = stage.notes_summary(ray.get(notes))
    reasons, pii, docs_in, text_bytes = Counter(), Counter(), Counter(), 0
    for st in ray.get(clean_stats):
        reasons.update(st["reasons"])
        pii.update(st["pii"])
        docs_in.update(st["docs_in"])
        text_bytes += st["bytes"]
    parts = cfg.num_partitions or max(int(ray.cluster_resources().get("CPU", 2)),
                                      -(-text_bytes // cfg.partition_bytes))
    blocks = [b for b in blocks]

    # CCNet line dedup over web sources
    line_stats = {"lines_dropped": 0, "line_dedup_too_short": 0}
    if cfg.dedup.line_dedup and web and blocks:
        common = sh.shuffle(blocks, "h", parts, stage.common_lines, pre=stage.line_rows, pre_kwargs={"web": web},
                            min_count=cfg.dedup.line_min_count)
        stripper = sh.remote(stage.strip_block, num_returns=2)
        stripped = [stripper.remote(b, f"lines-{i:06d}", web, quality, cfg.quality, audit["audit_dir"],
                                    audit["audit_fraction"], *common) for i, b in enumerate(blocks)]
        blocks = [b for b, _ in stripped]
        for st in ray.get([s for _, s in stripped]):
            for k in line_stats:
                line_stats[k] += st[k]
        reasons["line_dedup_too_short"] += line_stats["line_dedup_too_short"]

    # exact + near dedup, within and across sources
    records, dstats = dedup_blocks(blocks, cfg.dedup, parts)
    remover = sh.remote(stage.remove_block, num_returns=2)
    removed = [remover.remote(b, *records) for b in blocks]
    blocks = [b for b, _ in removed]
    per_source: dict[str, list[int]] = {}
    block_bytes = []
    for st in ray.get([s for _, s in removed]):
        block_bytes.append(sum(v[2] for v in st.values()))
        for src, v in st.items():
            acc = per_source.setdefault(src, [0, 0, 0])
            for k in range(3):
                acc[k] += v[k]
    kinds_removed = Counter()
    for c in ray.get([sh.remote(stage.record_counts).remote(r) for r in records]):
        kinds_removed.update(c)
    ray.get([sh.remote(stage.write_records).remote(r, str(out / "duplicates" / f"part-{i:05d}.parquet"))
             for i, r in enumerate(records)])

    # mixture + write: consecutive blocks grouped into files of ~shard_bytes (times epochs)
    plans = plan_mixture({k: (v[0], v[1]) for k, v in per_source.items()}, cfg.sources, cfg.total_tokens)
    epochs = {name: p.epochs for name, p in plans.items()}
    factor = max([1.0, *epochs.values()])
    groups, cur, size = [], [], 0
    for b, nbytes in zip(blocks, block_bytes):
        if cur and size + nbytes * factor > cfg.shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(b)
        size += nbytes * factor
    if cur:
        groups.append(cur)
    (out / "docs").mkdir(parents=True, exist_ok=True)
    writer = sh.remote(stage.write_docs)
    n_out = sum(ray.get([writer.remote(str(out / "docs" / f"part-{i:05d}.parquet"), epochs, seed, cfg.row_group_rows,
                                       *g) for i, g in enumerate(groups)]))

    reasons = dict(reasons)
    kept = reasons.get("kept", 0)
    with open(out / "errors.jsonl", "w") as f:
        for e in errors:
            f.write(json.dumps(e) + "\n")
    reports = {"drop_reasons": reasons, "pii": dict(pii), "skipped": dict(skipped)}
    (out / "drop_reasons.json").write_text(stage.dumps({"reasons": reasons, "pii": dict(pii),
                                                         "skipped": dict(skipped)}))
    (out / "mixture.json").write_text(stage.dumps(plan_table(plans)))
    in_total = sum(docs_in.values())
    after_lines = kept - line_stats["line_dedup_too_short"]
    metrics = {
        "docs_in": in_total, "docs_after_clean": kept,
        "docs_dropped_quality": in_total - kept,
        "docs_dropped_line_dedup": line_stats["line_dedup_too_short"],
        "duplicates_removed": sum(kinds_removed.values()),
        "exact_duplicates": kinds_removed.get("exact", 0), "near_duplicates": kinds_removed.get("near", 0),
        "candidate_pairs": dstats["candidate_pairs"], "verified_pairs": dstats["verified_pairs"],
        "candidate_pairs_per_doc": round(dstats["candidate_pairs"] / max(1, after_lines), 4),
        "docs_unique": sum(v[0] for v in per_source.values()),
        "lines_dropped": line_stats["lines_dropped"], "corrupt_records": len(errors), "docs_out": n_out,
        "blocks": len(blocks), "partitions": parts, "output_files": len(groups),
        **{f"pii_{k}": v for k, v in pii.items()},
        **{f"epochs.{k}": round(v, 4) for k, v in epochs.items()},
        **{f"share.{k}": round(p.share, 4) for k, p in plans.items()},
        **{f"words_in.{k}": p.tokens_in for k, p in plans.items()},
    }
    return metrics, plans, reports
