"""AdamW parameter groups and the learning-rate schedule (RECIPE.md sections 4, 5, 7, 8).

Cosine: linear warm-up to the peak, then cosine decay to `min_lr_ratio` of the peak at the
last step (pretraining: 2000 warm-up steps, 10% floor). Constant: warm-up then flat (PPO).
Norm gains and biases take no weight decay (standard for LLaMA-style training). `lr_scale`
gives the parameters a pattern names their own peak LR; the schedule multiplies every group's.
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase

import torch

from steps.engine.config import OptimConfig


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    if cfg.warmup_fraction is not None:  # reward models: 3% of total, at least 5
        return max(cfg.min_warmup_steps, int(round(cfg.warmup_fraction * total_steps)))
    return cfg.warmup_steps


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based)."""
    warm = warmup_steps(cfg, total_steps)
    if warm and step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warm) / max(1, total_steps - warm - 1))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(module: torch.nn.Module, weight_decay: float, lr: float,
                 lr_scale: dict[str, float] | None = None) -> list[dict]:
    """Decay (matrices) and no-decay (gains, biases) groups, split again by `lr_scale` pattern."""
    lr_scale = lr_scale or {}
    groups: dict[tuple[bool, float], list] = {}
    used = set()
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 partitions keep the full shape here
        scale = 1.0
        for pattern, s in lr_scale.items():
            if fnmatchcase(name, pattern):
                scale = s
                used.add(pattern)
                break
        groups.setdefault((len(shape) >= 2, scale), []).append(p)
    if unused := sorted(set(lr_scale) - used):
        names = [n for n, _ in module.named_parameters()]
        raise ValueError(f"optim.lr_scale: {unused} match no parameter of the model, or only parameters an "
                         f"earlier pattern already took (names like {names[:3]} ... {names[-2:]})")
    # the unscaled groups first, decay then no decay, as without lr_scale: checkpoints keep
    # loading, and the logged `lr` (group 0's) is the configured one
    order = sorted(groups, key=lambda k: (k[1] != 1.0, k[1], not k[0]))
    return [{"params": groups[k], "weight_decay": weight_decay if k[0] else 0.0, "lr": lr * k[1]} for k in order]


def build_optimizer(module: torch.nn.Module, cfg: OptimConfig, total_steps: int, fused: bool):
    groups = param_groups(module, cfg.weight_decay, cfg.lr, cfg.lr_scale)
    # fused (CUDA): torch's own fused AdamW kernel, not DeepSpeed's FusedAdam: FusedAdam is
    # JIT-compiled on first use, which needs nvcc (absent from the train image: PyPI torch on
    # python-slim) and fails on arch lists like "9.0a" (seen on an H200, 2026-12-04). ZeRO-3 takes
    # torch.optim.AdamW as a supported client optimizer. CPU: the same class, unfused.
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, total_steps, cfg))
    return opt, sched
