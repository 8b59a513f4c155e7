"""The training engine's config: how one training runs (workers, batch, precision,
checkpoints) and its optimizer and schedule; plus the resources of a Ray task a step starts."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat

from model.config import Section


class StepResources(Section):
    """What the DAG node of one step asks Ray for. Training steps keep their node light
    and ask for workers in their own `train` section instead."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory_gb: float | None = Field(None, gt=0)
    # Custom Ray resources the task asks for. On a cluster each node type declares one marker
    # resource for the image it runs (ray_cluster.yaml, infra/kuberay/: `data_node` on CPU data
    # nodes, `gpu_node` on GPU training nodes), so asking for a sliver of it (0.01) places the
    # step on a node of that image.
    resources: dict[str, float] = Field(default_factory=dict)
    # The image the step needs: a declaration that tests check against the node types and worker
    # groups carrying the marker resource in `resources`. Steps do not start their own container
    # (Ray's per-task image_uri needs podman on every node, which the cluster does not provision).
    image: str | None = None


class OptimConfig(Section):
    """AdamW + schedule; defaults are the paper's pretraining ones (RECIPE 4)."""

    lr: float = Field(3.0e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(2000, ge=0)
    warmup_fraction: float | None = Field(None, ge=0, lt=1)  # overrides warmup_steps (RM: 3%)
    min_warmup_steps: int = 0
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    # multipliers of `lr` for the parameters whose name matches a pattern (fnmatch, e.g.
    # {"norm.weight": 1000}; the first matching pattern wins, and each must match a parameter).
    # AdamW's decoupled weight decay scales with the group's LR too. A checkpoint restores its
    # groups' LRs: change lr_scale only for a fresh training. Empty in every big preset (the
    # paper's one LR); the tiny PPO uses it for the output norm's gain (README "PPO")
    lr_scale: dict[str, PositiveFloat] = {}


class TrainConfig(Section):
    """How the shared engine runs one training: workers, batch, precision, checkpoints."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    global_batch_size: int = Field(1024, ge=1)  # sequences (or pairs / rollouts) per optimizer step
    micro_batch_size: int = Field(1, ge=1)  # per worker per forward
    max_steps: int | None = Field(None, ge=1)  # None: derive from epochs
    epochs: float = Field(1.0, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 3
    precision: Literal["bf16", "fp32"] = "bf16"
    activation_checkpointing: bool = False
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(1, ge=1)
    eval_every: int = Field(100, ge=1)
    max_failures: int = Field(1, ge=0)
    # Optimizer states (fp32 master weights, Adam moments) in host memory instead of the GPU's:
    # ZeRO-3 CPU offload, stepped by torch AdamW on the host (no C++ build needed).
    offload_optimizer: bool = False
    # Gradients are reduced across ranks and accumulated over micro-batches in fp32 even when
    # the model computes in bf16 (RECIPE scale: bf16 sums over 64-256 ranks lose precision).
    grad_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    shuffle_window_rows: int = Field(1 << 16, ge=1)  # rows shuffled together (steps/engine/data.py)
    eval_max_rows: int = Field(2048, ge=1)  # rows of the eval files each evaluation reads
