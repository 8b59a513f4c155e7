"""Checkpoints, initial weights and the final weights of a training, at any scale.

Resumable checkpoints: `<work_dir>/checkpoints/step_<n>/` written by DeepSpeed's
save_checkpoint (each rank its shard: model, optimizer, scheduler), plus per rank a JSON file
with the step (the data position, steps/engine/data.py) and the RNG states. Rank 0 writes
`latest` only after every rank has saved, so a checkpoint named there is complete. Loading
never unpickles code: DeepSpeed's files are read with `torch.load(weights_only=True)` and an
allowlist of the two DeepSpeed state classes they contain; RNG and step are JSON.

Initial weights are read one tensor at a time (model/weights.py) and, under ZeRO-3, copied
by rank 0 into each gathered parameter, so no rank holds the whole state dict. Final weights
are assembled one parameter at a time from the fp32 master copy (an all-gather of its
partitions) and written by rank 0 into safetensors shards: host memory stays at about one
parameter plus one shard, even for 70B.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from model.weights import DEFAULT_SHARD_BYTES, ShardedWriter, WeightsReader, file_sha256

LATEST = "latest"


def rng_state() -> dict:
    """Every RNG the training touches, as JSON-serialisable data."""
    py = random.getstate()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def use_safe_loading(engine) -> None:
    """Make DeepSpeed read its checkpoint files with weights_only=True (it hard-codes False)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            # the only non-tensor classes in ZeRO checkpoints; anything else is refused
            with torch.serialization.safe_globals([ZeroStageEnum, LossScaler]):
                return torch.load(path, map_location=map_location, weights_only=True)

    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        safe = SafeTorchCheckpointEngine.__new__(SafeTorchCheckpointEngine)
        safe.__dict__.update(engine.checkpoint_engine.__dict__)
        engine.checkpoint_engine = safe


def latest_checkpoint(ckpt_dir: Path) -> str | None:
    marker = ckpt_dir / LATEST
    if marker.exists():
        tag = marker.read_text().strip()
        if (ckpt_dir / tag).is_dir():
            return tag
    return None


def save_checkpoint(engine, ckpt_dir: Path, step: int, keep: int = 2) -> str:
    import torch.distributed as dist

    tag = f"step_{step:08d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    dist.barrier()
    rank = dist.get_rank()
    files = {f.name: file_sha256(f) for f in _owned_files(ckpt_dir / tag, rank)}
    (ckpt_dir / tag / f"client_rank{rank}.json").write_text(
        json.dumps({"step": step, "rng": rng_state(), "files": files}))
    dist.barrier()
    if rank == 0:  # publish only a checkpoint every rank has finished
        (ckpt_dir / f".{LATEST}.tmp").write_text(tag)
        os.replace(ckpt_dir / f".{LATEST}.tmp", ckpt_dir / LATEST)
        old = sorted(p for p in ckpt_dir.glob("step_*") if p.name != tag)
        for p in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    return tag


def load_checkpoint(engine, ckpt_dir: Path, tag: str) -> int:
    """Restore model, optimizer, scheduler and this rank's RNG after checking every file this
    rank reads against the checksums recorded at save time; returns the step."""
    import torch.distributed as dist

    rank = dist.get_rank()
    client = _client_state(ckpt_dir, tag, rank)
    expected = dict(client["files"])
    if rank != 0:  # the files no rank owns (rank 0 hashed them) are read by every rank
        shared = _client_state(ckpt_dir, tag, 0)["files"]
        expected.update({k: v for k, v in shared.items() if "zero_pp_rank_" not in k})
    for name, sha in expected.items():
        path = ckpt_dir / tag / name
        if not path.exists() or file_sha256(path) != sha:
            raise CheckpointCorrupted(f"checkpoint file {path} is truncated or altered (its sha256 no longer "
                                      f"matches the one recorded when it was saved); it is not loaded. "
                                      f"Delete {ckpt_dir / tag} to resume from the one before, or "
                                      f"{ckpt_dir} to start over.")
    use_safe_loading(engine)
    engine.load_checkpoint(str(ckpt_dir), tag=tag)
    set_rng_state(client["rng"])
    return int(client["step"])


class CheckpointCorrupted(RuntimeError):
    """A checkpoint file no longer matches the checksum recorded when it was saved."""


def _client_state(ckpt_dir: Path, tag: str, rank: int) -> dict:
    """A rank's step, RNG state and shard checksums. It holds the checksums, so nothing vouches
    for it but its own parse: a truncated or missing one is a corrupted checkpoint, named."""
    path = ckpt_dir / tag / f"client_rank{rank}.json"
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not {"step", "rng", "files"} <= state.keys():
            raise ValueError("missing step, rng or files")
        return state
    except (OSError, ValueError) as e:
        raise CheckpointCorrupted(f"checkpoint file {path} is missing, truncated or altered ({e}); the "
                                  f"checkpoint is not loaded. Delete {ckpt_dir / tag} to resume from the "
                                  f"one before, or {ckpt_dir} to start over.") from e


def _owned_files(tag_dir: Path, rank: int) -> list[Path]:
    """The checkpoint files rank `rank` vouches for: DeepSpeed's per-rank shards
    (`zero_pp_rank_<rank>_...`), and on rank 0 also the files no rank's name is on."""
    mine = f"zero_pp_rank_{rank}_"
    return sorted(f for f in tag_dir.iterdir() if f.is_file() and not f.name.startswith("client_rank") and (
        mine in f.name or (rank == 0 and "zero_pp_rank_" not in f.name)))


def load_initial_weights(module: torch.nn.Module, path: str, zero3: bool) -> None:
    """Copy saved weights into a (possibly ZeRO-3 partitioned) module, one tensor at a time."""
    import torch.distributed as dist

    fresh = set(getattr(module, "fresh_parameters", ()))  # the module's own new parameters, initialised
    with WeightsReader(path) as reader:
        names = [n for n, _ in module.named_parameters()]
        _check_keys([n for n in names if n not in reader and n not in fresh],
                    [k for k in reader.keys() if k not in set(names)], str(reader.location))
        rank = dist.get_rank() if dist.is_initialized() else 0
        for name, p in module.named_parameters():
            if name not in reader:
                continue
            if zero3:
                import deepspeed

                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if rank == 0:
                        p.data.copy_(reader[name].to(p.dtype))
            else:
                with torch.no_grad():
                    p.copy_(reader[name].to(p.dtype))


def _check_keys(missing, unexpected, path) -> None:
    allowed_missing = [m for m in missing if not m.startswith(("score", "value_head"))]
    if allowed_missing or unexpected:
        raise ValueError(f"{path}: saved weights do not match the model (missing {allowed_missing[:5]}, "
                         f"unexpected {list(unexpected)[:5]})")


def export_hook(module: torch.nn.Module):
    """What leaves the engine (the export, the persistent learner's `weights()`) goes through the
    module's `export_tensor(name, fp32 tensor) -> tensor, or None to leave it out`, if it has
    one: the PPO policy folds its learned logit scale into the output norm with it."""
    return getattr(module, "export_tensor", lambda name, t: t)


def export_weights(engine, dest: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path | None:
    """Write the model's fp32 weights into `dest` (model.safetensors, or shards + index) one
    parameter at a time; every rank must call it (the gathers are collective). Returns the
    path on rank 0, None elsewhere."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    rank = dist.get_rank()
    writer = ShardedWriter(dest, max_shard_bytes, dtype=torch.float32) if rank == 0 else None
    zero3 = engine.zero_optimization_stage() == 3
    export = export_hook(engine.module)
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)  # the fp32 master copy (all-gathered under ZeRO-3)
        gather = nullcontext()
        if full is None and zero3:  # a frozen ZeRO-3 parameter has no master copy
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([p])
        with gather:
            if rank == 0 and (t := export(name, full if full is not None else p.data)) is not None:
                writer.add(name, t)
        del full
    path = writer.close() if rank == 0 else None
    dist.barrier()
    return path
