"""Launching a training on Ray Train: `train(objective, ...)` -> TrainResult.

TorchTrainer starts `num_workers` workers (GPUs or CPUs each), each runs
worker.train_loop. FailureConfig restarts a failed group, which resumes from the last
complete checkpoint in work_dir; a later call with the same work_dir (a pipeline re-run
after the whole job died) resumes the same way.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from model.weights import INDEX, SINGLE
from steps.engine.checkpoint import latest_checkpoint
from steps.engine.config import OptimConfig, StepResources, TrainConfig
from steps.engine.objective import Objective
from steps.engine.worker import train_loop

# The file a pipeline step's output goes to, set by the pipeline in the step's process while the step
# runs (pipelines/console.py): the step's Ray Train workers and worker tasks write there too, so
# DeepSpeed's info logs, deprecation warnings and Ray Train's per-report lines stay off the console.
STEP_LOG_ENV = "LLAMA2_STEP_LOG"
PROGRESS_PREFIX = "[progress] "  # a step's progress line (report_progress)


@contextmanager
def output_to(path: str | None) -> Iterator[None]:
    """While inside, this process's stdout and stderr append to `path` at the file-descriptor
    level, so C++ logs (Ray core, gloo) and subprocesses land there too, not only Python's
    prints. Nothing changes when `path` is None (benchmarks, tests, a plain `train()` call)."""
    if not path:
        yield
        return
    before = os.environ.get(STEP_LOG_ENV)
    os.environ[STEP_LOG_ENV] = path  # report_progress writes here; the worker process outlives the step
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # append: ranks share the file
    saved = os.dup(1), os.dup(2)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (*saved, fd):
            os.close(f)
        if before is None:
            os.environ.pop(STEP_LOG_ENV, None)
        else:
            os.environ[STEP_LOG_ENV] = before


def report_progress(done: int, total: int, unit: str) -> None:
    """`[progress] 128/512 answers` in the step's log, which the console's status line reads
    (pipelines/console.py) as it reads Ray Data's bar. Outside a pipeline step (no step log:
    benchmarks, tests, a plain function call) it prints nothing."""
    if os.environ.get(STEP_LOG_ENV):
        sys.stdout.flush()  # at the file-descriptor level, where output_to sends fd 1 to the log
        os.write(1, f"{PROGRESS_PREFIX}{done}/{total} {unit}\n".encode())


def _logged_train_loop(config: dict) -> None:
    """worker.train_loop with its output in the step's log file (when the pipeline gave one)."""
    with output_to(config.get("log_file")):
        train_loop(config)


def _logged_call(log_file: str | None, fn, *args, **kwargs):
    with output_to(log_file):
        return fn(*args, **kwargs)


@dataclass
class TrainResult:
    weights: Path  # fp32 weights: model.safetensors, or the index of its shards (model/weights.py)
    history: list[dict]
    seconds: float
    launch_seconds: float  # from train() to the first logged step

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}

    def epoch_losses(self, epochs: float) -> dict[str, float]:
        """Mean logged training loss of the first and of the last epoch, {} with fewer than two
        epochs. Every example is seen once per epoch, so a last epoch below the first says the
        model fit its data; one logged loss against another is too noisy for that on a short
        run (the tiny preset's rejection sampling: 12 steps). Exact with log_every 1."""
        if epochs < 2 or not self.history:
            return {}
        total = self.history[-1]["step"]
        per_epoch = total / epochs
        first = [r["loss"] for r in self.history if r["step"] <= per_epoch]
        last = [r["loss"] for r in self.history if r["step"] > total - per_epoch]
        if not first or not last:
            return {}
        return {"loss.first_epoch": sum(first) / len(first), "loss.last_epoch": sum(last) / len(last)}


def train(objective: Objective, train_cfg: TrainConfig, optim_cfg: OptimConfig, *, work_dir: Path,
          out_dir: Path, seed: int, tracking_uri: str | None = None, mlflow_run_id: str | None = None,
          ) -> TrainResult:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    start = time.time()
    work_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    resources = {"CPU": train_cfg.cpus_per_worker}
    if train_cfg.use_gpu:
        resources["GPU"] = train_cfg.gpus_per_worker or 1
    env = {"DS_ACCELERATOR": "cuda" if train_cfg.use_gpu else "cpu", "OMP_NUM_THREADS":
           str(max(1, int(train_cfg.cpus_per_worker)))}
    # Ray Train's print patch sends every print to the root logger as well as to stdout: each line of
    # a worker would appear twice in the step's log (steps keep their own output, pipelines/console.py)
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    # DeepSpeed's ZeRO-3 calls two collectives that torch deprecates, and torch warns on every call (two
    # log lines per step per rank; "once" does not hold: any catch_warnings() clears its registry).
    # Not ours to change: ignored by message, set at interpreter start. Other warnings stay in the log.
    env["PYTHONWARNINGS"] = ",".join(f"ignore:`torch.distributed.{name}` is deprecated::"
                                     for name in ("all_gather_into_tensor", "reduce_scatter_tensor"))
    if "LLAMA2_FAIL_AT_STEP" in os.environ:  # planned-crash hook of the resume tests
        env["LLAMA2_FAIL_AT_STEP"] = os.environ["LLAMA2_FAIL_AT_STEP"]
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    if (tag := latest_checkpoint(work_dir / "checkpoints")) is not None:
        # a re-run after the whole job died (a killed driver): say so where a person looks, the
        # console and the step's MLflow run, since the workers' own resume line may be filtered
        print(f"[engine] {objective.name}: resuming from checkpoint {work_dir / 'checkpoints' / tag}", flush=True)
        if tracking_uri and mlflow_run_id:
            from mlflow import MlflowClient

            MlflowClient(tracking_uri).set_tag(mlflow_run_id, "resumed_from_checkpoint", tag)
    trainer = TorchTrainer(
        _logged_train_loop,
        train_loop_config={"objective": objective, "train_cfg": train_cfg, "optim_cfg": optim_cfg,
                           "work_dir": str(work_dir), "out_dir": str(out_dir), "seed": seed,
                           "tracking_uri": tracking_uri, "mlflow_run_id": mlflow_run_id,
                           "log_file": os.environ.get(STEP_LOG_ENV)},
        torch_config=TorchConfig(backend="nccl" if train_cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=train_cfg.num_workers, use_gpu=train_cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=f"{objective.name}", storage_path=str(work_dir / "ray"),
                             failure_config=FailureConfig(max_failures=train_cfg.max_failures),
                             worker_runtime_env={"env_vars": env}),
    )
    trainer.fit()
    history = json.loads((out_dir / "history.json").read_text())
    first_step_at = history[0].get("first_step_at", start) if history else start
    weights = out_dir / SINGLE if (out_dir / SINGLE).exists() else out_dir / INDEX
    return TrainResult(weights, history, time.time() - start, launch_seconds=first_step_at - start)


def run_on_worker(fn, resources: StepResources, *args, **kwargs):
    """fn(*args, **kwargs) as a Ray task with its own resources (a GPU for sampling), so the
    step's node holds none of them while a later training in the same step needs them all."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    memory = int(resources.memory_gb * 2**30) if resources.memory_gb else None
    task = ray.remote(_logged_call).options(name=getattr(fn, "__name__", "run_on_worker"), memory=memory,
                                            num_cpus=resources.num_cpus, num_gpus=resources.num_gpus)
    return ray.get(task.remote(os.environ.get(STEP_LOG_ENV), fn, *args, **kwargs))
