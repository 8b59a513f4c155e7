"""The persistent learner: the shared engine kept alive across updates (PPO's policy and critic).

`train()` (launch.py) is the engine used once: Ray Train starts workers, they train on Parquet
files and exit. PPO instead alternates rollouts and updates hundreds of times, and relaunching
the workers and DeepSpeed for every update would cost more than the update. A `LearnerGroup`
is one Ray actor per rank, joined by torch.distributed (gloo on CPU, NCCL on GPU, rank 0's
address and a free port as MASTER_ADDR/PORT), that builds the DeepSpeed engine ONCE with
worker.build_engine and then takes batches:

    step(rows)      one optimizer step on a mini-batch of rows: worker.train_step with the
                    Objective's collate, loss and weight, so the loss is normalised exactly as
                    in every other training (sum of unit losses / units of the whole step)
    infer(fn, rows) fn(module, batch) under no_grad on every rank's share (log-probs, values)
    weights()       the full fp32 weights, gathered one parameter at a time, as a Ray object
                    (numpy arrays in the object store: on one node the sampler maps them without
                    a copy through the filesystem)
    save/load       steps/engine/checkpoint.py (model, optimizer, schedule, RNG; checksummed)
    export(dest)    the final weights as safetensors (checkpoint.export_weights)

Rows are dicts of numpy columns with the same first dimension. Rank r takes micro-batches
m * world + r of a mini-batch (as steps/engine/data.py does for files), and every rank runs the
same number of forward passes (ZeRO-3 gathers parameters collectively in each one).
Limit, stated: `weights()` assembles the whole model on rank 0's host; fine for one node and
the sizes a TorchSampler serves, but a 70B policy feeding vLLM would broadcast shard by shard
over NCCL instead (not built).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steps.engine.config import OptimConfig, TrainConfig
from steps.engine.objective import Objective


def split_rows(rows: dict[str, np.ndarray], pieces: int) -> list[dict[str, np.ndarray]]:
    """`pieces` equal consecutive slices of a dict of columns (its length must divide)."""
    n = len(next(iter(rows.values())))
    if n % pieces:
        raise ValueError(f"{n} rows do not split into {pieces} equal micro-batches")
    size = n // pieces
    return [{k: v[i * size:(i + 1) * size] for k, v in rows.items()} for i in range(pieces)]


class LearnerWorker:
    """One rank (a Ray actor, see LearnerGroup). Also usable directly in one process."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def address(self) -> tuple[str, int]:
        """This node's address and a free port: rank 0's become every rank's MASTER_ADDR/PORT."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, master: tuple[str, int], obj: Objective, tcfg: TrainConfig, ocfg: OptimConfig, total_steps: int,
              accum: int, seed: int) -> None:
        from steps.engine.worker import build_engine, setup_accelerator

        os.environ.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world), LOCAL_RANK="0" if tcfg.use_gpu else str(self.rank))
        setup_accelerator(tcfg.use_gpu)
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if tcfg.use_gpu else "gloo")
        torch.manual_seed(seed)  # same initial weights on every rank
        self.obj, self.tcfg = obj, tcfg
        self.engine = build_engine(obj, tcfg, ocfg, total_steps, self.world, accum)

    def step(self, micro_batches: list[dict]) -> dict[str, float]:
        from steps.engine.worker import reduce_metrics, train_step

        sums = train_step(self.engine, micro_batches, self.obj)
        out = reduce_metrics(sums, self.obj, self.engine.device)
        out.update(lr=self.engine.get_lr()[0], grad_norm=float(self.engine.get_global_grad_norm() or 0.0))
        return out

    def infer(self, fn: Callable, micro_batches: list[dict]) -> list[np.ndarray]:
        self.engine.module.eval()
        out = []
        with torch.no_grad():
            for rows in micro_batches:
                batch = {k: v.to(self.engine.device) for k, v in self.obj.collate(rows).items()}
                out.append(fn(self.engine.module, batch).float().cpu().numpy())
        self.engine.module.train()
        return out

    def weights(self) -> dict[str, np.ndarray] | None:
        """Full fp32 weights on rank 0 (None elsewhere); every rank must call it (collective)."""
        from deepspeed.utils import safe_get_full_fp32_param

        from steps.engine.checkpoint import export_hook

        out = {}
        export = export_hook(self.engine.module)  # what the export writes, e.g. a folded logit scale
        for name, p in self.engine.module.named_parameters():
            full = safe_get_full_fp32_param(p)  # the fp32 master copy, all-gathered under ZeRO-3
            if self.rank == 0 and (t := export(name, full.detach().float())) is not None:
                out[name] = t.cpu().numpy().copy()
            del full
        return out if self.rank == 0 else None

    def save(self, ckpt_dir: str, step: int) -> str:
        from steps.engine.checkpoint import save_checkpoint

        Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
        return save_checkpoint(self.engine, Path(ckpt_dir), step)

    def load(self, ckpt_dir: str) -> int | None:
        """Restore the newest complete checkpoint in ckpt_dir; its step, or None if there is none."""
        from steps.engine.checkpoint import latest_checkpoint, load_checkpoint

        tag = latest_checkpoint(Path(ckpt_dir))
        return None if tag is None else load_checkpoint(self.engine, Path(ckpt_dir), tag)

    def export(self, dest: str) -> str | None:
        from steps.engine.checkpoint import export_weights

        path = export_weights(self.engine, Path(dest))
        return str(path) if path is not None else None


class LearnerGroup:
    """`tcfg.num_workers` LearnerWorker actors with `tcfg`'s resources, one engine among them.

    `mini_batch_rows` rows make one optimizer step; each rank accumulates
    mini_batch_rows / (micro_batch_size * world) micro-batches inside DeepSpeed."""

    def __init__(self, obj: Objective, tcfg: TrainConfig, ocfg: OptimConfig, *, mini_batch_rows: int,
                 total_steps: int, seed: int, name: str = "learner"):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.world, self.micro = tcfg.num_workers, tcfg.micro_batch_size
        if mini_batch_rows % (self.micro * self.world):
            raise ValueError(f"{name}: a mini-batch of {mini_batch_rows} rows is not a multiple of "
                             f"micro_batch_size {self.micro} x workers {self.world}")
        self.accum = mini_batch_rows // (self.micro * self.world)
        bundle = {"CPU": tcfg.cpus_per_worker, **({"GPU": tcfg.gpus_per_worker or 1} if tcfg.use_gpu else {})}
        # PACK: ranks on as few nodes as possible (collectives within a node are cheapest)
        self.pg = placement_group([bundle] * self.world, strategy="PACK", name=f"{name}-{os.getpid()}")
        ray.get(self.pg.ready())
        env = {"DS_ACCELERATOR": "cuda" if tcfg.use_gpu else "cpu",
               "OMP_NUM_THREADS": str(max(1, int(tcfg.cpus_per_worker)))}
        actor = ray.remote(LearnerWorker)
        self.workers = [actor.options(
            num_cpus=tcfg.cpus_per_worker, num_gpus=bundle.get("GPU", 0), name=None,
            runtime_env={"env_vars": env},
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
        ).remote(r, self.world) for r in range(self.world)]
        master = ray.get(self.workers[0].address.remote())
        self._setup = [w.setup.remote(master, obj, tcfg, ocfg, total_steps, self.accum, seed) for w in self.workers]

    def ready(self) -> None:
        """Wait for every rank's engine (construction returns at once, so several groups and
        other actors start at the same time)."""
        import ray

        ray.get(self._setup)

    def _shards(self, rows: dict[str, np.ndarray], pieces: int) -> list[list[dict]]:
        """Micro-batch m * world + r goes to rank r."""
        micro = split_rows(rows, pieces)
        return [micro[r::self.world] for r in range(self.world)]

    def step_async(self, rows: dict[str, np.ndarray]) -> list:
        """Start one optimizer step on a mini-batch (see `step`); returns the ranks' refs."""
        shards = self._shards(rows, self.accum * self.world)
        return [w.step.remote(s) for w, s in zip(self.workers, shards)]

    def step(self, rows: dict[str, np.ndarray]) -> dict[str, float]:
        """One optimizer step on one mini-batch; the metrics reduced over ranks."""
        import ray

        return ray.get(self.step_async(rows))[0]

    def infer_async(self, fn: Callable, rows: dict[str, np.ndarray]) -> Callable[[], np.ndarray]:
        """fn(module, batch) over all rows; returns a function that waits and concatenates."""
        import ray

        n = len(next(iter(rows.values())))
        chunks = -(-n // self.micro)
        padded = -(-chunks // self.world) * self.world  # equal forward passes on every rank
        idx = np.concatenate([np.arange(n), np.zeros(padded * self.micro - n, dtype=np.int64)])
        shards = self._shards({k: v[idx] for k, v in rows.items()}, padded)
        refs = [w.infer.remote(fn, s) for w, s in zip(self.workers, shards)]

        def result() -> np.ndarray:
            per_rank = ray.get(refs)
            ordered = [per_rank[c % self.world][c // self.world] for c in range(padded)]
            return np.concatenate(ordered)[:n]

        return result

    def infer(self, fn: Callable, rows: dict[str, np.ndarray]) -> np.ndarray:
        return self.infer_async(fn, rows)()

    def weights(self) -> Any:
        """An ObjectRef to the full weights ({name: fp32 numpy}); hand it to another actor as is."""
        import ray

        refs = [w.weights.remote() for w in self.workers]
        ray.get(refs[1:])  # the other ranks' part of the collective gathers
        return refs[0]

    def save(self, ckpt_dir: Path, step: int) -> None:
        import ray

        ray.get([w.save.remote(str(ckpt_dir), step) for w in self.workers])

    def load(self, ckpt_dir: Path) -> int | None:
        import ray

        return ray.get([w.load.remote(str(ckpt_dir)) for w in self.workers])[0]

    def export(self, dest: Path) -> Path:
        import ray

        return Path(ray.get([w.export.remote(str(dest)) for w in self.workers])[0])

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for w in self.workers:
            ray.kill(w)
        remove_placement_group(self.pg)
