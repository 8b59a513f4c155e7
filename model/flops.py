"""Training FLOPs per token and model FLOPs utilisation (MFU).

FLOPs per token for one forward+backward pass (PaLM appendix B / Chinchilla):
    6 * N  +  12 * n_layers * seq_len * dim
where N is the number of non-embedding parameters (each weight does a multiply-add in the
forward pass and two in the backward pass: 2 + 4 = 6 FLOPs) and the second term is the
attention score and value products (QK^T and AV, forward and backward), which grow with the
context. Activation recomputation is not counted (MFU, not hardware FLOPs utilisation).
"""

from __future__ import annotations

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets. MFU is reported only for
# these devices: a CPU has no comparable published peak, and an invented one would mislead.
PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}


def flops_per_token(n_params_non_embedding: int, n_layers: int, seq_len: int, dim: int) -> float:
    return 6.0 * n_params_non_embedding + 12.0 * n_layers * seq_len * dim


def peak_flops(use_gpu: bool) -> float | None:
    """The device's published peak, or None where it is unknown (CPUs, unlisted GPUs)."""
    if not use_gpu:
        return None
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((value for key, value in PEAK_FLOPS.items() if key in name), None)


def mfu(tokens_per_s_per_device: float, flops_token: float, use_gpu: bool) -> float | None:
    peak = peak_flops(use_gpu)
    return None if peak is None else tokens_per_s_per_device * flops_token / peak
