"""The per-worker training loop: DeepSpeed set-up, resume, steps, checkpoints, metrics.

`build_engine` and `train_step` are the inner step, callable without Ray (unit tests, the
GPU benchmark). `train_loop` is what each Ray Train worker runs. Checkpoints, initial and
final weights: steps/engine/checkpoint.py.

Every collective runs on the engine's device (NCCL takes CUDA tensors only), every rank takes
the same number of forward passes (ZeRO-3 gathers parameters collectively in each forward),
and the loss is normalised by the loss units (tokens, pairs) of the whole optimizer step
across micro-batches and ranks (steps/engine/objective.py).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steps.engine.checkpoint import (
    export_weights,
    latest_checkpoint,
    load_checkpoint,
    load_initial_weights,
    save_checkpoint,
    use_safe_loading,
)
from steps.engine.config import OptimConfig, TrainConfig
from steps.engine.data import RowSource
from steps.engine.objective import Objective
from steps.engine.optim import build_optimizer


def deepspeed_config(tcfg: TrainConfig, ocfg: OptimConfig, world: int, accum: int) -> dict[str, Any]:
    bf16 = tcfg.precision == "bf16"
    zero: dict[str, Any] = {"stage": tcfg.zero_stage}
    if tcfg.zero_stage == 3:
        zero.update(overlap_comm=tcfg.use_gpu, contiguous_gradients=True, stage3_gather_16bit_weights_on_model_save=False)
    cfg: dict[str, Any] = {
        "train_batch_size": tcfg.micro_batch_size * world * accum,
        "train_micro_batch_size_per_gpu": tcfg.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": ocfg.grad_clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16 and tcfg.grad_reduce_dtype == "fp32":  # reduce and accumulate gradients in fp32
        cfg["communication_data_type"] = "fp32"
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if tcfg.offload_optimizer:
        # pinned host memory only where there is a device to copy from
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": tcfg.use_gpu}
        cfg["zero_force_ds_cpu_optimizer"] = False  # torch AdamW steps the host copy (no C++ build)
    return cfg


def setup_accelerator(use_gpu: bool) -> None:
    if not use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # must precede `import deepspeed`
    os.environ.setdefault("DS_BUILD_OPS", "0")


def build_engine(obj: Objective, tcfg: TrainConfig, ocfg: OptimConfig, total_steps: int, world: int, accum: int):
    """Model under zero.Init, optional initial weights, optimizer, schedule -> DeepSpeed engine."""
    import deepspeed

    ds_cfg = deepspeed_config(tcfg, ocfg, world, accum)
    with deepspeed.zero.Init(config_dict_or_path=ds_cfg, enabled=tcfg.zero_stage == 3):
        module = obj.build_module()
    if hasattr(module, "checkpoint_layers"):
        module.checkpoint_layers = tcfg.activation_checkpointing
    if obj.init_weights:
        load_initial_weights(module, obj.init_weights, zero3=tcfg.zero_stage == 3)
    fused = tcfg.use_gpu and not tcfg.offload_optimizer  # the fused kernel needs the states on the GPU
    optimizer, scheduler = build_optimizer(module, ocfg, total_steps, fused=fused)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    use_safe_loading(engine)
    return engine


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum of each value over ranks, through a tensor on `device` (the engine's: NCCL on GPU)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def train_step(engine, micro_batches: list[dict], obj: Objective) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches (accumulated inside DeepSpeed).

    Returns SUMS over this rank's micro-batches: `loss_sum`, `weight` (loss units), `tokens`
    (input tokens processed) and the objective's metrics; the caller reduces them over ranks.
    """
    import torch.distributed as dist

    batches = [{k: v.to(engine.device) for k, v in obj.collate(rows).items()} for rows in micro_batches]
    weights = [obj.weight(b) for b in batches]
    total_weight = all_reduce_sum([sum(weights)], engine.device)[0]
    world = dist.get_world_size() if dist.is_initialized() else 1
    # DeepSpeed averages gradients over ranks and divides the loss by the accumulation steps:
    # this scale turns that average of micro-batch losses into sum(loss) / sum(weight).
    scale = world * len(batches) / max(total_weight, 1.0)
    sums: dict[str, float] = {"loss_sum": 0.0, "weight": float(sum(weights)), "tokens": 0.0}
    for batch in batches:
        loss_sum, extra = obj.loss(engine.module, batch)
        engine.backward(loss_sum * scale)
        engine.step()
        sums["loss_sum"] += float(loss_sum.detach())
        sums["tokens"] += float(batch["inputs"].numel()) if "inputs" in batch else obj.tokens_per_row * len(
            next(iter(batch.values())))
        for k, v in extra.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return sums


def reduce_metrics(sums: dict[str, float], obj: Objective, device, prefix: str = "") -> dict[str, float]:
    """Sums over ranks -> the logged means: loss per unit, mean metrics per unit, other sums."""
    keys = sorted(sums)
    total = dict(zip(keys, all_reduce_sum([sums[k] for k in keys], device)))
    weight = max(total.pop("weight", 0.0), 1.0)
    out = {f"{prefix}loss": total.pop("loss_sum") / weight}
    for k, v in total.items():
        out[prefix + k] = v / weight if k in obj.mean_metrics else v
    return out


def evaluate(engine, obj: Objective, tcfg: TrainConfig, rank: int, world: int) -> dict[str, float]:
    """Loss (and mean metrics) per unit over up to `eval_max_rows` rows of the eval files; every
    rank runs the same number of forward passes, padding ones weighing nothing."""
    src = RowSource(obj.eval_files, obj.columns, 0, tcfg.micro_batch_size * world, tcfg.micro_batch_size, world)
    engine.module.eval()
    sums: dict[str, float] = {"loss_sum": 0.0, "weight": 0.0}
    with torch.no_grad():
        for rows, real in src.eval_batches(rank, tcfg.eval_max_rows):
            batch = {k: v.to(engine.device) for k, v in obj.collate(rows).items()}
            loss_sum, extra = obj.loss(engine.module, batch)
            keep = 1.0 if real else 0.0  # padding counts as zero, but every rank has the same keys
            sums["loss_sum"] += keep * float(loss_sum)
            sums["weight"] += keep * obj.weight(batch)
            for k, v in extra.items():
                sums[k] = sums.get(k, 0.0) + keep * float(v)
    engine.module.train()
    out = reduce_metrics(sums, obj, engine.device, prefix="eval_")
    return {k: v for k, v in out.items() if k == "eval_loss" or k.removeprefix("eval_") in obj.mean_metrics}


def check_eval_set(obj: Objective, tcfg: TrainConfig) -> None:
    """An evaluation with nothing to evaluate is a configuration error, before any training."""
    if not obj.eval_files:
        return
    src = RowSource(obj.eval_files, obj.columns, 0, tcfg.micro_batch_size, tcfg.micro_batch_size, 1)
    units = sum(obj.weight(obj.collate(rows)) for rows, real in src.eval_batches(0, tcfg.eval_max_rows) if real)
    if units == 0:
        raise ValueError(f"{obj.name}: the evaluation files {obj.eval_files} hold no loss units (empty or "
                         f"fully masked): fix the evaluation set or pass none")


def train_loop(config: dict) -> None:
    """Runs in every Ray Train worker (also usable with plain torch.distributed)."""
    obj: Objective = config["objective"]
    tcfg: TrainConfig = config["train_cfg"]
    ocfg: OptimConfig = config["optim_cfg"]
    work_dir, out_dir = Path(config["work_dir"]), Path(config["out_dir"])
    setup_accelerator(tcfg.use_gpu)
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="nccl" if tcfg.use_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    seed = config["seed"]
    torch.manual_seed(seed)  # same initial weights on every rank
    check_eval_set(obj, tcfg)
    data = RowSource(obj.train_files, obj.columns, seed, tcfg.global_batch_size, tcfg.micro_batch_size, world,
                     window_rows=tcfg.shuffle_window_rows)
    total = tcfg.max_steps or max(1, int(tcfg.epochs * data.steps_per_epoch))
    engine = build_engine(obj, tcfg, ocfg, total, world, data.accum)

    ckpt_dir = work_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    start = 0
    history: list[dict] = []
    if (tag := latest_checkpoint(ckpt_dir)) is not None:
        start = load_checkpoint(engine, ckpt_dir, tag)
        if (work_dir / "history.json").exists():
            history = [h for h in json.loads((work_dir / "history.json").read_text()) if h["step"] <= start]
        if rank == 0:
            print(f"[engine] resumed {obj.name} from {tag} (step {start} of {total})", flush=True)

    logger = MetricLogger(config.get("tracking_uri"), config.get("mlflow_run_id"), rank)
    logger.log({"total_steps": total}, start)  # the length of the run, for progress displays
    fail_at = int(os.environ.get("LLAMA2_FAIL_AT_STEP", "0"))
    tick, window = time.time(), {}
    first_step_at = tick  # launch overhead = this minus the time train() was called
    at_start = {}
    if obj.eval_files and obj.eval_at_start and start == 0:
        at_start = {f"{k}_at_start": v for k, v in evaluate(engine, obj, tcfg, rank, world).items()}
    for step in range(start, total):
        if fail_at and step == fail_at and rank == 0 and not (work_dir / "failed_once").exists():
            (work_dir / "failed_once").write_text(str(step))  # a planned crash, once (tests)
            os._exit(1)
        for k, v in train_step(engine, data.micro_batches(step, rank), obj).items():
            window[k] = window.get(k, 0.0) + v
        done = step + 1
        if done % tcfg.log_every == 0 or done == total:
            elapsed = max(time.time() - tick, 1e-9)
            units = all_reduce_sum([window["weight"]], engine.device)[0]
            row = {"step": done, "first_step_at": first_step_at, **at_start, **reduce_metrics(window, obj, engine.device)}
            at_start = {}  # the first logged row carries it
            row.update(lr=engine.get_lr()[0], grad_norm=float(engine.get_global_grad_norm() or 0.0),
                       tokens_per_s=row.pop("tokens") / elapsed, loss_units_per_s=units / elapsed)
            if obj.flops_per_token:
                from model.flops import mfu

                if (value := mfu(row["tokens_per_s"] / world, obj.flops_per_token, tcfg.use_gpu)) is not None:
                    row["mfu"] = value
            row["memory_gb"] = memory_gb(tcfg.use_gpu)
            if obj.eval_files and (done % tcfg.eval_every == 0 or done == total):
                row.update(evaluate(engine, obj, tcfg, rank, world))
            history.append(row)
            logger.log(row, done)
            _report(row)
            tick, window = time.time(), {}
        if done % tcfg.checkpoint_every == 0 and done < total:
            save_checkpoint(engine, ckpt_dir, done)
            if rank == 0:
                (work_dir / "history.json").write_text(json.dumps(history))

    logger.close()
    export_weights(engine, out_dir)  # fp32 weights, one parameter at a time, from every rank
    if rank == 0:
        (out_dir / "history.json").write_text(json.dumps(history))
    dist.barrier()


def memory_gb(use_gpu: bool) -> float:
    if use_gpu and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def _report(row: dict) -> None:
    try:
        import ray.train

        ray.train.report({k: v for k, v in row.items() if isinstance(v, (int, float))})
    except (ImportError, RuntimeError):  # not inside Ray Train (benchmarks, plain torchrun)
        pass


class MetricLogger:
    """Rank 0 logs to the step's MLflow run (Train V2 has no logger callbacks, STACK.md); the
    first worker on each node also samples the node's CPU, memory, disk, network and (with
    nvidia-ml-py, requirements-gpu.txt) GPU utilisation and memory into the same run as MLflow
    system metrics (`system/...`, `system/node_<k>/...` when the workers span several nodes)."""

    SAMPLE_SECONDS = 5.0  # MLflow's default is 10 s; a tiny preset's training lasts tens of seconds

    def __init__(self, uri: str | None, run_id: str | None, rank: int, system_metrics: bool = True):
        self.client, self.monitor = None, None
        if not (uri and run_id):
            return
        if rank == 0:
            from mlflow import MlflowClient

            self.client, self.run_id = MlflowClient(uri), run_id
        local_rank, node_rank, nodes = node_position()
        if system_metrics and local_rank == 0:
            import logging

            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop chatter
            # resume_logging: a restarted or resumed worker continues the run's system-metric steps
            self.monitor = SystemMetricsMonitor(run_id, sampling_interval=self.SAMPLE_SECONDS, resume_logging=True,
                                                node_id=f"node_{node_rank}" if nodes > 1 else None,
                                                tracking_uri=uri)
            self.monitor.start()

    def log(self, row: dict, step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"train/{k}", float(v), now, step) for k, v in row.items()
                   if k not in ("step", "first_step_at") and isinstance(v, (int, float)) and np.isfinite(v)]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        """Stop sampling and log the samples since the last interval (a training shorter than
        one interval still gets its system metrics)."""
        if self.monitor is None:
            return
        monitor, self.monitor = self.monitor, None
        monitor.finish()
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()


def node_position() -> tuple[int, int, int]:
    """(local rank, node rank, number of nodes) of this worker: from Ray Train's context, else
    torchrun's environment, else a single process."""
    try:
        import ray.train

        ctx = ray.train.get_context()
        local_world = max(ctx.get_local_world_size(), 1)
        return ctx.get_local_rank(), ctx.get_node_rank(), max(ctx.get_world_size() // local_world, 1)
    except Exception:  # not inside Ray Train (benchmarks, plain torchrun, unit tests)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return (int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("GROUP_RANK", "0")),
                max(world // max(local_world, 1), 1))
