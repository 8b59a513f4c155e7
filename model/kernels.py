"""Kernels chosen at run time, each paired with a plain-PyTorch reference (llm.c style).

    backend "reference": plain PyTorch everywhere (CPU, tests)
    backend "liger":     Liger's Triton kernels for RMSNorm, SwiGLU and fused linear +
                         cross-entropy (CUDA only; `pip install -r requirements-gpu.txt`); RoPE
                         stays the reference (apply_rope says why)
    backend "auto":      liger when CUDA and liger_kernel are available, else reference

Attention, by case (what PyTorch's SDPA dispatcher picks; checked with torch 2.13 on CPU):
    no mask (pretraining rows, an unpadded prefill, a decode step): SDPA with is_causal and
        enable_gqa: FlashAttention on CUDA and PyTorch's flash kernel on CPU; K/V are shared
        by their query heads, never copied.
    packed documents (segment_ids, SFT): a DocumentMask. On CUDA it becomes a block-sparse
        FlexAttention mask (document-causal mask_mod; blocks outside any document are skipped,
        no [T, T] matrix is stored), run by torch.compile'd flex_attention. Elsewhere, and with
        backend "reference", it is a dense boolean mask through SDPA: on CPU that is still the
        flash kernel (which takes masks and GQA), but on CUDA a boolean mask with GQA falls
        back to the math kernel, which stores the attention matrix. (FlexAttention has no
        backward on CPU, so CPU training cannot use it.)
    left-padded prompts (sampling): a dense boolean mask through SDPA, math kernel on CUDA;
        for a one-token decode step that matrix is one row per head.
`linear_cross_entropy` never materialises the [N, V] logits on any backend (chunked with
recomputation on the reference). Select with `kernels.use("reference")` or the env var
LLAMA2_KERNELS.
"""

from __future__ import annotations

import os
import warnings
from functools import lru_cache

import torch
import torch.nn.functional as F

_BACKEND = os.environ.get("LLAMA2_KERNELS", "auto")
CE_CHUNK = 4096  # rows of hidden states per cross-entropy chunk on the reference path


def use(backend: str) -> None:
    global _BACKEND
    if backend not in ("auto", "reference", "liger"):
        raise ValueError(f"unknown kernel backend {backend!r}")
    _BACKEND = backend


@lru_cache(maxsize=1)
def _liger():
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        return None
    return {"rms_norm": LigerRMSNormFunction, "swiglu": LigerSiLUMulFunction,
            "flce": LigerFusedLinearCrossEntropyFunction}


def _fast(x: torch.Tensor):
    if _BACKEND == "reference" or not x.is_cuda:
        return None
    ops = _liger()
    if ops is None and _BACKEND == "liger":
        raise RuntimeError("kernels.use('liger') but liger_kernel is not installed (requirements-gpu.txt)")
    return ops


# ----------------------------------------------------------------------------- RMSNorm
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    ops = _fast(x)
    if ops is not None:
        return ops["rms_norm"].apply(x, weight, eps, 0.0, "llama", False)
    return rms_norm_reference(x, weight, eps)


# ----------------------------------------------------------------------------- SwiGLU
def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    ops = _fast(gate)
    if ops is not None:
        return ops["swiglu"].apply(gate, up)
    return swiglu_reference(gate, up)


# ----------------------------------------------------------------------------- RoPE
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [B, H, T, Hd], k [B, K, T, Hd]; cos/sin [B, 1, T, Hd] (rotate-half layout)."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def apply_rope(q, k, cos, sin):
    # Always the reference: Liger's RoPE kernel (0.8.5) gave gradients wrong by up to 6 on an H200
    # (2026-12-04) for contiguous [B, H, T, Hd] inputs while matching for the attention's own
    # layout, with no explanation found in its source, and it writes into its input without
    # telling autograd. RoPE is elementwise; correctness first.
    return apply_rope_reference(q, k, cos, sin)


# ----------------------------------------------------------------------------- attention
def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, K, S, Hd] -> [B, K * n_rep, S, Hd]: each KV head serves n_rep query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def attention_reference(q, k, v, mask=None, causal=True):
    """Explicit softmax(QK^T / sqrt(d)) V with repeated K/V: the ground truth for tests."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5  # [B, H, T, S]
    T, S = q.shape[-2], k.shape[-2]
    if isinstance(mask, DocumentMask):
        mask = mask.dense()
    if mask is None and causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


class DocumentMask:
    """Causal attention within each packed document: query i sees key j iff j <= i and both
    carry the same segment id. Built once per forward and shared by every layer; each kernel
    takes the form it needs, made on first use (FlexAttention's block mask or a dense mask)."""

    def __init__(self, segment_ids: torch.Tensor):
        self.segment_ids = segment_ids  # [B, T]
        self._block = self._dense = None

    def dense(self) -> torch.Tensor:
        """[B, 1, T, T] bool (True = attend)."""
        if self._dense is None:
            seg, T = self.segment_ids, self.segment_ids.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
            self._dense = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]
        return self._dense

    def block(self, create_block_mask):
        if self._block is None:
            seg = self.segment_ids
            B, T = seg.shape

            def document_causal(b, h, q_idx, kv_idx):
                return (seg[b, q_idx] == seg[b, kv_idx]) & (kv_idx <= q_idx)

            self._block = create_block_mask(document_causal, B, None, T, T, device=seg.device)
        return self._block


@lru_cache(maxsize=1)
def _flex_ops():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    # compiled: eager flex_attention is a slow reference that materialises the scores
    return {"flex": torch.compile(flex_attention, dynamic=False), "block_mask": create_block_mask}


_FLEX_FAILED: str | None = None  # why FlexAttention could not run here, once it failed


def _flex(q: torch.Tensor):
    """FlexAttention for a DocumentMask: CUDA only (no CPU backward), not on the reference
    backend, and for head dims its kernels take."""
    if _BACKEND == "reference" or _FLEX_FAILED or not q.is_cuda or q.shape[-1] not in (16, 32, 64, 128, 256):
        return None
    return _flex_ops()


def attention(q, k, v, mask: torch.Tensor | DocumentMask | None = None, causal: bool = True) -> torch.Tensor:
    """q [B, H, T, Hd], k/v [B, K, S, Hd] (K divides H); mask [B|1, 1, T, S] bool, a
    DocumentMask (T == S, packed documents) or None."""
    gqa = q.shape[1] != k.shape[1]  # K/V heads are shared, never copied (3x faster decode on CPU too)
    if isinstance(mask, DocumentMask):
        ops = _flex(q)
        if ops is not None:
            try:
                return ops["flex"](q, k, v, block_mask=mask.block(ops["block_mask"]), enable_gqa=gqa)
            except Exception as e:  # e.g. torch.compile cannot build the kernel on this machine
                global _FLEX_FAILED
                _FLEX_FAILED = f"{type(e).__name__}: {e}"[:500]
                warnings.warn(f"FlexAttention unavailable, packed documents use a dense mask: {_FLEX_FAILED}",
                              stacklevel=2)
        mask = mask.dense()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                          enable_gqa=gqa)


# ----------------------------------------------------------------------------- linear + cross-entropy
class _ChunkedLinearCE(torch.autograd.Function):
    """sum of CE(hidden @ weight.T, targets) computed chunk by chunk; backward recomputes
    each chunk's logits, so peak memory is one [CE_CHUNK, V] block instead of [N, V]."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        total = hidden.new_zeros((), dtype=acc)
        for s in range(0, hidden.shape[0], CE_CHUNK):
            logits = (hidden[s:s + CE_CHUNK] @ weight.T).to(acc)
            total += F.cross_entropy(logits, targets[s:s + CE_CHUNK], ignore_index=ignore_index, reduction="sum")
        ctx.save_for_backward(hidden, weight, targets)
        ctx.ignore_index = ignore_index
        return total

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets = ctx.saved_tensors
        acc = torch.promote_types(hidden.dtype, torch.float32)  # bf16 inputs accumulate in fp32
        grad_h = torch.zeros_like(hidden)
        grad_w = torch.zeros_like(weight, dtype=acc)
        for s in range(0, hidden.shape[0], CE_CHUNK):
            h, t = hidden[s:s + CE_CHUNK], targets[s:s + CE_CHUNK]
            probs = (h @ weight.T).to(acc).softmax(-1)  # d CE / d logits = softmax - onehot
            valid = t != ctx.ignore_index
            probs[valid, t[valid]] -= 1.0
            probs[~valid] = 0.0
            probs *= grad_out
            grad_h[s:s + CE_CHUNK] = (probs.to(h.dtype) @ weight).to(h.dtype)
            grad_w += probs.T @ h.to(acc)
        return grad_h, grad_w.to(weight.dtype), None, None


def linear_cross_entropy_reference(hidden, weight, targets, ignore_index: int = -100):
    logits = (hidden @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32))
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    return loss, int((targets != ignore_index).sum())


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of counted tokens) for hidden [N, D], weight [V, D]."""
    n = int((targets != ignore_index).sum())
    if n == 0:  # a micro-batch with no loss tokens (all prompt, all padding): loss 0, zero gradients.
        # Liger returns a mean, 0/0 = NaN here; the product keeps the graph so backward still runs
        return (hidden.sum() + weight.sum()) * 0.0, 0
    ops = _fast(hidden)
    if ops is not None:
        total = ops["flce"].apply(hidden, weight, targets, None, None, ignore_index, 0.0, 0.0, "sum")
        return (total[0] if isinstance(total, tuple) else total), n
    return _ChunkedLinearCE.apply(hidden, weight, targets, ignore_index), n
