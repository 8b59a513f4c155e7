"""Training FLOPs per token and model FLOPs utilisation (MFU).

FLOPs per token for one forward+backward pass (PaLM appendix B / Chinchilla):
    6 * N  +  12 * n_layers * seq_len * dim
where N is the number of non-embedding parameters (each weight does a multiply-add in the
forward pass and two in the backward pass: 2 + 4 = 6 FLOPs) and the second term is the
attention score and value products (QK^T and AV, forward and backward), which grow with the
context. Activation recomputation is not counted (MFU, not hardware FLOPs utilisation).
"""

from __future__ import annotations

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets.
PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}
CPU_PEAK_FLOPS_PER_CORE = 100e9  # a rough AVX-512 fp32 figure; CPU MFU is indicative only


def flops_per_token(n_params_non_embedding: int, n_layers: int, seq_len: int, dim: int) -> float:
    return 6.0 * n_params_non_embedding + 12.0 * n_layers * seq_len * dim


def peak_flops(use_gpu: bool) -> float:
    if use_gpu:
        import torch

        name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
        for key, value in PEAK_FLOPS.items():
            if key in name:
                return value
        return PEAK_FLOPS["A100"]
    import os

    return CPU_PEAK_FLOPS_PER_CORE * max(1, len(os.sched_getaffinity(0)))


def mfu(tokens_per_s_per_device: float, flops_token: float, use_gpu: bool) -> float:
    return tokens_per_s_per_device * flops_token / peak_flops(use_gpu)
