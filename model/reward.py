"""The reward model (RECIPE.md section 7): the LLaMA-2 network with its LM head replaced by a
scalar regression head, reading the final hidden state of the last real token of
prompt + response.

Same parameter names as `Transformer` (tok_embeddings, layers, norm) plus `score`, so a chat
model's weights load into it by name (everything but `output.weight`), and the Hugging Face
export is `LlamaForSequenceClassification` (`num_labels=1`, whose head is also called `score`
and also bias-free). No training code here: the margin ranking loss lives in steps/reward.py.

Padding: sequences are right-padded. Attention is causal, so the last real token never sees
the padding after it; the head gathers the hidden state at `lengths - 1`. Hugging Face picks
the rightmost token that is not `pad_token_id`, which is the same token because every
sequence ends with `</s>` (never the pad id, model/tokenizer.py reserves a separate one).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from model.chat import Dialogue, encode_content, encode_prompt
from model.config import ModelConfig
from model.llama import Transformer
from model.tokenizer import Tokenizer


class ScoreHead(nn.Linear):
    """D -> 1, no bias (HF's `score`). Zero-initialised: every response starts at reward 0, so the
    first updates are driven by the chat model's features rather than by a random projection of
    them that would rank pairs arbitrarily; the trunk receives gradient from the second step on.
    Zeroing happens in reset_parameters, which nn.Linear calls inside __init__, i.e. before
    DeepSpeed's zero.Init partitions the weight (an init applied afterwards would be lost)."""

    def __init__(self, dim: int):
        super().__init__(dim, 1, bias=False)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)


class RewardModel(Transformer):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        del self.output  # the LM head: a V x D matrix a reward model neither uses nor trains
        self.score = ScoreHead(cfg.dim)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """tokens [N, T] right-padded, lengths [N] (default: T) -> rewards [N] (fp32)."""
        h = super().forward(tokens, return_hidden=True)  # [N, T, D], plain causal attention
        if lengths is None:
            last = h[:, -1]
        else:
            last = h[torch.arange(h.shape[0], device=h.device), lengths.long() - 1]  # [N, D]
        return self.score(last).squeeze(-1).float()


def encode_example(tok: Tokenizer, prompt: Dialogue, response: str, seq_len: int) -> tuple[list[int], bool]:
    """Chat-formatted prompt (all earlier turns) + response + </s> -> (ids, truncated). Too long
    sequences keep their END (what the head reads and what differs between chosen and rejected),
    dropping the oldest prompt tokens."""
    ids = encode_prompt(tok, prompt) + encode_content(tok, response) + [tok.eos_id]
    return (ids[-seq_len:], True) if len(ids) > seq_len else (ids, False)


def pad_right(seqs: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of ids -> (tokens [N, max_len] right-padded with pad_id, lengths [N])."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    tokens = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return tokens, lengths


@torch.no_grad()
def score_sequences(model: RewardModel, seqs: list, pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """Rewards [N] of token sequences, in batches of similar lengths (less padding)."""
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.empty(len(seqs))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        tokens, lengths = pad_right([seqs[i] for i in idx], pad_id)
        out[idx] = model(tokens, lengths).cpu()
    return out


def load_reward_model(cfg: ModelConfig, weights: str | Path) -> RewardModel:
    from model.weights import load_state_dict

    model = RewardModel(cfg)
    model.load_state_dict(load_state_dict(weights))
    return model.eval()


def hf_name(name: str) -> str:
    from model.hf import to_hf_name

    return "score.weight" if name == "score.weight" else to_hf_name(name)


def export_hf_reward(weights: str | Path, cfg: ModelConfig, out_dir: str | Path, tokenizer_dir: str | Path,
                     pad_id: int, dtype: torch.dtype = torch.float32) -> Path:
    """Write `out_dir` as a `LlamaForSequenceClassification` checkpoint (num_labels=1) that TRL and
    OpenRLHF load: config.json, safetensors (sharded like HF above 5 GiB, one tensor in memory at
    a time) and the tokenizer files of the chat model's HF export `tokenizer_dir`."""
    from model.hf import hf_config
    from model.weights import DEFAULT_SHARD_BYTES, ShardedWriter, WeightsReader

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(out, DEFAULT_SHARD_BYTES, dtype=dtype)
    with WeightsReader(weights) as reader:
        for name, tensor in reader.items():
            writer.add(hf_name(name), tensor)
    writer.close()
    src = Path(tokenizer_dir)
    for f in src.iterdir():  # tokenizer.model, tokenizer_config.json, chat template, ...
        if f.is_file() and not f.name.startswith(("model", "config.json", "generation_config")):
            shutil.copyfile(f, out / f.name)
    bos_eos = json.loads((src / "config.json").read_text()) if (src / "config.json").exists() else {}
    config = hf_config(cfg, bos_eos.get("bos_token_id", 1), bos_eos.get("eos_token_id", 2), pad_id)
    config.update(architectures=["LlamaForSequenceClassification"], num_labels=1,
                  id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, problem_type="regression",
                  torch_dtype=str(dtype).removeprefix("torch."))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
