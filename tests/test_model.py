"""The LLaMA-2 network: preset sizes, GQA, RoPE, causality, packing, KV cache, learning."""

import pytest
import torch

from model.config import ModelConfig
from model.kernels import attention, attention_reference, repeat_kv
from model.llama import KVCache, Transformer, ffn_hidden_dim, lm_loss, rope_tables
from pipelines.config import load_config

TINY = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=64)


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = Transformer(TINY)
    m.init_weights()
    return m.eval()


@pytest.mark.parametrize("preset, billions, ffn", [("7b", 6.74, 11008), ("13b", 13.02, 13824),
                                                   ("34b", 33.74, 22016), ("70b", 68.98, 28672)])
def test_preset_sizes_match_the_published_models(preset, billions, ffn):
    cfg = load_config(preset).model
    assert ffn_hidden_dim(cfg) == ffn
    with torch.device("meta"):  # no memory is allocated, even for 70B
        m = Transformer(cfg)
    assert round(m.num_params() / 1e9, 2) == billions


def test_no_biases_and_untied_embeddings(model):
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())
    assert model.tok_embeddings.weight.data_ptr() != model.output.weight.data_ptr()


def test_gqa_equals_attention_with_repeated_kv():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 8, 10, 16), torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16)
    out = attention(q, k, v)
    ref = attention_reference(q, repeat_kv(k, 4), repeat_kv(v, 4))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_rope_is_relative_and_norm_preserving():
    torch.manual_seed(2)
    from model.kernels import apply_rope_reference

    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def rotated_dot(pq, pk):
        cq, sq = rope_tables(16, torch.tensor([[pq]]), 10000.0)
        ck, sk = rope_tables(16, torch.tensor([[pk]]), 10000.0)
        rq, _ = apply_rope_reference(q, q, cq[:, None], sq[:, None])
        rk, _ = apply_rope_reference(k, k, ck[:, None], sk[:, None])
        return (rq * rk).sum(), rq.norm()

    d1, n1 = rotated_dot(3, 1)
    d2, _ = rotated_dot(10, 8)  # same distance, different absolute positions
    torch.testing.assert_close(d1, d2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(n1, q.norm(), atol=1e-5, rtol=1e-5)


def test_causal_future_tokens_do_not_change_the_past(model):
    x = torch.randint(0, 97, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 97
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :8], model(y)[:, :8])


def test_packed_segments_are_isolated(model):
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 5))
    packed = torch.cat([a, b], 1)
    seg = torch.tensor([[0] * 7 + [1] * 5])
    pos = torch.tensor([list(range(7)) + list(range(5))])
    with torch.no_grad():
        out = model(packed, segment_ids=seg, positions=pos)
        torch.testing.assert_close(out[:, 7:], model(b), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:, :7], model(a), atol=1e-5, rtol=1e-5)


def test_kv_cache_decoding_equals_full_forward(model):
    x = torch.randint(0, 97, (3, 15))
    with torch.no_grad():
        full = model(x)
        cache = KVCache.allocate(TINY, 3, 32)
        steps = [model(x[:, :9], kv_cache=cache)] + [model(x[:, i:i + 1], kv_cache=cache) for i in range(9, 15)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 15


def test_left_padded_prompts_with_cache_match_unpadded(model):
    short, long_ = torch.randint(4, 97, (1, 4)), torch.randint(4, 97, (1, 7))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long_])
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :3] = False
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = KVCache.allocate(TINY, 2, 16)
        out = model(batch, positions=pos[:, :7], kv_cache=cache, attention_mask=mask[:, :7])
        torch.testing.assert_close(out[0, -1], model(short)[0, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1, -1], model(long_)[0, -1], atol=1e-5, rtol=1e-5)
        nxt = torch.tensor([[5], [6]])
        step = model(nxt, positions=pos[:, 7:8], kv_cache=cache, attention_mask=mask[:, :8])
        ref0 = model(torch.cat([short, nxt[:1]], 1))[0, -1]
        torch.testing.assert_close(step[0, -1], ref0, atol=1e-5, rtol=1e-5)


def test_a_few_steps_reduce_the_loss(model):
    torch.manual_seed(3)
    model.train()
    x = torch.randint(0, 97, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss, _ = lm_loss(model, x[:, :-1], x[:, 1:])
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first * 0.5
