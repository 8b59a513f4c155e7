"""Faults the pipeline survives, each caused for real: a training worker SIGKILLed from outside,
the pipeline driver SIGKILLed in the middle of the DAG (the shared end-to-end run, conftest.py),
and artifacts or checkpoints truncated or altered on disk."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from pipelines.runner import StepSpec, execute_step, plan_fingerprints
from steps.engine import train
from steps.engine.config import OptimConfig, TrainConfig
from tests.conftest import latest, run_cli
from tests.test_engine import objective

# ------------------------------------------------------------------ a training worker SIGKILLed


def _mlflow_run(tmp_path: Path) -> tuple[str, str]:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("faults", artifact_location=str(tmp_path / "mlartifacts"))
    return uri, client.create_run(exp).info.run_id


def _logged_steps(uri: str, run_id: str) -> list[int]:
    from mlflow import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, "train/loss"))


def _train_workers() -> list[psutil.Process]:
    """Ray Train's worker actors among this process's descendants (the local Ray's raylet is
    our child, its workers its children): their process title is `ray::RayTrainWorker...`."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith("ray::RayTrainWorker"):
                found.append(p)
        except psutil.Error:
            continue
    return found


class WorkerKiller(threading.Thread):
    """Waits until the training has a checkpoint and has logged `after` more steps, then
    SIGKILLs one RayTrainWorker from outside, as the OOM killer or a lost node would."""

    def __init__(self, work: Path, uri: str, run_id: str, after: int = 3, timeout: float = 300):
        super().__init__(daemon=True)
        self.work, self.uri, self.run_id, self.after, self.timeout = work, uri, run_id, after, timeout
        self.killed: psutil.Process | None = None
        self.checkpoint: int | None = None  # the step of the last checkpoint when it struck
        self.logged_at_kill: int | None = None
        self.error: str | None = None

    def run(self) -> None:
        latest = self.work / "checkpoints" / "latest"
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if latest.exists():
                step = int(latest.read_text().strip().removeprefix("step_"))
                logged = _logged_steps(self.uri, self.run_id)
                if logged and logged[-1] >= step + self.after:
                    workers = _train_workers()
                    if not workers:
                        self.error = "a checkpoint exists but no RayTrainWorker process was found"
                        return
                    self.checkpoint, self.logged_at_kill = step, logged[-1]
                    self.killed = workers[-1]
                    os.kill(self.killed.pid, signal.SIGKILL)
                    return
            time.sleep(0.05)
        self.error = "no checkpoint appeared in time"


def _small_training(max_failures: int) -> tuple[TrainConfig, OptimConfig]:
    # 40 steps at 2 workers, a checkpoint every 10: long enough (~0.3 s a step) for the killer
    # to strike between two checkpoints, short enough for CI
    tcfg = TrainConfig(num_workers=2, cpus_per_worker=1, global_batch_size=16, micro_batch_size=4, max_steps=40,
                       zero_stage=3, precision="fp32", checkpoint_every=10, log_every=1, eval_every=40,
                       max_failures=max_failures)
    return tcfg, OptimConfig(lr=3e-2, warmup_steps=2)


@pytest.mark.slow
def test_sigkilled_training_worker_is_restarted_from_its_checkpoint_with_the_same_losses(tmp_path, ray_local):
    obj = objective(tmp_path)
    tcfg, ocfg = _small_training(max_failures=1)
    reference = train(obj, tcfg, ocfg, work_dir=tmp_path / "ref" / "work", out_dir=tmp_path / "ref" / "out", seed=0)

    uri, run_id = _mlflow_run(tmp_path)
    work = tmp_path / "killed" / "work"
    killer = WorkerKiller(work, uri, run_id)
    killer.start()
    result = train(obj, tcfg, ocfg, work_dir=work, out_dir=tmp_path / "killed" / "out", seed=0,
                   tracking_uri=uri, mlflow_run_id=run_id)
    killer.join(timeout=10)
    assert killer.error is None, killer.error
    assert killer.killed is not None and not killer.killed.is_running(), "the worker was not killed"
    ckpt = killer.checkpoint
    assert ckpt is not None and ckpt < 40 and killer.logged_at_kill < 40  # it struck mid-training

    # Ray Train restarted the group from the checkpoint: the steps up to it were logged once, the
    # ones between it and the kill twice (lost and redone), and the run went on to the end.
    logged = _logged_steps(uri, run_id)
    once = [s for s in range(1, ckpt + 1) if logged.count(s) != 1]
    assert once == [], f"steps up to the checkpoint (step {ckpt}) were redone: {once}"
    redone = sorted({s for s in logged if logged.count(s) > 1})
    assert redone and min(redone) == ckpt + 1 and max(redone) >= killer.logged_at_kill - 1, redone
    assert sorted(set(logged)) == list(range(1, 41))

    # Same data position and RNG after the restart: the same losses as the uninterrupted run.
    # Measured: identical to the last bit on CPU (gloo); allowed: 1e-6 relative (float noise).
    want = {h["step"]: h["loss"] for h in reference.history}
    got = {h["step"]: h["loss"] for h in result.history}
    assert sorted(got) == list(range(1, 41))
    for step in range(ckpt + 1, 41):
        assert got[step] == pytest.approx(want[step], rel=1e-6), step
    assert result.final["loss"] == pytest.approx(reference.final["loss"], rel=1e-6)
    assert result.final["eval_loss"] == pytest.approx(reference.final["eval_loss"], rel=1e-6)

    # ------------------------------------------------ then an altered checkpoint shard is refused
    # The finished run's work dir still holds its last checkpoints; a later run resumes from the
    # newest. One byte of rank 1's ZeRO shard changed (same size: only the checksum can tell).
    from ray.train import TrainingFailedError

    tag = (work / "checkpoints" / "latest").read_text().strip()
    shard = next(p for p in sorted((work / "checkpoints" / tag).iterdir()) if "zero_pp_rank_1_" in p.name)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    once_cfg, _ = _small_training(max_failures=0)
    out = tmp_path / "refused" / "out"
    with pytest.raises(TrainingFailedError) as err:
        train(obj, once_cfg, ocfg, work_dir=work, out_dir=out, seed=0)
    message = _failure_text(err.value)
    assert "CheckpointCorrupted" in message and shard.name in message, message[-3000:]
    assert not list(out.glob("*.safetensors*")), "a run that refused its checkpoint still wrote weights"


def _failure_text(exc: BaseException) -> str:
    """Everything a TrainingFailedError says, including the worker's own exception."""
    import traceback

    return "".join(traceback.format_exception(exc))


# ------------------------------------------------------- a truncated safetensors input artifact
# This module doubles as a two-step pipeline for the runner (VERSION + run): `weights` writes a
# safetensors file, `user` loads it as its input. LOADS records every load that happened.
VERSION = "1"
LOADS: list[str] = []
WEIGHT_STEPS = [
    StepSpec("weights", "tests.test_faults", "test", ("tokenizer.vocab_size",)),
    StepSpec("user", "tests.test_faults", "test", ("model.dim",), inputs={"weights": "weights"}),
]


def run(ctx, **inputs):
    import torch
    from safetensors.torch import save_file

    from model.weights import load_state_dict

    if "weights" in inputs:
        path = inputs["weights"].file("model.safetensors")
        LOADS.append(str(path))
        scale = sum(float(t.abs().sum()) for t in load_state_dict(path).values()) * ctx.cfg.model.dim
        (ctx.out_dir / "scale.json").write_text(json.dumps(scale))
        return {"scale": scale}
    torch.manual_seed(ctx.seed)
    save_file({"layer.weight": torch.randn(256, 256)}, str(ctx.out_dir / "model.safetensors"))
    return {}


def _run_steps(cfg):
    fps = plan_fingerprints(WEIGHT_STEPS, cfg)
    results = {}
    for spec in WEIGHT_STEPS:
        inputs = {arg: results[src] for arg, src in spec.inputs.items()}
        results[spec.name] = execute_step(spec, cfg.model_dump_json(), fps[spec.name], None, **inputs)
    return results


def test_truncated_safetensors_input_is_refused_by_checksum_and_never_loaded(tmp_path):
    from pipelines.artifacts import ArtifactCorrupted
    from pipelines.config import load_config

    first = _run_steps(load_config(None, [f"run.output_dir={tmp_path}"]))
    weights = first["weights"].artifact().path / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # cut off the tail, as a full disk or a killed copy would
        f.truncate(size // 2)
    LOADS.clear()
    # the downstream step, recomputed after a config change, must not read its corrupted input
    with pytest.raises(ArtifactCorrupted) as err:
        _run_steps(load_config(None, [f"run.output_dir={tmp_path}", "model.dim=64"]))
    assert str(weights) in str(err.value) and "Delete" in str(err.value), err.value
    assert LOADS == [], "the corrupted weights were loaded"
    assert [p.name for p in (tmp_path / "user").iterdir() if not p.name.startswith(".")] == [
        first["user"].fingerprint]  # no artifact was made from it


# ---------------------------------------------- the driver SIGKILLed in the middle of the DAG (e2e)
# The shared run's first invocation was SIGKILLed once sft had a checkpoint (tests/conftest.py
# tiny_run); the invocation after it completed the DAG; the third was all cache hits.


def _parent_runs(out: Path):
    """The pipeline's parent runs, oldest first: the killed, the resumed and the cached invocation."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name("llama2-tiny")
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    parents = sorted((r for r in runs if "mlflow.parentRunId" not in r.data.tags), key=lambda r: r.info.start_time)
    children = {p.info.run_id: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
                for p in parents}
    return client, parents, children


@pytest.mark.e2e
@pytest.mark.slow
def test_killed_driver_left_no_process_behind(tiny_run):
    killed = tiny_run.killed
    assert any("raylet" in p for p in killed.processes), killed.processes  # its own Ray was running
    assert any("RayTrainWorker" in p for p in killed.processes), killed.processes
    assert killed.survivors == [], f"still alive 30 s after the driver was killed: {killed.survivors}"


@pytest.mark.e2e
@pytest.mark.slow
def test_steps_completed_before_the_kill_are_cache_hits_when_resumed(tiny_run):
    out, resumed, _ = tiny_run
    killed = tiny_run.killed
    assert {"data", "tokenizer", "pretrain"} <= set(killed.completed), killed.completed
    assert killed.step not in killed.completed
    _, parents, children = _parent_runs(out)
    assert len(parents) == 3, [p.info.run_name for p in parents]  # killed, resumed, all cached
    steps = {r.data.tags["step"]: r.data.tags["cache_hit"] for r in children[parents[1].info.run_id]}
    assert {s: steps.get(s) for s in killed.completed} == {s: "true" for s in killed.completed}
    assert steps[killed.step] == "false"
    # nothing finished before the kill has a second artifact (nothing was recomputed)
    for step in killed.completed:
        assert len(list((out / step).glob("*/manifest.json"))) == 1, step


@pytest.mark.e2e
@pytest.mark.slow
def test_interrupted_training_resumed_from_its_checkpoint(tiny_run):
    out = tiny_run.out
    killed = tiny_run.killed
    client, parents, children = _parent_runs(out)
    run = next(r for r in children[parents[1].info.run_id] if r.data.tags["step"] == killed.step)
    assert run.data.tags.get("resumed_from_checkpoint") == killed.checkpoint, run.data.tags
    # the resumed run logged training steps only after the checkpoint: none was redone before it
    ckpt_step = int(killed.checkpoint.removeprefix("step_"))
    logged = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert logged and min(logged) > ckpt_step, (ckpt_step, logged[:5])
    # the killed invocation's run of the same step had logged up to (at least) the checkpoint
    before = next(r for r in children[parents[0].info.run_id] if r.data.tags.get("step") == killed.step)
    assert max(m.step for m in client.get_metric_history(before.info.run_id, "train/loss")) >= ckpt_step
    assert latest(out, killed.step).metrics.get("steps") == max(logged)  # it trained to the end
    # the next invocation closed what the killed one left RUNNING, the interrupted step's run included
    assert parents[0].info.status == before.info.status == "KILLED", (parents[0].info.status, before.info.status)
    assert "was gone" in before.data.tags["ended_by"]
    assert not [r.info.run_name for r in client.search_runs([parents[0].info.experiment_id],
                                                              "attributes.status = 'RUNNING'")]
    assert "run(s) of a killed invocation KILLED" in tiny_run[1].stdout + tiny_run[1].stderr


@pytest.mark.e2e
@pytest.mark.slow
def test_outputs_of_the_resumed_pipeline_verify(tiny_run):
    from pipelines.artifacts import Artifact, ArtifactStore

    out = tiny_run.out
    store = ArtifactStore(out)
    manifests = list(out.glob("*/*/manifest.json"))
    assert len(manifests) >= 30
    for m in manifests:
        assert store.verify(Artifact.load(m.parent)) == [], m.parent
    # every published step's scratch space (checkpoints) is gone, the killed step's included
    leftover = [p for p in out.glob("*/.work/*") if (out / p.parent.parent.name / p.name / "manifest.json").exists()]
    assert leftover == []


@pytest.mark.e2e
@pytest.mark.slow
def test_pipeline_refuses_a_truncated_cached_artifact_naming_the_file(tiny_run, tmp_path):
    """A copy of the run's first three artifacts with pretrain's weights truncated: the pipeline
    stops at pretrain with the file named, and never trains SFT on them."""
    import shutil

    out = tiny_run.out
    for step in ("data", "tokenizer", "pretrain"):
        shutil.copytree(out / step, tmp_path / step, ignore=shutil.ignore_patterns(".work", ".staging"))
    weights = next(p for p in (tmp_path / "pretrain").glob("*/*.safetensors"))
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 1000)
    res = run_cli(tmp_path, "--until", "sft")
    text = res.stdout + res.stderr
    assert res.returncode != 0
    assert "ArtifactCorrupted" in text and str(weights) in text, text[-3000:]
    assert not list(tmp_path.glob("sft/*/manifest.json"))


TRUNCATED_CLIENT_STATE = r"""
import os, sys, json, socket
from pathlib import Path
import torch.distributed as dist
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
from steps.engine.checkpoint import CheckpointCorrupted, load_checkpoint
ckpt = Path(sys.argv[1]); tag = ckpt / "step_00000004"; tag.mkdir(parents=True)
text = json.dumps({"step": 4, "rng": {}, "files": {"mp_rank_00_model_states.pt": "0" * 64}})
(tag / "client_rank0.json").write_text(text[: len(text) // 2])  # cut short mid-write
try:
    load_checkpoint(None, ckpt, "step_00000004")  # refused before DeepSpeed is touched
except CheckpointCorrupted as e:
    print("REFUSED", e)
"""


def test_truncated_checkpoint_state_file_is_refused_naming_it(tmp_path):
    """The per-rank JSON that holds the step, the RNG state and the shards' checksums: cut short,
    it is reported as a corrupted checkpoint with its path, not as a bare JSON error."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", TRUNCATED_CLIENT_STATE, str(tmp_path / "checkpoints")],
                         cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "REFUSED" in res.stdout and "client_rank0.json" in res.stdout and "Delete" in res.stdout, res.stdout
