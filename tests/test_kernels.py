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


def test_linear_cross_entropy_with_no_loss_tokens_is_zero_with_zero_gradient():
    """A micro-batch that is all prompt or padding (SFT, rejection sampling) adds nothing."""
    for dtype in (torch.float32, torch.bfloat16):
        h = torch.randn(12, 16, dtype=dtype, requires_grad=True)
        w = torch.randn(40, 16, dtype=dtype, requires_grad=True)
        loss, n = kernels.linear_cross_entropy(h, w, torch.full((12,), -100))
        loss.backward()
        assert n == 0 and float(loss.detach()) == 0.0
        assert not h.grad.any() and not w.grad.any()


class _MeanReducingCE(torch.autograd.Function):
    """Stands in for a fused kernel that reduces to a mean (as Liger does with "mean"): on a batch
    with no loss tokens it divides 0 by 0. Only the dispatch around it is under test."""

    @staticmethod
    def forward(ctx, h, w, t, bias, ce_weight, ignore_index, lse, smoothing, reduction):
        with torch.enable_grad():
            h_, w_ = h.detach().requires_grad_(), w.detach().requires_grad_()
            loss = torch.nn.functional.cross_entropy(h_ @ w_.T, t, ignore_index=ignore_index, reduction=reduction)
            ctx.grads = torch.autograd.grad(loss, (h_, w_))
        return loss.detach()

    @staticmethod
    def backward(ctx, g):
        return ctx.grads[0] * g, ctx.grads[1] * g, *([None] * 7)


def test_fast_path_is_guarded_against_no_loss_tokens(monkeypatch):
    monkeypatch.setattr(kernels, "_fast", lambda x: {"flce": _MeanReducingCE})
    h = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(30, 16, requires_grad=True)
    loss, n = kernels.linear_cross_entropy(h, w, torch.full((8,), -100))
    loss.backward()
    assert n == 0 and float(loss) == 0.0 and not h.grad.isnan().any() and not h.grad.any() and not w.grad.any()
    t = torch.randint(0, 30, (8,))  # with loss tokens the fast path's result is a sum, as the reference's
    t[:3] = -100
    fast, n = kernels.linear_cross_entropy(h, w, t)
    ref, n_ref = kernels.linear_cross_entropy_reference(h, w, t)
    assert n == n_ref == 5
    torch.testing.assert_close(fast, ref)


# ----------------------------------------------------------------------------- fused kernels on CUDA
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA paths run on the GPU machine only")


def _both_backends(fn, *inputs):
    """fn(*inputs) on the Liger path and on the reference: (outputs, input gradients) of each."""
    pytest.importorskip("liger_kernel", reason="requirements-gpu.txt not installed")
    res = {}
    try:
        for backend in ("liger", "reference"):
            kernels.use(backend)
            xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
            out = fn(*xs)
            outs = out if isinstance(out, tuple) else (out,)
            torch.manual_seed(0)
            probe = [torch.randn_like(o) for o in outs]  # a random upstream gradient
            sum((o.float() * g.float()).sum() for o, g in zip(outs, probe)).backward()
            res[backend] = ([o.detach().float() for o in outs], [x.grad.float() for x in xs if x.requires_grad])
    finally:
        kernels.use("auto")
    return res["liger"], res["reference"]


def _close(fast, ref, tol):
    for a, b in zip(fast[0] + fast[1], ref[0] + ref[1]):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_rmsnorm_fused_matches_reference_values_and_grads(dtype, tol):
    torch.manual_seed(0)
    x = torch.randn(4, 64, 256, device="cuda", dtype=dtype)
    w = (1 + 0.1 * torch.randn(256, device="cuda")).to(dtype)
    _close(*_both_backends(lambda x, w: kernels.rms_norm(x, w, 1e-5), x, w), tol)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_swiglu_fused_matches_reference_values_and_grads(dtype, tol):
    torch.manual_seed(0)
    g, u = torch.randn(4, 64, 512, device="cuda", dtype=dtype), torch.randn(4, 64, 512, device="cuda", dtype=dtype)
    _close(*_both_backends(kernels.swiglu, g, u), tol)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-3), (torch.bfloat16, 5e-2)])
def test_fused_linear_cross_entropy_matches_reference_values_and_grads(dtype, tol):
    torch.manual_seed(0)
    h = (0.5 * torch.randn(512, 128, device="cuda")).to(dtype)
    w = (0.1 * torch.randn(3000, 128, device="cuda")).to(dtype)
    t = torch.randint(0, 3000, (512,), device="cuda")
    t[::7] = -100
    fast, ref = _both_backends(lambda h, w: kernels.linear_cross_entropy(h, w, t)[0], h, w)
    torch.testing.assert_close(fast[0][0], ref[0][0], atol=tol * 10, rtol=tol)  # a sum over ~440 tokens
    _close(([], fast[1]), ([], ref[1]), tol)


@pytest.mark.gpu
@needs_cuda
def test_whole_model_loss_and_grads_match_between_fused_and_reference_paths():
    """The kernels wired together as the model calls them (RoPE's return convention, RMSNorm's
    weight, the fused loss): one training forward/backward of a small model on each path."""
    from model.config import ModelConfig
    from model.llama import Transformer

    pytest.importorskip("liger_kernel", reason="requirements-gpu.txt not installed")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=3000,
                                    multiple_of=64, max_seq_len=128)).cuda()
    tokens = torch.randint(0, 3000, (2, 128), device="cuda")
    targets = tokens.roll(-1, dims=1)
    targets[:, -1] = -100
    res = {}
    try:
        for backend in ("liger", "reference"):
            kernels.use(backend)
            model.zero_grad(set_to_none=True)
            loss, n = model(tokens, targets=targets)
            (loss / n).backward()
            res[backend] = (float(loss.detach() / n), {k: p.grad.clone() for k, p in model.named_parameters()})
    finally:
        kernels.use("auto")
    assert res["liger"][0] == pytest.approx(res["reference"][0], rel=1e-4)
    for name, g in res["reference"][1].items():
        torch.testing.assert_close(res["liger"][1][name], g, atol=1e-4, rtol=2e-3, msg=name)
