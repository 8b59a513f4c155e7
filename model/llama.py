"""The LLaMA-2 network (RECIPE.md section 3), in one file.

Pre-normalisation with RMSNorm, SwiGLU feed-forward, rotary position embeddings in every
layer, grouped-query attention, no biases, untied input embedding and output head. No
parallelism and no training code here: DeepSpeed, Ray and the losses live elsewhere. The
arithmetic kernels (model/kernels.py) are chosen at run time: plain PyTorch on CPU, fused
ones on GPU, each tested against the plain reference.

Shapes: B batch, T sequence, D model width, H heads, K key/value heads, Hd head dim, V vocab.
RoPE uses the "rotate half" layout of Hugging Face's Llama so exported weights need no
permutation (model/hf.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from model import kernels
from model.config import ModelConfig


def ffn_hidden_dim(cfg: ModelConfig) -> int:
    """SwiGLU width: 2/3 * 4d (same FLOPs as a 4d GELU MLP), scaled, rounded up to multiple_of."""
    if cfg.ffn_hidden_dim:
        return cfg.ffn_hidden_dim
    hidden = int(2 * (4 * cfg.dim) / 3)
    if cfg.ffn_dim_multiplier:
        hidden = int(cfg.ffn_dim_multiplier * hidden)
    return cfg.multiple_of * math.ceil(hidden / cfg.multiple_of)


def rope_tables(head_dim: int, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for the given positions: [B, T, Hd] each (fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq  # [B, T, Hd/2]
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout: [first half | second half]
    return angles.cos(), angles.sin()


@dataclass
class KVCache:
    """Preallocated keys/values for incremental decoding: [n_layers, B, K, max_len, Hd] each.

    Rows of a batch share one write position (`length`); prompts of different lengths are
    left-padded and masked with `attention_mask` (model/generate.py does this).
    """

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch_size: int, max_len: int, device=None,
                 dtype: torch.dtype = torch.float32) -> KVCache:
        kv_heads = cfg.n_kv_heads or cfg.n_heads
        shape = (cfg.n_layers, batch_size, kv_heads, max_len, cfg.dim // cfg.n_heads)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def reset(self) -> None:
        self.length = 0

    def repeat_interleave(self, k: int) -> KVCache:
        """Each row repeated k times (a prompt prefilled once, then sampled k ways)."""
        return KVCache(self.k.repeat_interleave(k, dim=1), self.v.repeat_interleave(k, dim=1), self.length)


INIT_STD = 0.02  # N(0, 0.02) for every weight matrix (GPT-2 / LLaMA); RMSNorm gains start at 1


def residual_std(cfg: ModelConfig, std: float = INIT_STD) -> float:
    """Projections that write into the residual stream (wo, w2) start at std / sqrt(2 * n_layers)
    (GPT-2), so the residual's variance does not grow with depth."""
    return std / math.sqrt(2 * cfg.n_layers)


class Linear(nn.Linear):
    """A bias-free linear layer initialised N(0, std) in its own construction.

    Initialising here rather than afterwards is what makes it hold under ZeRO-3:
    `deepspeed.zero.Init` partitions a module's parameters as soon as its __init__ returns, so an
    init applied to the finished model would change nothing (shared/STACK.md)."""

    def __init__(self, in_features: int, out_features: int, std: float = INIT_STD):
        self.std = std  # read by reset_parameters, which nn.Linear.__init__ calls
        super().__init__(in_features, out_features, bias=False)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.std)


class Embedding(nn.Embedding):
    """nn.Embedding initialised N(0, std) (PyTorch's default is N(0, 1)), in construction."""

    def __init__(self, num_embeddings: int, dim: int, std: float = INIT_STD):
        self.std = std
        super().__init__(num_embeddings, dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.std)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = Linear(cfg.dim, self.n_heads * self.head_dim)
        self.wk = Linear(cfg.dim, self.n_kv_heads * self.head_dim)
        self.wv = Linear(cfg.dim, self.n_kv_heads * self.head_dim)
        self.wo = Linear(self.n_heads * self.head_dim, cfg.dim, std=residual_std(cfg))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, Hd]
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, K, T, Hd]
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = kernels.apply_rope(q, k, cos, sin)
        if cache is not None:  # write this step's K/V, attend over everything cached so far
            start = cache.length
            cache.k[layer, :, :, start:start + T] = k.to(cache.k.dtype)
            cache.v[layer, :, :, start:start + T] = v.to(cache.v.dtype)
            k = cache.k[layer, :, :, : start + T].to(q.dtype)
            v = cache.v[layer, :, :, : start + T].to(q.dtype)
        # no mask: causal from scratch, or one new token that may see every cached key
        y = kernels.attention(q, k, v, mask=mask, causal=mask is None and T > 1)  # [B, H, T, Hd]
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_hidden_dim(cfg)
        self.w1 = Linear(cfg.dim, hidden)  # gate
        self.w3 = Linear(cfg.dim, hidden)  # up
        self.w2 = Linear(hidden, cfg.dim, std=residual_std(cfg))  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(kernels.swiglu(self.w1(x), self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x))


class LMHead(Linear):
    """The output projection. With `targets` it returns (loss sum, token count) through the
    fused linear + cross-entropy instead of logits; doing it inside this module's forward
    keeps it correct under ZeRO-3, which gathers a module's weights only during its forward."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__(dim, vocab_size)

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None):
        if targets is None:
            return super().forward(h).float()
        return kernels.linear_cross_entropy(h.flatten(0, 1), self.weight, targets.flatten())


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # every parameter is initialised by its own module's construction (Linear, Embedding,
        # RMSNorm above), so the model is ready as built, with or without deepspeed.zero.Init
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = LMHead(cfg.dim, cfg.vocab_size)
        self.checkpoint_layers = False  # activation checkpointing, switched on by the engine

    def init_weights(self, std: float = INIT_STD) -> None:
        """Re-draw every weight with base `std` (residual projections std / sqrt(2 * n_layers)),
        gains 1. Construction already did this with INIT_STD: call it only to re-initialise an
        unpartitioned model (tests use a larger std for peakier distributions)."""
        if any(hasattr(p, "ds_id") for p in self.parameters()):  # ZeRO-3 shards: nothing to redo here
            if std != INIT_STD:
                raise RuntimeError("init_weights(std) on ZeRO-3 partitioned parameters would change nothing")
            return
        for name, m in self.named_modules():
            if isinstance(m, (Linear, Embedding)):
                m.std = residual_std(self.cfg, std) if name.endswith(("wo", "w2")) else std
            if isinstance(m, (Linear, Embedding, RMSNorm)):
                m.reset_parameters()

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_embeddings.weight.numel() if exclude_embeddings else n

    def forward(self, tokens: torch.Tensor, *, positions: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None, return_hidden: bool = False,
                targets: torch.Tensor | None = None):
        """tokens [B, T] -> logits [B, T, V] (fp32), or the final hidden states [B, T, D], or
        with targets [B, T] (-100 = ignore): (sum of token losses, number of tokens).

        positions:      [B, T] (default: one row 0..T-1 for all, offset by what the KV cache holds)
        segment_ids:    [B, T] packed documents: attention stays within equal ids
        attention_mask: [B, S] True for real tokens over the whole cached+new span (left padding)
        """
        B, T = tokens.shape
        offset = kv_cache.length if kv_cache is not None else 0
        if positions is None:
            # one row broadcast over the batch ([1, T]): Liger's RoPE kernel takes exactly that
            positions = torch.arange(offset, offset + T, device=tokens.device)[None]
        mask = build_mask(T, offset, segment_ids, attention_mask, tokens.device)
        h = self.tok_embeddings(tokens)  # [B, T, D]
        cos, sin = rope_tables(self.cfg.dim // self.cfg.n_heads, positions, self.cfg.rope_theta)
        cos, sin = cos.to(h.dtype)[:, None], sin.to(h.dtype)[:, None]  # [B, 1, T, Hd]
        for i, layer in enumerate(self.layers):
            if self.checkpoint_layers and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, mask, None, i, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += T
        h = self.norm(h)
        if return_hidden:
            return h
        return self.output(h, targets)


def build_mask(T: int, offset: int, segment_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
               device) -> torch.Tensor | kernels.DocumentMask | None:
    """None for plain causal (the mask-free kernels), a DocumentMask for packed documents
    (block-sparse on GPU, model/kernels.py), else a boolean mask [B, 1, T, offset+T] (True = attend)."""
    if segment_ids is not None and bool((segment_ids == segment_ids[:, :1]).all()):
        segment_ids = None  # one document per row: plain causal
    if segment_ids is None and attention_mask is None and (offset == 0 or T == 1):
        return None  # plain causal prefill, or a one-token decode step that sees the whole cache
    if attention_mask is None and offset == 0:
        return kernels.DocumentMask(segment_ids)
    S = offset + T
    q_pos = torch.arange(offset, S, device=device)[:, None]
    mask = (torch.arange(S, device=device)[None, :] <= q_pos)[None, None]  # [1, 1, T, S] causal
    if segment_ids is not None:  # packing: a token sees only its own document
        same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, T]
        mask = mask & same[:, None]
    if attention_mask is not None:  # padding: never attend to pad keys
        mask = mask & attention_mask[:, None, None, :S].bool()
        # a pad query would attend to nothing (NaN softmax): let every query see itself; a real
        # token already does, and a pad's output is never used
        mask = mask | (torch.arange(S, device=device)[None, :] == q_pos)[None, None]
    return mask


def lm_loss(model: Transformer, tokens: torch.Tensor, targets: torch.Tensor, **kw) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over targets != -100, without materialising [B*T, V] logits."""
    loss_sum, n = model(tokens, targets=targets, **kw)
    return loss_sum / max(n, 1), n

