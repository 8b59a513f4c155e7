"""What differs between pretraining, SFT, rejection-sampling FT, reward models and PPO's
learner: the module, how a micro-batch is built from Parquet rows, and the loss. The engine
owns everything else. Objectives are picklable (they travel to Ray Train workers).

Loss accounting: `loss` returns the SUM of per-unit losses over its micro-batch (a unit is a
loss token for language models, a pair for reward models) and `weight` counts the units. The
engine divides by the total weight of the optimizer step across micro-batches and ranks, so a
micro-batch with few answer tokens weighs what its tokens weigh, not as much as a full one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from model.config import ModelConfig

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


def count_targets(batch: dict[str, torch.Tensor]) -> float:
    """Loss units of a language-model micro-batch: the targets that are not ignored (-100)."""
    return float((batch["targets"] != -100).sum())


@dataclass
class Objective:
    name: str
    build_module: Callable[[], torch.nn.Module]  # called under deepspeed.zero.Init on ZeRO-3
    loss: LossFn  # (module, batch) -> (sum of unit losses, metrics summed the same way)
    train_files: list[str]  # Parquet files of training rows
    columns: list[str]  # row columns the collate function needs
    collate: Callable[[dict[str, Any]], dict[str, torch.Tensor]]  # numpy columns -> tensors
    weight: Callable[[dict[str, torch.Tensor]], float] = count_targets  # loss units in a micro-batch
    mean_metrics: tuple[str, ...] = ()  # metric sums the engine divides by the total weight
    eval_files: list[str] = field(default_factory=list)
    # also evaluate once before the first step of a fresh run (`eval_loss_at_start` in the first
    # logged row): with the training rows as eval files, the two ends of a fit on the same data
    eval_at_start: bool = False
    init_weights: str | None = None  # saved weights to start from (model/weights.py path)
    tokens_per_row: int = 0  # for tokens/s when batches carry no `inputs` (0: count from batches)
    flops_per_token: float = 0.0  # for MFU
    model_cfg: ModelConfig | None = None


def collate_lm(rows: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Packed pretraining rows (`tokens`: seq_len + 1 ids) -> inputs and shifted targets."""
    import numpy as np

    tokens = torch.from_numpy(np.stack(rows["tokens"]).astype(np.int64))
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def lm_objective_loss(module: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """Sum of next-token losses over the targets that are not -100 (the engine normalises)."""
    kw = {k: batch[k] for k in ("positions", "segment_ids") if k in batch}
    loss_sum, _ = module(batch["inputs"], targets=batch["targets"], **kw)
    return loss_sum, {}
