"""The per-worker training loop: DeepSpeed set-up, resume, steps, checkpoints, metrics.

`build_engine` and `train_step` are the inner step, callable without Ray (unit tests, the
GPU benchmark). `train_loop` is what each Ray Train worker runs.

Checkpoints: `<work_dir>/checkpoints/step_<n>/` written by DeepSpeed's save_checkpoint
(each rank its shard; model, optimizer, scheduler) with the step, and so the data position,
in client_state. Rank 0 writes `latest` only after every rank has saved, so a checkpoint
named there is complete. A restarted worker group (Ray Train FailureConfig) and a new
pipeline run (same fingerprint, same work_dir) both resume from it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steps.engine.config import OptimConfig, TrainConfig
from steps.engine.data import RowSource
from steps.engine.objective import Objective
from steps.engine.optim import build_optimizer

LATEST = "latest"


def deepspeed_config(tcfg: TrainConfig, ocfg: OptimConfig, world: int, accum: int) -> dict[str, Any]:
    bf16 = tcfg.precision == "bf16"
    zero: dict[str, Any] = {"stage": tcfg.zero_stage}
    if tcfg.zero_stage == 3:
        zero.update(overlap_comm=tcfg.use_gpu, contiguous_gradients=True, stage3_gather_16bit_weights_on_model_save=False)
    if tcfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
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
        load_full_state_dict(module, obj.init_weights, zero3=tcfg.zero_stage == 3)
    optimizer, scheduler = build_optimizer(module, ocfg, total_steps, fused=tcfg.use_gpu)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    return engine


def load_full_state_dict(module: torch.nn.Module, path: str, zero3: bool) -> None:
    """Load a safetensors state dict (never a pickle) into a possibly ZeRO-3-partitioned module."""
    from safetensors.torch import load_file

    state = load_file(path)
    if not zero3:
        missing, unexpected = module.load_state_dict(state, strict=False)
        _check_keys(missing, unexpected, path)
        return
    import deepspeed

    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if torch.distributed.get_rank() == 0 and name in state:
                p.data.copy_(state[name].to(p.dtype))
    _check_keys([n for n, _ in module.named_parameters() if n not in state], [], path)


def _check_keys(missing, unexpected, path) -> None:
    allowed_missing = [m for m in missing if not m.startswith(("score", "value_head"))]
    if allowed_missing or unexpected:
        raise ValueError(f"{path}: state dict does not match the model (missing {allowed_missing[:5]}, "
                         f"unexpected {list(unexpected)[:5]})")


def train_step(engine, micro_batches: list[dict], obj: Objective) -> dict[str, float]:
    """One optimizer step over the given micro-batches (gradient accumulation inside DeepSpeed)."""
    total, metrics = 0.0, {}
    for rows in micro_batches:
        batch = {k: v.to(engine.device) for k, v in obj.collate(rows).items()}
        loss, extra = obj.loss(engine.module, batch)
        engine.backward(loss)
        engine.step()
        total += float(loss.detach())
        for k, v in extra.items():
            metrics[k] = metrics.get(k, 0.0) + v
    metrics["loss"] = total / len(micro_batches)
    return metrics


def latest_checkpoint(ckpt_dir: Path) -> str | None:
    marker = ckpt_dir / LATEST
    if marker.exists():
        tag = marker.read_text().strip()
        if (ckpt_dir / tag).is_dir():
            return tag
    return None


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(engine, ckpt_dir: Path, step: int, keep: int = 2) -> str:
    import torch.distributed as dist

    tag = f"step_{step:08d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step, "rng": _rng_state()},
                           save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:  # publish only a checkpoint every rank has finished
        (ckpt_dir / f".{LATEST}.tmp").write_text(tag)
        os.replace(ckpt_dir / f".{LATEST}.tmp", ckpt_dir / LATEST)
        old = sorted(p for p in ckpt_dir.glob("step_*") if p.name != tag)
        for p in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    return tag


def _all_mean(value: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def evaluate(engine, obj: Objective, tcfg: TrainConfig, rank: int, world: int, max_rows: int = 2048) -> float:
    """Mean loss over (up to max_rows of) the eval files, averaged over ranks."""
    if not obj.eval_files:
        return float("nan")
    src = RowSource(obj.eval_files, obj.columns, 0, tcfg.micro_batch_size * world, tcfg.micro_batch_size, world)
    engine.module.eval()
    losses = []
    with torch.no_grad():
        for rows in src.eval_batches(rank, max_rows):
            batch = {k: v.to(engine.device) for k, v in obj.collate(rows).items()}
            losses.append(float(obj.loss(engine.module, batch)[0]))
    engine.module.train()
    return _all_mean(sum(losses) / max(len(losses), 1))


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
    data = RowSource(obj.train_files, obj.columns, seed, tcfg.global_batch_size, tcfg.micro_batch_size, world)
    total = tcfg.max_steps or max(1, int(tcfg.epochs * data.steps_per_epoch))
    engine = build_engine(obj, tcfg, ocfg, total, world, data.accum)

    ckpt_dir = work_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    start = 0
    history: list[dict] = []
    if (tag := latest_checkpoint(ckpt_dir)) is not None:
        _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        start = client["step"]
        _set_rng(client["rng"])
        if (work_dir / "history.json").exists():
            history = [h for h in json.loads((work_dir / "history.json").read_text()) if h["step"] <= start]
        if rank == 0:
            print(f"[engine] resumed {obj.name} from {tag} (step {start} of {total})", flush=True)

    logger = MetricLogger(config.get("tracking_uri"), config.get("mlflow_run_id"), rank)
    fail_at = int(os.environ.get("LLAMA2_FAIL_AT_STEP", "0"))
    tick, tokens = time.time(), 0.0
    first_step_at = tick  # launch overhead = this minus the time train() was called
    for step in range(start, total):
        if fail_at and step == fail_at and rank == 0 and not (work_dir / "failed_once").exists():
            (work_dir / "failed_once").write_text(str(step))  # a planned crash, once (tests)
            os._exit(1)
        metrics = train_step(engine, data.micro_batches(step, rank), obj)
        tokens += metrics.pop("tokens", 0.0) or obj.tokens_per_row * tcfg.micro_batch_size * data.accum
        done = step + 1
        if done % tcfg.log_every == 0 or done == total:
            elapsed = time.time() - tick
            row = {"step": done, "first_step_at": first_step_at, "loss": _all_mean(metrics["loss"]),
                   "lr": engine.get_lr()[0],
                   "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                   "tokens_per_s": _all_mean(tokens / max(elapsed, 1e-9)) * world}
            row.update({k: _all_mean(v) for k, v in metrics.items() if k != "loss"})
            if obj.flops_per_token:
                from model.flops import mfu

                row["mfu"] = mfu(row["tokens_per_s"] / world, obj.flops_per_token, tcfg.use_gpu)
            row["memory_gb"] = memory_gb(tcfg.use_gpu)
            if done % tcfg.eval_every == 0 or done == total:
                row["eval_loss"] = evaluate(engine, obj, tcfg, rank, world)
            history.append(row)
            logger.log(row, done)
            _report(row)
            tick, tokens = time.time(), 0.0
        if done % tcfg.checkpoint_every == 0 and done < total:
            save_checkpoint(engine, ckpt_dir, done)
            if rank == 0:
                (work_dir / "history.json").write_text(json.dumps(history))

    # final: consolidate the ZeRO shards into one fp32 state dict, saved with safetensors
    final = save_checkpoint(engine, ckpt_dir, total)
    if rank == 0:
        export_consolidated(ckpt_dir, final, out_dir / "model.safetensors")
        (out_dir / "history.json").write_text(json.dumps(history))
    dist.barrier()


def export_consolidated(ckpt_dir: Path, tag: str, dest: Path) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dest))


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
    """Rank 0 logs to the step's MLflow run (Train V2 has no logger callbacks, STACK.md)."""

    def __init__(self, uri: str | None, run_id: str | None, rank: int):
        self.client = None
        if uri and run_id and rank == 0:
            from mlflow import MlflowClient

            self.client, self.run_id = MlflowClient(uri), run_id

    def log(self, row: dict, step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"train/{k}", float(v), now, step) for k, v in row.items()
                   if k not in ("step", "first_step_at") and isinstance(v, (int, float)) and np.isfinite(v)]
        self.client.log_batch(self.run_id, metrics=metrics)
