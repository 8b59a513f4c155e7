"""MLflow lineage on a local sqlite store: the experiment opens in the training view, every run
names its commit, Ray job and user, parent runs have distinct names, a cache-hit run links its
producer and carries its params and metrics, registered models load back by alias with mlflow
and generate / score, and training workers log system metrics."""

import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from model.config import ModelConfig
from pipelines.config import load_config
from pipelines.runner import StepSpec, execute_step, plan_fingerprints
from pipelines.tracking import (
    EXPERIMENT_KIND_TAG,
    PRODUCER_TAG,
    RunLogger,
    Tracking,
    close_orphaned_runs,
    git_state,
    pipeline_run_name,
    setup_experiment,
    start_pipeline_run,
    start_run,
)
from tests.conftest import REPO, train_tiny_tokenizer

WORDS = "the a cat dog runs sits on mat red blue green apple pear tree house river hill big small"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One sqlite store for the module (creating one runs MLflow's migrations: seconds); each
    test works in its own experiment."""
    return tmp_path_factory.mktemp("mlflow")


def make_tracking(store: Path, experiment: str, parent: bool = False) -> Tracking:
    uri = f"sqlite:///{store / 'mlflow.db'}"
    tracking = Tracking(uri, setup_experiment(uri, experiment, store / "mlartifacts" / experiment))
    if parent:
        return Tracking(uri, tracking.experiment_id, start_pipeline_run(tracking, "full", "tiny", {}))
    return tracking


# ---------------------------------------------------------------- experiment, context tags, names
def test_experiment_is_tagged_for_the_training_view_when_created_or_found(store, tmp_path):
    uri = f"sqlite:///{store / 'mlflow.db'}"
    client = MlflowClient(uri)
    made = setup_experiment(uri, "fresh", tmp_path / "a")
    assert client.get_experiment(made).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    old = client.create_experiment("older", artifact_location=(tmp_path / "b").as_uri())  # as before this tag
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert setup_experiment(uri, "older", tmp_path / "b") == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_parent_and_nested_runs_carry_commit_ray_job_and_user(store, monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_abc123", "job_name": "x"}}))
    tracking = make_tracking(store, "context", parent=True)
    client = tracking.client()
    parent = client.get_run(tracking.parent_run_id).data.tags
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert parent["git.commit"] == parent["mlflow.source.git.commit"] == head
    assert parent["git.dirty"] in ("true", "false")
    assert parent["ray.job_id"] == "raysubmit_abc123" and parent["mlflow.source.type"] == "JOB"
    assert parent["mlflow.user"]
    # a nested run (a Ray task elsewhere, another environment) inherits them from its parent
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    nested = client.get_run(start_run(tracking, "data", {"step": "data"})).data.tags
    for key in ("git.commit", "git.dirty", "ray.job_id", "mlflow.user", "mlflow.source.git.commit"):
        assert nested[key] == parent[key], key
    assert nested["mlflow.parentRunId"] == tracking.parent_run_id and nested["step"] == "data"


def test_git_state_outside_a_checkout_falls_back_to_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMA2_GIT_COMMIT", raising=False)
    assert git_state(tmp_path) == ("unknown", "unknown")
    monkeypatch.setenv("LLAMA2_GIT_COMMIT", "0123abc")
    assert git_state(tmp_path)[0] == "0123abc"


def test_parent_runs_get_distinct_dated_names(store):
    at = datetime(2026, 11, 30, 20, 15, tzinfo=UTC)  # a Monday of ISO week 49
    assert pipeline_run_name("full", "tiny", at) == "full-tiny-2026-11-30T20:15"
    assert pipeline_run_name("weekly", "7b", at) == "weekly-7b-2026-W49-1T20:15"
    tracking = make_tracking(store, "names")
    ids = [start_pipeline_run(tracking, "full", "tiny", {"pipeline": "full"}) for _ in range(3)]
    runs = [tracking.client().get_run(i) for i in ids]
    names = [r.info.run_name for r in runs]
    assert len(set(names)) == 3 and all(n.startswith("full-tiny-20") for n in names), names
    assert all(r.data.tags["iso_week"].startswith("20") and "-W" in r.data.tags["iso_week"] for r in runs)


KILLED_DRIVER = """
import os, sys
from pipelines.tracking import Tracking, start_pipeline_run, start_run
uri, exp = sys.argv[1], sys.argv[2]
parent = start_pipeline_run(Tracking(uri, exp), "full", "tiny", {})
step = start_run(Tracking(uri, exp, parent), "rs_v1", {"step": "rs_v1"})
start_run(Tracking(uri, exp, step), "trial_0", {})
print(parent, step, flush=True)
os.kill(os.getpid(), 9)  # a driver killed in the middle of the DAG
"""


def test_a_killed_invocations_runs_are_closed_by_the_next_and_live_ones_kept(store):
    tracking = make_tracking(store, "orphans")
    p = subprocess.run([sys.executable, "-c", KILLED_DRIVER, tracking.uri, tracking.experiment_id], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    dead_parent, dead_step = p.stdout.split()
    live = start_pipeline_run(tracking, "full", "tiny", {})  # this process: a driver still running
    client = tracking.client()
    elsewhere = start_pipeline_run(tracking, "full", "tiny", {})  # a driver on another host: unknowable
    client.set_tag(elsewhere, "driver.host", "another-head-node")
    assert client.get_run(dead_step).info.status == "RUNNING"

    assert close_orphaned_runs(client, tracking.experiment_id) == [dead_parent]
    runs = client.search_runs([tracking.experiment_id])
    status = {r.info.run_name: r.info.status for r in runs}
    assert status["rs_v1"] == status["trial_0"] == client.get_run(dead_parent).info.status == "KILLED"
    assert client.get_run(live).info.status == client.get_run(elsewhere).info.status == "RUNNING"
    assert "was gone" in client.get_run(dead_step).data.tags["ended_by"]
    assert close_orphaned_runs(client, tracking.experiment_id) == []  # nothing left to close


# ---------------------------------------------------------------- cache hits
SPECS = [StepSpec("a", "tests.runner_steps", "test", ("tokenizer.vocab_size",)),
         StepSpec("b", "tests.runner_steps", "test", ("model.dim",), inputs={"upstream": "a"})]


def test_cache_hit_run_links_its_producer_and_carries_its_params_and_metrics(store, tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path}"])
    fps = plan_fingerprints(SPECS, cfg)
    first_tracking, second_tracking = (make_tracking(store, "cache", parent=True),
                                       make_tracking(store, "cache", parent=True))

    def run_all(tracking):
        results = {}
        for spec in SPECS:
            inputs = {arg: results[src] for arg, src in spec.inputs.items()}
            results[spec.name] = execute_step(spec, cfg.model_dump_json(), fps[spec.name], tracking, **inputs)
        return results

    first, second = run_all(first_tracking), run_all(second_tracking)
    client = first_tracking.client()
    for name in ("a", "b"):
        assert not first[name].cached and second[name].cached
        producer, hit = client.get_run(first[name].run_id), client.get_run(second[name].run_id)
        assert hit.data.tags[PRODUCER_TAG] == producer.info.run_id
        assert hit.data.tags["cache_hit"] == "true" and hit.data.tags["artifact_path"] == first[name].path
        link = f"#/experiments/{producer.info.experiment_id}/runs/{producer.info.run_id}"
        assert link in hit.data.tags["mlflow.note.content"]
        assert hit.data.params == producer.data.params and hit.data.params  # the config subset
        assert hit.data.metrics == producer.data.metrics  # value, resumed, count, step_seconds
        assert {"value", "step_seconds"} <= set(hit.data.metrics)
        assert hit.data.tags["git.commit"] == producer.data.tags["git.commit"]


# ---------------------------------------------------------------- registered models
def _tiny_cfg(vocab: int) -> ModelConfig:
    return ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=16, max_seq_len=64)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny chat model and reward model exported as steps/sft.py and steps/reward.py do."""
    from safetensors.torch import save_file

    from model.hf import export_hf
    from model.llama import Transformer
    from model.reward import RewardModel, export_hf_reward

    d = tmp_path_factory.mktemp("exports")
    tok = train_tiny_tokenizer(d, WORDS)
    cfg = _tiny_cfg(tok.vocab_size)
    torch.manual_seed(0)
    chat = Transformer(cfg).eval()
    export_hf(chat, cfg, d / "chat" / "hf", tokenizer_model=tok.model_path)
    rm = RewardModel(cfg).eval()
    torch.nn.init.normal_(rm.score.weight, std=0.5)  # a trained head: scores differ between texts
    save_file({k: v.contiguous() for k, v in rm.state_dict().items()}, str(d / "rm.safetensors"))
    export_hf_reward(d / "rm.safetensors", cfg, d / "rm" / "hf", d / "chat" / "hf", tok.pad_id)
    return d, chat, rm


@pytest.fixture
def restore_tracking_uri():
    """The registry tests load `models:/` URIs through mlflow's global tracking URI: put it back."""
    import mlflow

    before = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(before)


def _register(store, hf_dir, name, alias, **kw):
    tracking = make_tracking(store, name, parent=True)
    run_id = start_run(tracking, "sft", {"step": "sft", "fingerprint": "f" * 16})
    version = RunLogger(tracking.client(), run_id).register_model(name, hf_dir, alias, {"axis": "x"}, **kw)
    return tracking, run_id, version


def test_registered_chat_model_loads_by_alias_and_generates(store, exports, restore_tracking_uri):
    import mlflow.pyfunc
    import mlflow.transformers

    d, chat, _ = exports
    tracking, run_id, version = _register(store, d / "chat" / "hf", "tiny-chat", "sft")
    client = tracking.client()
    mv = client.get_model_version_by_alias("tiny-chat", "sft")
    assert int(mv.version) == version and mv.source.endswith("/hf") and mv.run_id == run_id
    assert mv.tags["task"] == "llm/v1/chat" and mv.tags["dtype"] == "float32" and mv.tags["step"] == "sft"
    # no second copy of the weights: the run's artifact is a hard link to the export
    stored = next((store / "mlartifacts" / "tiny-chat").rglob("hf/model/model.safetensors"))
    assert stored.stat().st_ino == (d / "chat" / "hf" / "model.safetensors").stat().st_ino

    mlflow.set_tracking_uri(tracking.uri)
    pipe = mlflow.transformers.load_model("models:/tiny-chat@sft")
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():  # the registered weights are the trained ones
        torch.testing.assert_close(pipe.model(ids).logits, chat(ids), atol=1e-5, rtol=1e-5)
    out = pipe("the cat", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert out.startswith("the cat") and len(out) > len("the cat")
    served = mlflow.pyfunc.load_model("models:/tiny-chat@sft").predict(
        {"messages": [{"role": "user", "content": "the red apple"}], "max_tokens": 4, "temperature": 0.7})
    assert served[0]["choices"][0]["message"]["role"] == "assistant"
    assert served[0]["usage"]["completion_tokens"] > 0


def test_registered_reward_model_scores_like_the_trained_model(store, exports, restore_tracking_uri):
    import mlflow.pyfunc
    from transformers import AutoTokenizer

    from model.reward import score_sequences

    d, _, rm = exports
    tracking, _, _ = _register(store, d / "rm" / "hf", "tiny-rm", "rlhf-v1")
    mv = tracking.client().get_model_version_by_alias("tiny-rm", "rlhf-v1")
    assert mv.tags["task"] == "text-classification" and mv.tags["axis"] == "x"
    mlflow.set_tracking_uri(tracking.uri)
    model = mlflow.pyfunc.load_model("models:/tiny-rm@rlhf-v1")
    texts = ["the cat sits on the mat", "big red apple tree"]
    scores = model.predict(texts)["score"].tolist()
    tok = AutoTokenizer.from_pretrained(d / "rm" / "hf")
    expected = score_sequences(rm, [tok(t)["input_ids"] for t in texts], pad_id=0).tolist()
    assert scores == pytest.approx(expected, abs=1e-4) and scores[0] != pytest.approx(scores[1])


def test_bf16_registry_stores_half_the_bytes_and_loads_in_bf16(store, exports, restore_tracking_uri):
    import mlflow.transformers
    from safetensors import safe_open

    d, _, _ = exports
    export = d / "rm" / "hf" / "model.safetensors"
    before = export.stat().st_size
    tracking, _, _ = _register(store, d / "rm" / "hf", "tiny-rm-bf16", "rlhf-v1", dtype="bfloat16")
    assert tracking.client().get_model_version_by_alias("tiny-rm-bf16", "rlhf-v1").tags["dtype"] == "bfloat16"
    stored = next((store / "mlartifacts" / "tiny-rm-bf16").rglob("hf/model/model.safetensors"))
    with safe_open(str(stored), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert stored.stat().st_size < 0.6 * before and export.stat().st_size == before  # the export is untouched
    mlflow.set_tracking_uri(tracking.uri)
    assert mlflow.transformers.load_model("models:/tiny-rm-bf16@rlhf-v1").model.dtype == torch.bfloat16


# ---------------------------------------------------------------- system metrics
def test_training_worker_logs_system_metrics_to_the_step_run(store, monkeypatch):
    from steps.engine.worker import MetricLogger

    tracking = make_tracking(store, "system", parent=True)
    run_id = start_run(tracking, "pretrain", {"step": "pretrain"})
    monkeypatch.setattr(MetricLogger, "SAMPLE_SECONDS", 0.3)
    logger = MetricLogger(tracking.uri, run_id, rank=0)
    logger.log({"step": 1, "loss": 2.5}, 1)
    time.sleep(1.0)
    logger.close()
    client = tracking.client()
    metrics = client.get_run(run_id).data.metrics
    assert metrics["train/loss"] == 2.5
    assert "system/cpu_utilization_percentage" in metrics and metrics["system/system_memory_usage_megabytes"] > 0
    assert len(client.get_metric_history(run_id, "system/cpu_utilization_percentage")) >= 2
    # a rank that is not the first on its node neither logs nor samples
    monkeypatch.setenv("LOCAL_RANK", "1")
    other = MetricLogger(tracking.uri, run_id, rank=1)
    assert other.client is None and other.monitor is None
