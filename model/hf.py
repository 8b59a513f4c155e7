"""Hugging Face interop: export our checkpoints as a `LlamaForCausalLM` directory, import HF
Llama checkpoints (GQA included) into our model. Safetensors only: nothing is unpickled.

Our RoPE uses HF's rotate-half layout, so the mapping is a pure renaming of tensors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig

_LAYER_MAP = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_MAP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
SHARD_BYTES = 5 * 2**30


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


def export_hf(model_or_state: torch.nn.Module | dict | str | Path, cfg: ModelConfig, out_dir: str | Path,
              tokenizer_model: str | Path | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write config.json, model safetensors (sharded above 5 GiB), generation and tokenizer files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model_or_state, (str, Path)):
        state = load_file(str(model_or_state))
    elif isinstance(model_or_state, torch.nn.Module):
        state = model_or_state.state_dict()
    else:
        state = model_or_state
    hf_state = {to_hf_name(k): v.detach().to(dtype).contiguous() for k, v in state.items()}
    _save_sharded(hf_state, out)
    ids = {"bos_id": 1, "eos_id": 2, "pad_id": None}
    if tokenizer_model is not None:
        from model.tokenizer import Tokenizer

        tok = Tokenizer(tokenizer_model)
        ids = {"bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id}
        shutil.copyfile(tokenizer_model, out / "tokenizer.model")
        pieces = {i: tok.id_to_piece(i) for i in (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id)}
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": pieces[tok.bos_id], "eos_token": pieces[tok.eos_id],
            "unk_token": pieces[tok.unk_id], "pad_token": pieces[tok.pad_id], "add_bos_token": True,
            "add_eos_token": False, "legacy": False, "model_max_length": cfg.max_seq_len,
        }, indent=2))
    config = hf_config(cfg, ids["bos_id"], ids["eos_id"], ids["pad_id"])
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["bos_id"], "eos_token_id": ids["eos_id"], "pad_token_id": ids["pad_id"]}, indent=2))
    return out


def _save_sharded(state: dict[str, torch.Tensor], out: Path) -> None:
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
         "weight_map": weight_map}, indent=2))


def load_hf_state(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors files (pickled checkpoints are not loaded)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def import_hf(path: str | Path) -> tuple[torch.nn.Module, ModelConfig]:
    """An HF Llama checkpoint directory -> (our Transformer with its weights, its ModelConfig)."""
    from model.llama import Transformer

    path = Path(path)
    c = json.loads((path / "config.json").read_text())
    if c.get("model_type") != "llama":
        raise ValueError(f"{path}/config.json: model_type {c.get('model_type')!r} is not 'llama'")
    cfg = ModelConfig(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                      n_kv_heads=c.get("num_key_value_heads"), vocab_size=c["vocab_size"],
                      ffn_hidden_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-5),
                      rope_theta=c.get("rope_theta", 10000.0), max_seq_len=c.get("max_position_embeddings", 4096))
    hf_state = load_hf_state(path)
    if c.get("tie_word_embeddings") and "lm_head.weight" not in hf_state:
        hf_state["lm_head.weight"] = hf_state["model.embed_tokens.weight"]
    state = {from_hf_name(k): v.float() for k, v in hf_state.items() if "rotary_emb" not in k}
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match a Llama model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model, cfg
