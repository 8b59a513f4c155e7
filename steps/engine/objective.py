"""What differs between pretraining, SFT, rejection-sampling FT, reward models and PPO's
learner: the module, how a micro-batch is built from Parquet rows, and the loss. The engine
owns everything else. Objectives are picklable (they travel to Ray Train workers)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from model.config import ModelConfig

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class Objective:
    name: str
    build_module: Callable[[], torch.nn.Module]  # called under deepspeed.zero.Init on ZeRO-3
    loss: LossFn  # (module, batch) -> (scalar loss, metrics)
    train_files: list[str]  # Parquet files of training rows
    columns: list[str]  # row columns the collate function needs
    collate: Callable[[dict[str, Any]], dict[str, torch.Tensor]]  # numpy columns -> tensors
    eval_files: list[str] = field(default_factory=list)
    init_weights: str | None = None  # safetensors state dict to start from
    tokens_per_row: int = 0  # for tokens/s (0: count from batches)
    flops_per_token: float = 0.0  # for MFU
    model_cfg: ModelConfig | None = None


def collate_lm(rows: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Packed pretraining rows (`tokens`: seq_len + 1 ids) -> inputs and shifted targets."""
    import numpy as np

    tokens = torch.from_numpy(np.stack(rows["tokens"]).astype(np.int64))
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def lm_objective_loss(module: torch.nn.Module, batch: dict[str, torch.Tensor]):
    from model.llama import lm_loss

    kw = {k: batch[k] for k in ("positions", "segment_ids") if k in batch}
    loss, n = lm_loss(module, batch["inputs"], batch["targets"], **kw)
    return loss, {"tokens": float(n)}
