"""Weekly human-preference batches (RECIPE.md section 6): the `prefs_v{i}` step.

Iteration i's batch is either the tiny preset's simulated vendor delivery (the `annotate_v{i}`
artifact, whose `batch/` folder holds JSONL files and `_SUCCESS`) or, with real data, the i-th
entry of `preference.batches` (a directory, a single file, or an object-store prefix that
pyarrow.fs reads, e.g. `s3://bucket/prefs/2026-w48/`). The step ingests it into the
append-only store (steps/preference_store.py: validation, versioning, lock; the same path as
`pipelines/weekly.py --ingest-only`) and writes a snapshot of every pair accepted so far:

    pairs.parquet   batches 1..i (PAIR_SCHEMA): previous snapshot + this batch's accepted pairs
    batches.json    the versions, digests, counts and quarantined rows of batches 1..i

Ingesting a batch the store already holds (the weekly CLI took it first, or a re-run) is a
no-op: the step takes the stored version. A rejected batch fails the step with the report.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from model.config import Section
from steps.preference_adapters import FORMATS
from steps.preference_schema import AXES, PAIR_SCHEMA, STRENGTHS
from steps.preference_store import PreferenceStore, batch_digest, store_root

if TYPE_CHECKING:  # steps receive artifacts; the runner (pipelines/) makes them
    from pipelines.artifacts import Artifact

VERSION = "1"
# The config that determines a snapshot. Not `batches`: iteration i's batch enters the
# fingerprint by its content (fingerprint_inputs), so listing week 7 leaves weeks 1-6 cached.
CONFIG_KEYS = ("preference.format", "preference.on_error", "preference.max_invalid_fraction",
               "preference.max_text_chars", "preference.eval_fraction")


class PreferenceConfig(Section):
    """Preference batches (RECIPE 6): where they come from, how they are checked and stored."""

    # iteration i ingests batches[i-1] (path, single file or URI); empty on the tiny preset,
    # whose batches come from the simulated annotators (annotate_v{i})
    batches: list[str] = Field(default_factory=list)
    format: Literal[FORMATS] = "contract"  # type: ignore[valid-type]  # the format of `batches`
    store: str = "preferences"  # the append-only store, relative to run.output_dir
    # quarantine: ingest the valid rows, keep the invalid ones with their reasons beside the
    # batch's record; fail: any invalid row rejects the whole batch. Quarantine is the default
    # so that a weekly run does not stall on a handful of bad rows among thousands; a batch
    # that is mostly broken is still rejected whole (max_invalid_fraction), as is one with an
    # unreadable file.
    on_error: Literal["quarantine", "fail"] = "quarantine"
    max_invalid_fraction: float = Field(0.1, ge=0, le=1)
    max_text_chars: int = Field(20_000, ge=1)  # per response and per prompt turn (~5k tokens)
    eval_fraction: float = Field(0.05, ge=0, lt=1)  # held-out share, fixed per pair_id
    lock_timeout_s: float = Field(600.0, gt=0)  # how long an ingest waits for another one


def store(cfg: Any) -> PreferenceStore:
    """The run's preference store (cfg: the whole pipeline Config)."""
    return PreferenceStore(store_root(cfg.run.output_dir, cfg.preference.store))


def batch_uri(cfg: Any, iteration: int, batch: Artifact | None) -> tuple[str, str]:
    """(uri, format) of iteration `iteration`'s batch."""
    if batch is not None:
        return str(batch.path / "batch"), "contract"
    listed = cfg.preference.batches
    if not 1 <= iteration <= len(listed):
        raise ValueError(f"prefs_v{iteration}: no batch for iteration {iteration}: preference.batches lists "
                         f"{len(listed)} (give one path or URI per RLHF iteration, in order)")
    return listed[iteration - 1], cfg.preference.format


def fingerprint_inputs(cfg: Any, iteration: int) -> str | None:
    """The content digest of a user-supplied batch (None for the annotate artifact's, which the
    runner already fingerprints as an input)."""
    if iteration > len(cfg.preference.batches):
        return None
    uri, fmt = batch_uri(cfg, iteration, None)
    return batch_digest(uri)


def run(ctx: Any, iteration: int, batch: Artifact | None = None,
        previous: Artifact | None = None) -> dict[str, Any]:
    uri, fmt = batch_uri(ctx.cfg, iteration, batch)
    prefs = store(ctx.cfg)
    result = prefs.ingest(uri, ctx.cfg.preference, fmt)
    print(result.report, flush=True)
    if result.status == "rejected":
        raise ValueError(f"prefs_v{iteration}: batch {uri} rejected:\n{result.report}")
    record = next(b for b in prefs.batches() if b["version"] == result.version)

    earlier: list[dict[str, Any]] = []
    tables = []
    if previous is not None:
        earlier = json.loads(previous.file("batches.json").read_text())["batches"]
        tables.append(pq.read_table(previous.file("pairs.parquet"), schema=PAIR_SCHEMA))
    if all(b["version"] != record["version"] for b in earlier):  # the same batch twice adds nothing
        earlier.append(record)
        tables.append(prefs.pairs([record["version"]]))
    pairs = pa.concat_tables(tables) if tables else PAIR_SCHEMA.empty_table()
    pq.write_table(pairs, ctx.out_dir / "pairs.parquet")
    snapshot = {"iteration": iteration, "batches": earlier}
    (ctx.out_dir / "batches.json").write_text(json.dumps(snapshot, indent=2))
    (ctx.out_dir / "report.txt").write_text(result.report + "\n", encoding="utf-8")

    for b in earlier:  # the data this snapshot holds, as MLflow dataset inputs (MLflow keeps 36 digest chars)
        ctx.log_input_artifact(f"prefs:{b['version']}", b["digest"][:32], prefs.batch_dir(b["version"]))
    return snapshot_metrics(pairs, earlier, record)


def snapshot_metrics(pairs: pa.Table, batches: list[dict[str, Any]], new: dict[str, Any]) -> dict[str, Any]:
    axis = Counter(pairs.column("axis").to_pylist())
    strength = Counter(pairs.column("strength").to_pylist())
    split = Counter(pairs.column("split").to_pylist())
    return {
        "pairs": pairs.num_rows,
        **{f"pairs.{a}": axis.get(a, 0) for a in AXES},
        **{f"pairs.{s}": strength.get(s, 0) for s in STRENGTHS},
        "pairs.eval": split.get("eval", 0),
        "batches": len(batches),
        "batch.accepted": new["accepted"],
        "batch.quarantined": new["quarantined"],
        "quarantined": sum(b["quarantined"] for b in batches),
    }
