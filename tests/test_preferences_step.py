"""The prefs_v{i} step through the real runner: snapshots of batches 1..i, caching, the
fingerprint of user-supplied batches, and the tiny preset's annotate artifact as the source."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.artifacts import ArtifactStore
from pipelines.config import load_config
from pipelines.runner import StepResult, StepSpec, execute_step, plan_fingerprints
from steps import preferences
from tests.test_preferences import batch, row


def prefs_specs(n: int, annotate: bool = False) -> list[StepSpec]:
    """The StepSpecs pipelines/full.py wires for iterations 1..n (annotate: the tiny preset's)."""
    specs = []
    for i in range(1, n + 1):
        inputs = {"batch": f"annotate_v{i}"} if annotate else {}
        if i > 1:
            inputs["previous"] = f"prefs_v{i - 1}"
        specs.append(StepSpec(f"prefs_v{i}", preferences, "preferences", preferences.CONFIG_KEYS, inputs=inputs,
                              params={"iteration": i}, tags={"rlhf_version": f"v{i}"}))
    return specs


def run_all(specs, cfg, upstream=None):
    fps = plan_fingerprints(specs, cfg) if upstream is None else None
    results = dict(upstream or {})
    for spec in specs:
        inputs = {arg: results[src] for arg, src in spec.inputs.items()}
        fp = fps[spec.name] if fps else spec.name + "-fp"
        results[spec.name] = execute_step(spec, cfg.model_dump_json(), fp, None, **inputs)
    return results


def pair_ids(result: StepResult) -> list[str]:
    return sorted(pq.read_table(Path(result.path) / "pairs.parquet").column("pair_id").to_pylist())


def test_user_batches_give_snapshots_of_every_batch_so_far(tmp_path):
    b1 = batch(tmp_path, "week1", [row(i) for i in range(5)])
    b2 = batch(tmp_path, "week2", [row(i) for i in range(5, 8)] + [row(8, axis="safety", safety_label="both_safe"),
                                                                    row(9, strength="bogus")])
    cfg = load_config(None, [f"run.output_dir={tmp_path / 'out'}", f"preference.batches=[{b1}, {b2}]",
                             "preference.max_invalid_fraction=0.5"])
    specs = prefs_specs(2)
    res = run_all(specs, cfg)
    v1, v2 = res["prefs_v1"], res["prefs_v2"]
    assert pair_ids(v1) == sorted(f"p{i}" for i in range(5))
    assert pair_ids(v2) == sorted(f"p{i}" for i in range(9))  # batches 1..2, p9 quarantined
    versions = [b["version"] for b in json.loads((Path(v2.path) / "batches.json").read_text())["batches"]]
    assert [v[:4] for v in versions] == ["0001", "0002"]
    assert v2.metrics["pairs"] == 9 and v2.metrics["batches"] == 2 and v2.metrics["batch.quarantined"] == 1
    assert v2.metrics["pairs.safety"] == 1 and v2.metrics["pairs.better"] == 9
    assert pq.read_table(Path(v2.path) / "pairs.parquet").schema.equals(preferences.PAIR_SCHEMA)

    again = run_all(specs, cfg)  # nothing changed: both cached, the store untouched
    assert again["prefs_v1"].cached and again["prefs_v2"].cached
    assert len(preferences.store(cfg).batches()) == 2

    # a changed week-2 delivery changes prefs_v2's fingerprint only
    before = plan_fingerprints(specs, cfg)
    (b2 / "part-0.jsonl").write_text(json.dumps(row(10)) + "\n")
    after = plan_fingerprints(specs, cfg)
    assert before["prefs_v1"] == after["prefs_v1"] and before["prefs_v2"] != after["prefs_v2"]


def test_a_batch_beyond_the_listed_ones_fails_the_step_with_a_clear_message(tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path / 'out'}"])
    with pytest.raises(ValueError, match="no batch for iteration 1: preference.batches lists 0"):
        run_all(prefs_specs(1), cfg)


def annotate_artifact(root: Path, i: int, rows: list) -> StepResult:
    """What the tiny preset's annotate_v{i} step publishes: batch/part-00000.jsonl + _SUCCESS."""
    store = ArtifactStore(root)
    staging = store.staging_dir(f"annotate_v{i}", f"fp{i}")
    batch(staging, "batch", rows)
    art = store.publish(staging, {"step": f"annotate_v{i}", "fingerprint": f"fp{i}", "metrics": {}})
    return StepResult(f"annotate_v{i}", f"fp{i}", str(art.path), False, 0.0, {}, None)


def test_annotate_artifacts_are_ingested_and_a_rejected_one_fails_the_step(tmp_path):
    out = tmp_path / "out"
    cfg = load_config(None, [f"run.output_dir={out}"])
    upstream = {"annotate_v1": annotate_artifact(out, 1, [row(i) for i in range(4)]),
                "annotate_v2": annotate_artifact(out, 2, [row(i) for i in range(4, 6)])}
    res = run_all(prefs_specs(2, annotate=True), cfg, upstream)
    assert pair_ids(res["prefs_v2"]) == sorted(f"p{i}" for i in range(6))
    assert (Path(res["prefs_v2"].path) / "report.txt").read_text().startswith("batch:")

    bad = {"annotate_v1": annotate_artifact(tmp_path / "out2", 1, [row(1, strength="huge"), row(2, axis="x")])}
    cfg2 = load_config(None, [f"run.output_dir={tmp_path / 'out2'}"])
    with pytest.raises(ValueError, match="rejected"):
        run_all(prefs_specs(1, annotate=True), cfg2, bad)
    assert not (tmp_path / "out2" / "prefs_v1").exists() or not any((tmp_path / "out2" / "prefs_v1").glob("*/manifest.json"))


def test_the_snapshot_logs_every_batch_it_holds_as_an_mlflow_dataset_input(tmp_path):
    from pipelines.tracking import Tracking, setup_experiment

    b1, b2 = batch(tmp_path, "w1", [row(1)]), batch(tmp_path, "w2", [row(2)])
    cfg = load_config(None, [f"run.output_dir={tmp_path / 'out'}", f"preference.batches=[{b1}, {b2}]"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = Tracking(uri, setup_experiment(uri, "prefs-test", tmp_path / "mlartifacts"))
    specs = prefs_specs(2)
    fps = plan_fingerprints(specs, cfg)
    v1 = execute_step(specs[0], cfg.model_dump_json(), fps["prefs_v1"], tracking)
    v2 = execute_step(specs[1], cfg.model_dump_json(), fps["prefs_v2"], tracking, previous=v1)
    inputs = tracking.client().get_run(v2.run_id).inputs.dataset_inputs
    logged = {d.dataset.name: d.dataset.digest for d in inputs if d.dataset.name.startswith("prefs:")}
    batches = preferences.store(cfg).batches()
    assert logged == {f"prefs:{b['version']}": b["digest"][:32] for b in batches} and len(logged) == 2
