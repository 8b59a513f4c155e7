"""Each kernel path against its plain reference: outputs and gradients."""

import pytest
import torch

from model import kernels


def test_chunked_linear_cross_entropy_matches_reference(monkeypatch):
    monkeypatch.setattr(kernels, "CE_CHUNK", 7)  # several chunks, one ragged
    torch.manual_seed(0)
    h = torch.randn(30, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (30,))
    t[[3, 11, 29]] = -100
    loss, n = kernels.linear_cross_entropy(h, w, t)
    loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref, n_ref = kernels.linear_cross_entropy_reference(h, w, t)
    ref.backward()
    assert n == n_ref == 27
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)


def test_reference_rmsnorm_swiglu():
    x = torch.randn(3, 8)
    w = torch.rand(8)
    out = kernels.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(out, x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w)
    g, u = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(kernels.swiglu(g, u), g * torch.sigmoid(g) * u)


def test_sdpa_with_mask_matches_explicit_softmax():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    mask = torch.rand(2, 1, 6, 6) > 0.3
    mask |= torch.eye(6, dtype=torch.bool)
    torch.testing.assert_close(kernels.attention(q, k, v, mask=mask), kernels.attention_reference(q, k, v, mask=mask),
                               atol=1e-5, rtol=1e-5)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError):
        kernels.use("magic")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA paths run on the GPU machine only")
def test_liger_paths_match_reference_on_cuda():
    pytest.importorskip("liger_kernel", reason="requirements-gpu.txt not installed")
    torch.manual_seed(0)
    dev = "cuda"
    h = torch.randn(256, 64, device=dev, requires_grad=True)
    w = torch.randn(1000, 64, device=dev, requires_grad=True)
    t = torch.randint(0, 1000, (256,), device=dev)
    kernels.use("liger")
    loss, _ = kernels.linear_cross_entropy(h, w, t)
    kernels.use("reference")
    ref, _ = kernels.linear_cross_entropy(h, w, t)
    torch.testing.assert_close(loss, ref, atol=1e-3, rtol=1e-4)
    x, g = torch.randn(4, 64, device=dev), torch.rand(64, device=dev)
    kernels.use("liger")
    fast = kernels.rms_norm(x, g, 1e-5)
    kernels.use("reference")
    torch.testing.assert_close(fast, kernels.rms_norm(x, g, 1e-5), atol=1e-4, rtol=1e-4)
    kernels.use("auto")
