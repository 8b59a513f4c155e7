"""The DAG on Ray with MLflow: parent run, nested step runs with tags, cache hits, --until/--stages."""

import pytest
from mlflow import MlflowClient

from pipelines.config import load_config
from pipelines.dag import select
from pipelines.runner import StepSpec
from pipelines.session import run_pipeline

SPECS = [
    StepSpec("a", "tests.runner_steps", "test", ("tokenizer.vocab_size",)),
    StepSpec("b", "tests.runner_steps", "test", ("model.dim",), inputs={"upstream": "a"}),
    StepSpec("c", "tests.runner_steps", "test", ("model.n_layers",), inputs={"upstream": "a"}),
]


def test_select_prefix_and_dependencies():
    assert [s.name for s in select(SPECS, None, "b")] == ["a", "b"]
    assert [s.name for s in select(SPECS, ["c"], None)] == ["a", "c"]
    with pytest.raises(ValueError, match="no such step"):
        select(SPECS, None, "zzz")


def test_full_pipeline_gatt_is_a_switchable_step():
    from pipelines.full import pipeline

    on = {s.name: s for s in pipeline(load_config("tiny"))}
    assert list(on) == ["data", "tokenizer", "pretrain", "sft", "gatt"]
    assert on["gatt"].inputs == {"model": "sft"}  # the newest chat model until the RLHF loop joins
    off = [s.name for s in pipeline(load_config("tiny", ["rlhf.gatt.enabled=false"]))]
    assert "gatt" not in off and off[-1] == "sft"


@pytest.mark.slow
def test_pipeline_on_ray_tracks_every_step(tmp_path, ray_local, capsys):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.experiment=dag-test"])
    assert run_pipeline(cfg, SPECS, title="test") == 0
    out = capsys.readouterr().out
    assert "mlflow ui --backend-store-uri sqlite:///" in out and "3 steps" in out

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.experiment=dag-test"])
    assert run_pipeline(cfg, SPECS, title="test") == 0
    assert "(3 cached)" in capsys.readouterr().out

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("dag-test")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 2 and len(children) == 6
    first_parent = parents[0].info.run_id
    first = [r for r in children if r.data.tags["mlflow.parentRunId"] == first_parent]
    assert sorted(r.data.tags["step"] for r in first) == ["a", "b", "c"]
    assert all(r.data.tags["cache_hit"] == "false" and r.data.tags["stage"] == "test" for r in first)
    assert all(len(r.data.tags["fingerprint"]) == 16 for r in first)
    later = [r for r in children if r.data.tags["mlflow.parentRunId"] != first_parent]
    assert all(r.data.tags["cache_hit"] == "true" for r in later)
    b = next(r for r in first if r.data.tags["step"] == "b")
    assert b.inputs.dataset_inputs[0].dataset.digest == next(
        r for r in first if r.data.tags["step"] == "a").data.tags["fingerprint"]
    assert "value" in b.data.metrics
