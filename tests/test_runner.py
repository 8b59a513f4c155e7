"""The runner's caching and invalidation rules, atomic publication and resume."""

import json

import pytest

from pipelines.artifacts import ArtifactStore
from pipelines.config import load_config
from pipelines.runner import StepSpec, execute_step, plan_fingerprints

SPECS = [
    StepSpec("a", "tests.runner_steps", "test", ("tokenizer.vocab_size",)),
    StepSpec("b", "tests.runner_steps", "test", ("model.dim",), inputs={"upstream": "a"}),
]


def run_all(cfg, specs=SPECS):
    fps = plan_fingerprints(specs, cfg)
    results = {}
    for spec in specs:
        inputs = {arg: results[src] for arg, src in spec.inputs.items()}
        results[spec.name] = execute_step(spec, cfg.model_dump_json(), fps[spec.name], None, **inputs)
    return results


def cfg_with(tmp_path, *overrides):
    return load_config(None, [f"run.output_dir={tmp_path}", *overrides])


def test_rerun_is_all_cache_hits(tmp_path):
    first = run_all(cfg_with(tmp_path))
    assert not any(r.cached for r in first.values())
    second = run_all(cfg_with(tmp_path))
    assert all(r.cached for r in second.values())
    assert {k: r.path for k, r in first.items()} == {k: r.path for k, r in second.items()}


def test_downstream_config_change_recomputes_only_downstream(tmp_path):
    run_all(cfg_with(tmp_path))
    again = run_all(cfg_with(tmp_path, "model.dim=64"))
    assert again["a"].cached and not again["b"].cached
    out = json.loads(again["b"].artifact().file("numbers.json").read_text())
    assert out == sum(json.loads(again["a"].artifact().file("numbers.json").read_text())) * 64


def test_upstream_config_change_recomputes_everything_after_it(tmp_path):
    run_all(cfg_with(tmp_path))
    again = run_all(cfg_with(tmp_path, "tokenizer.vocab_size=1001"))
    assert not again["a"].cached and not again["b"].cached


def test_unrelated_config_change_recomputes_nothing(tmp_path):
    run_all(cfg_with(tmp_path))
    again = run_all(cfg_with(tmp_path, "pretrain.train.max_steps=3"))
    assert all(r.cached for r in again.values())


def test_step_version_is_part_of_the_fingerprint(tmp_path, monkeypatch):
    cfg = cfg_with(tmp_path)
    before = plan_fingerprints(SPECS, cfg)
    import tests.runner_steps as mod
    monkeypatch.setattr(mod, "VERSION", "2")
    after = plan_fingerprints(SPECS, cfg)
    assert before["a"] != after["a"] and before["b"] != after["b"]


def test_failed_step_publishes_nothing_and_resumes_from_work_dir(tmp_path, monkeypatch):
    cfg = cfg_with(tmp_path)
    monkeypatch.setenv("RUNNER_TEST_FAIL", "b")
    with pytest.raises(RuntimeError, match="planned failure"):
        run_all(cfg)
    store = ArtifactStore(tmp_path)
    fps = plan_fingerprints(SPECS, cfg)
    assert store.get("a", fps["a"]) is not None  # finished upstream work is kept
    assert not store.path("b", fps["b"]).exists()  # no half-written artifact appears
    assert not list((tmp_path / "b" / ".staging").iterdir())
    assert (store.work_dir("b", fps["b"]) / "progress.txt").exists()  # scratch survives for resume
    monkeypatch.delenv("RUNNER_TEST_FAIL")
    again = run_all(cfg)
    assert again["a"].cached and again["b"].metrics["resumed"] == 1.0
    assert not (tmp_path / "b" / ".work" / fps["b"]).exists()  # cleaned after success


def test_manifest_records_inputs_config_and_checksums(tmp_path):
    res = run_all(cfg_with(tmp_path))
    art = res["b"].artifact()
    m = art.manifest
    assert m["inputs"] == {"upstream": {"step": "a", "fingerprint": res["a"].fingerprint}}
    assert m["config"] == {"model.dim": 128} and m["version"] == "1"
    assert set(m["files"]) == {"numbers.json"} and len(m["files"]["numbers.json"]) == 64
    store = ArtifactStore(tmp_path)
    assert store.verify(art) == []
    (art.path / "numbers.json").write_text("tampered")
    assert store.verify(art) == ["numbers.json"]


def test_a_corrupted_artifact_is_detected_by_checksum_and_never_loaded(tmp_path):
    from pipelines.artifacts import ArtifactCorrupted

    first = run_all(cfg_with(tmp_path))
    numbers = tmp_path / "a" / first["a"].fingerprint / "numbers.json"
    numbers.write_text(numbers.read_text()[:-2])  # truncated
    # the downstream step, recomputed after a config change, refuses its corrupted input
    with pytest.raises(ArtifactCorrupted, match=r"numbers\.json"):
        run_all(cfg_with(tmp_path, "model.dim=64"))
    # and the step itself is not served from a corrupted cache either
    with pytest.raises(ArtifactCorrupted, match="Delete .* and re-run"):
        run_all(cfg_with(tmp_path))
    import shutil

    shutil.rmtree(tmp_path / "a" / first["a"].fingerprint)
    assert not run_all(cfg_with(tmp_path))["a"].cached  # recomputed after the user deletes it


def test_steps_running_at_once_can_log_the_same_input_artifact(tmp_path):
    """The two reward models log the same prefs artifact as an MLflow dataset input at the same
    moment; one sqlite insert of the dataset row loses the race and must be retried, not fail."""
    import threading

    from pipelines.tracking import RunLogger, Tracking, setup_experiment, start_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = setup_experiment(uri, "race", tmp_path / "art")
    tracking = Tracking(uri, exp)
    loggers = [RunLogger(tracking.client(), start_run(tracking, f"rm{i}", {})) for i in range(6)]
    barrier, errors = threading.Barrier(len(loggers)), []

    def log(logger):
        barrier.wait()
        try:
            logger.log_input_artifact("prefs_v4:prefs", "0123456789abcdef", tmp_path)
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=log, args=(lg,)) for lg in loggers]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    for lg in loggers:
        run = lg.client.get_run(lg.run_id)
        assert run.inputs.dataset_inputs[0].dataset.digest == "0123456789abcdef"
