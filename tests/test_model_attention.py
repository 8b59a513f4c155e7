"""Attention paths on packed rows with GQA: each equals the explicit reference in values and
gradients; rows without packing take the mask-free causal kernel; FlexAttention on CUDA."""

import pytest
import torch

from model import kernels
from model.config import ModelConfig
from model.llama import Transformer, build_mask

CFG = ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=256)


def packed_segments(B: int, T: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """Rows of several documents of random lengths (as steps/sft_data.pack makes them)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        cuts = sorted(torch.randint(1, T, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist())
        seg = torch.zeros(T, dtype=torch.long)
        for c in cuts:
            seg[c:] += 1
        rows.append(seg)
    return torch.stack(rows).to(device)


def values_and_grads(fn, *inputs):
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*xs)
    torch.manual_seed(1)
    (out.float() * torch.randn_like(out.float())).sum().backward()
    return [out.detach().float()] + [x.grad.float() for x in xs]


def qkv(B, T, device="cpu", dtype=torch.float32, H=8, K=2, D=32, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(B, h, T, D, device=device, dtype=dtype, generator=g) for h in (H, K, K)]


def test_document_mask_path_equals_reference_values_and_grads():
    q, k, v = qkv(3, 48)
    mask = kernels.DocumentMask(packed_segments(3, 48))
    got = values_and_grads(lambda q, k, v: kernels.attention(q, k, v, mask=mask), q, k, v)
    ref = values_and_grads(lambda q, k, v: kernels.attention_reference(q, k, v, mask=mask), q, k, v)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_mask_free_causal_path_equals_reference_values_and_grads():
    q, k, v = qkv(2, 40)
    got = values_and_grads(lambda q, k, v: kernels.attention(q, k, v), q, k, v)
    ref = values_and_grads(lambda q, k, v: kernels.attention_reference(q, k, v), q, k, v)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_flex_failure_falls_back_to_the_dense_path_once(monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(kernels, "_FLEX_FAILED", None)
    monkeypatch.setattr(kernels, "_flex", lambda q: {"flex": broken, "block_mask": lambda *a, **kw: None})
    q, k, v = qkv(2, 24)
    mask = kernels.DocumentMask(packed_segments(2, 24))
    with pytest.warns(UserWarning, match="no compiler here"):
        out = kernels.attention(q, k, v, mask=mask)
    assert "no compiler here" in kernels._FLEX_FAILED
    torch.testing.assert_close(out, kernels.attention_reference(q, k, v, mask=mask), atol=1e-5, rtol=1e-5)


def test_which_mask_each_case_builds():
    one_doc = torch.zeros(2, 16, dtype=torch.long)
    assert build_mask(16, 0, None, None, "cpu") is None  # pretraining rows: no mask at all
    assert build_mask(16, 0, one_doc, None, "cpu") is None  # a single document per row: plain causal too
    assert isinstance(build_mask(16, 0, packed_segments(2, 16), None, "cpu"), kernels.DocumentMask)
    assert build_mask(1, 15, None, None, "cpu") is None  # a decode step sees the whole cache
    padded = build_mask(4, 0, None, torch.ones(2, 4, dtype=torch.bool), "cpu")
    assert padded.dtype == torch.bool and padded.shape == (2, 1, 4, 4)


def test_packed_rows_train_like_separate_documents():
    """The loss and every parameter gradient of a packed row equal those of its documents run
    one by one (positions restart at 0 in each)."""
    torch.manual_seed(0)
    model = Transformer(CFG)
    seg = packed_segments(1, 40, seed=3)
    tokens = torch.randint(0, 97, (1, 41))
    x, y = tokens[:, :-1], tokens[:, 1:].clone()
    y[:, :-1][seg[:, 1:] != seg[:, :-1]] = -100  # no target across a document boundary
    starts = torch.cat([torch.tensor([0]), (seg[0, 1:] != seg[0, :-1]).nonzero()[:, 0] + 1, torch.tensor([40])])
    pos = torch.cat([torch.arange(int(e - s)) for s, e in zip(starts[:-1], starts[1:])])[None]
    packed_loss, _ = model(x, targets=y, segment_ids=seg, positions=pos)
    packed_loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    separate = sum(model(x[:, s:e], targets=y[:, s:e])[0] for s, e in zip(starts[:-1], starts[1:]))
    separate.backward()
    torch.testing.assert_close(packed_loss, separate, atol=1e-4, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA paths run on the GPU machine only")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)])
def test_flex_document_attention_equals_reference_on_cuda(dtype, tol):
    q, k, v = qkv(2, 512, "cuda", dtype, H=16, K=4, D=64)
    mask = kernels.DocumentMask(packed_segments(2, 512, device="cuda"))
    assert kernels._flex(q) is not None
    got = values_and_grads(lambda q, k, v: kernels.attention(q, k, v, mask=mask), q, k, v)
    assert kernels._FLEX_FAILED is None  # it ran FlexAttention, not the dense fallback
    ref = values_and_grads(lambda q, k, v: kernels.attention_reference(q, k, v, mask=mask), q, k, v)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.gpu
@needs_cuda
def test_flex_document_attention_does_not_store_the_attention_matrix():
    """T=4096, 16 heads: scores materialised as SDPA's math backend does are 16 x 4096^2 fp32 = 1 GiB.

    On an H200 (2026-12-04) SDPA with a dense boolean mask picked its memory-efficient kernel and
    peaked at 121 MiB (it still reads the T x T mask), flex at 89 MiB: the comparison that shows
    the attention matrix is never stored is against the math backend, which stores it.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = qkv(1, 4096, "cuda", torch.bfloat16, H=16, K=4, D=64)
    mask = kernels.DocumentMask(packed_segments(1, 4096, device="cuda"))
    kernels.attention(q, k, v, mask=mask)  # compile outside the measurement
    assert kernels._FLEX_FAILED is None

    def peak(fn) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        values_and_grads(fn, q, k, v)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    def dense(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(), enable_gqa=True)

    flex = peak(lambda q, k, v: kernels.attention(q, k, v, mask=mask))
    efficient = peak(dense)
    with sdpa_kernel(SDPBackend.MATH):
        math = peak(dense)
    print(f"peak attention memory: flex {flex / 2**20:.0f} MiB, dense mask {efficient / 2**20:.0f} MiB "
          f"(SDPA's choice), {math / 2**20:.0f} MiB (math backend)")
    assert math > 2**30  # the reference really stores the scores
    assert flex < 2**30 / 4 and flex < math / 8
