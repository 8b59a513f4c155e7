"""Faults the pipeline survives, each caused for real: a training worker SIGKILLed from outside,
the pipeline driver SIGKILLed in the middle of the DAG (the shared end-to-end run, conftest.py),
and artifacts or checkpoints truncated or altered on disk."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from steps.engine import train
from steps.engine.config import OptimConfig, TrainConfig
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
