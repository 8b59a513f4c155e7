"""Hugging Face interop: export our checkpoints as a `LlamaForCausalLM` directory, import HF
Llama checkpoints (GQA included) into our model. Safetensors only: nothing is unpickled.

Our RoPE uses HF's rotate-half layout, so the mapping is a pure renaming of tensors.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from model.config import ModelConfig
from model.weights import DEFAULT_SHARD_BYTES, INDEX, ShardedWriter, WeightsReader, load_into, weights_files

_LAYER_MAP = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_MAP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}


def to_hf_name(name: str) -> str:
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    _, i, rest = name.split(".", 2)  # layers.<i>.<module>.weight
    module, _, param = rest.rpartition(".")
    return f"model.layers.{i}.{_LAYER_MAP[module]}.{param}"


def from_hf_name(name: str) -> str:
    inverse_top = {v: k for k, v in _TOP_MAP.items()}
    if name in inverse_top:
        return inverse_top[name]
    _, _, i, rest = name.split(".", 3)  # model.layers.<i>.<module>.weight
    module, _, param = rest.rpartition(".")
    inverse = {v: k for k, v in _LAYER_MAP.items()}
    return f"layers.{i}.{inverse[module]}.{param}"


def hf_config(cfg: ModelConfig, bos_id: int = 1, eos_id: int = 2, pad_id: int | None = None) -> dict:
    from model.llama import ffn_hidden_dim

    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg.dim, "intermediate_size": ffn_hidden_dim(cfg), "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "hidden_act": "silu", "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": bos_id, "eos_token_id": eos_id,
        "pad_token_id": pad_id, "torch_dtype": "float32", "initializer_range": 0.02,
    }


def export_dtype(cfg: ModelConfig) -> torch.dtype:
    """fp32 for small models (exact round trips in tests and the tiny preset), bf16 above 1B
    parameters (the big presets: half the bytes, what serving stacks load)."""
    from model.llama import Transformer

    with torch.device("meta"):
        return torch.bfloat16 if Transformer(cfg).num_params() > 1e9 else torch.float32


@contextmanager
def _named_tensors(source):
    """(name, tensor) pairs of a weights path (read lazily), a module or a state dict."""
    if isinstance(source, (str, Path)):
        with WeightsReader(source) as reader:
            yield reader.items()
    elif isinstance(source, torch.nn.Module):
        yield iter(source.state_dict().items())
    else:
        yield iter(source.items())


def export_hf(weights: torch.nn.Module | dict | str | Path, cfg: ModelConfig, out_dir: str | Path,
              tokenizer_model: str | Path | None = None, dtype: torch.dtype | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write a `LlamaForCausalLM` directory: config.json, generation_config.json, the weights as
    safetensors in `dtype` (default: export_dtype(cfg)), sharded above `max_shard_bytes` as
    `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`, and the tokenizer files
    with the chat template.

    From a weights path (a file, an index or a directory model/weights.py reads) the export
    streams: one tensor is read, renamed, cast and handed to a ShardedWriter at a time, so host
    memory holds at most one tensor plus the shard being filled, never the model."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = [*out.glob("model*.safetensors"), out / INDEX]  # a re-export may shard differently
    if isinstance(weights, (str, Path)):
        sources = {f.resolve() for f in weights_files(weights)[0].values()} | {Path(weights).resolve()}
        if sources & {f.resolve() for f in stale if f.exists()}:
            raise ValueError(f"export_hf: {out} holds the weights being exported ({weights}); export elsewhere")
    for old in stale:
        old.unlink(missing_ok=True)
    dtype = dtype or export_dtype(cfg)
    writer = ShardedWriter(out, max_shard_bytes, dtype=dtype)
    with _named_tensors(weights) as tensors:
        for name, t in tensors:
            writer.add(to_hf_name(name), t)
            del t
    writer.close()
    ids = {"bos_id": 1, "eos_id": 2, "pad_id": None}
    if tokenizer_model is not None:
        from model.chat import CHAT_TEMPLATE
        from model.tokenizer import Tokenizer

        tok = Tokenizer(tokenizer_model)
        ids = {"bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id}
        shutil.copyfile(tokenizer_model, out / "tokenizer.model")
        pieces = {i: tok.id_to_piece(i) for i in (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id)}
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": pieces[tok.bos_id], "eos_token": pieces[tok.eos_id],
            "unk_token": pieces[tok.unk_id], "pad_token": pieces[tok.pad_id], "add_bos_token": True,
            "add_eos_token": False, "legacy": False, "model_max_length": cfg.max_seq_len,
            "chat_template": CHAT_TEMPLATE,
        }, indent=2))
    config = hf_config(cfg, ids["bos_id"], ids["eos_id"], ids["pad_id"])
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["bos_id"], "eos_token_id": ids["eos_id"], "pad_token_id": ids["pad_id"]}, indent=2))
    return out


def import_hf(path: str | Path, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = torch.float32) -> tuple[torch.nn.Module, ModelConfig]:
    """An HF Llama checkpoint directory -> (our Transformer with its weights on `device` in
    `dtype`, its ModelConfig), read tensor by tensor (safetensors only: nothing is unpickled)."""
    from model.llama import Transformer

    path = Path(path)
    c = json.loads((path / "config.json").read_text())
    if c.get("model_type") != "llama":
        raise ValueError(f"{path}/config.json: model_type {c.get('model_type')!r} is not 'llama'")
    cfg = ModelConfig(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                      n_kv_heads=c.get("num_key_value_heads"), vocab_size=c["vocab_size"],
                      ffn_hidden_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-5),
                      rope_theta=c.get("rope_theta", 10000.0), max_seq_len=c.get("max_position_embeddings", 4096))
    with torch.device("meta"):  # nothing allocated until each tensor is read from the file
        model = Transformer(cfg)
    tied = c.get("tie_word_embeddings", False)

    def hf_name(name: str) -> str:
        return "model.embed_tokens.weight" if tied and name == "output.weight" else to_hf_name(name)

    try:
        load_into(model, path, device=device, dtype=dtype, rename=hf_name)
    except ValueError as e:
        raise ValueError(f"{path}: weights do not match a Llama model ({e})") from None
    return model, cfg


def convert_weights(src: str | Path, out_dir: str | Path, dtype: torch.dtype,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """The safetensors of an HF directory (or file, or index) re-written in `dtype` under
    `out_dir`, names unchanged, one tensor in memory at a time (e.g. a bf16 registry copy of an
    fp32 reward-model export)."""
    writer = ShardedWriter(out_dir, max_shard_bytes, dtype=dtype)
    with WeightsReader(src) as reader:
        for name, t in reader.items():
            writer.add(name, t)
            del t
    return writer.close()
