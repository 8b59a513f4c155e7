"""Hugging Face round trips: HF Llama (GQA) -> ours and ours -> HF give equal logits;
the exported tokenizer loads with transformers; nothing is unpickled."""

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from model.config import ModelConfig
from model.hf import export_hf, import_hf
from model.llama import Transformer
from model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("hf_llama")
    model.save_pretrained(path)  # safetensors
    return path, model


def test_import_hf_llama_with_gqa_gives_equal_logits(hf_dir):
    path, hf = hf_dir
    ours, cfg = import_hf(path)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.ffn_hidden_dim) == (4, 2, 176)
    x = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), hf(x).logits, atol=1e-5, rtol=1e-5)


def test_export_loads_in_transformers_with_equal_logits(tmp_path):
    torch.manual_seed(1)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=211, multiple_of=32, max_seq_len=64)
    ours = Transformer(cfg)
    ours.init_weights()
    export_hf(ours, cfg, tmp_path)
    assert not list(tmp_path.glob("*.bin")) and (tmp_path / "model.safetensors").exists()
    hf = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 211, (3, 11))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours.eval()(x), atol=1e-5, rtol=1e-5)


def test_sharded_export_from_a_weights_file_loads_in_transformers(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(2)
    cfg = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=150, multiple_of=32, max_seq_len=64)
    ours = Transformer(cfg).eval()
    save_file(dict(ours.state_dict()), str(tmp_path / "model.safetensors"))
    out = export_hf(tmp_path / "model.safetensors", cfg, tmp_path / "hf", dtype=torch.float32,
                    max_shard_bytes=40_000)  # several shards, streamed from the file
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 4 and (out / "model.safetensors.index.json").exists()
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, 150, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-5, rtol=1e-5)
    half = export_hf(tmp_path / "model.safetensors", cfg, tmp_path / "hf16", dtype=torch.bfloat16,
                     max_shard_bytes=40_000)
    hf16 = LlamaForCausalLM.from_pretrained(half, dtype=torch.bfloat16).eval()
    assert hf16.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        ref = ours.to(torch.bfloat16)(x)
        torch.testing.assert_close(hf16(x).logits.float(), ref, atol=2e-2, rtol=2e-2)


def test_exported_tokenizer_loads_with_transformers(tmp_path):
    from transformers import AutoTokenizer

    rng = random.Random(0)
    words = "alpha beta gamma delta river stone light 42 1999 code value".split()
    tok = Tokenizer.train((" ".join(rng.choice(words) for _ in range(10)) for _ in range(2000)),
                          tmp_path / "sp" / "tok", 300)
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=tok.vocab_size, multiple_of=32, max_seq_len=32)
    export_hf(Transformer(cfg), cfg, tmp_path / "hf", tokenizer_model=tok.model_path)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "alpha river 1999"
    assert hf_tok(text)["input_ids"] == tok.encode(text, bos=True)
    assert hf_tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_import_rejects_non_llama(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="not 'llama'"):
        import_hf(tmp_path)
