"""The network's typed config, and the pydantic base every config section of the project uses.

A section forbids unknown keys and validates on assignment, so a typo in a preset or an
override is an error naming the key (pipelines/config.py composes the sections).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: multi-head attention (= n_heads)
    vocab_size: int = 32_000
    multiple_of: int = 256  # SwiGLU hidden = 2/3 * 4d rounded up to this
    ffn_dim_multiplier: float | None = None
    ffn_hidden_dim: int | None = None  # explicit override (the published 70B uses 28672)
    norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    max_seq_len: int = 4096

    @model_validator(mode="after")
    def _heads(self) -> ModelConfig:
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({kv})")
        return self

