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


def test_full_pipeline_unrolls_the_rlhf_iterations_with_gatt_after_v3():
    from pipelines.full import pipeline

    on = {s.name: s for s in pipeline(load_config("tiny"))}
    names = list(on)
    assert names[:4] == ["data", "tokenizer", "pretrain", "sft"]
    for i in range(1, 6):  # the names tests, bars and dashboards rely on
        for step in ("annotate", "prefs", "rm_helpfulness", "rm_safety", "rs", "eval"):
            assert f"{step}_v{i}" in on, (step, i)
        assert names.index(f"rs_v{i}") < names.index(f"eval_v{i}")
    assert on["rm_helpfulness_v2"].inputs == on["rm_safety_v2"].inputs == {"prefs": "prefs_v2", "model": "rs_v1"}
    assert on["prefs_v2"].inputs == {"previous": "prefs_v1", "batch": "annotate_v2"}  # batches 1..i
    assert on["rs_v3"].inputs["previous"] == "rs_v2"  # the pool of earlier winners
    # Ghost Attention on V3's model, as in the paper, its answers chosen by V3's reward models
    assert on["gatt"].inputs == {"model": "rs_v3", "rm_helpfulness": "rm_helpfulness_v3", "rm_safety": "rm_safety_v3"}
    assert on["rs_v4"].inputs["model"] == "gatt" and on["annotate_v4"].inputs["model"] == "gatt"
    assert on["eval_v4"].inputs["previous"] == "rs_v3"
    # PPO from V4 (rlhf.ppo_from) on the rejection-sampling model; the next iteration builds on it
    assert "ppo_v3" not in on and on["ppo_v4"].inputs["model"] == "rs_v4" and on["eval_v4"].inputs["model"] == "ppo_v4"
    assert on["rs_v5"].inputs["model"] == on["annotate_v5"].inputs["model"] == "ppo_v4"
    assert on["eval_v5"].inputs["previous"] == "ppo_v4" and on["ppo_v5"].tags["technique"] == "ppo"
    off = {s.name: s for s in pipeline(load_config("tiny", ["rlhf.gatt.enabled=false"]))}
    assert "gatt" not in off and off["rs_v4"].inputs["model"] == "rs_v3"
    first = [s.name for s in pipeline(load_config("tiny", ["rlhf.gatt.after_iteration=0", "rlhf.iterations=1"]))]
    assert first.index("gatt") == first.index("sft") + 1  # after_iteration 0: on the SFT model
    assert select(pipeline(load_config("tiny")), None, "rs_v2")[-1].name == "rs_v2"  # --until rs_v2
    assert {s.name for s in select(pipeline(load_config("tiny")), ["eval_v1"], None)} == {
        "data", "tokenizer", "pretrain", "sft", "annotate_v1", "prefs_v1", "rm_helpfulness_v1", "rm_safety_v1",
        "rs_v1", "eval_v1"}  # --stages eval_v1: the step and what it needs


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
