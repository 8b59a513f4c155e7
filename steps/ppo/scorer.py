"""The scorer, a Ray actor: the reference policy's log-probs and both reward models' probabilities.

The reference is the model the PPO run started from (rs_v{i}, the rejection-sampling
checkpoint of the same iteration), frozen. Not the SFT model: the KL term would then charge PPO
for everything rejection sampling already moved, and grow from iteration to iteration; anchored
at rs_v{i}, beta * KL measures exactly how far this PPO run drifts from where it began, which is
the paper's pi_0 (the policy PPO starts from).

Rewards: the response is scored as the reward models were trained and as rejection sampling
scores it, prompt + the answer's text + </s> (also when the sampler stopped at max_new_tokens),
right-padded, the head reading the last real token (model/reward.py). Both come back as probabilities (sigmoid of the score) for the
gate of steps/gated_reward.py, shared with rejection sampling.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model.config import ModelConfig


class Scorer:
    def __init__(self, reference_dir: str, rm_dirs: dict[str, str], device: str | None = None):
        from model.generate import load_model
        from model.reward import load_reward_model
        from steps.sft import load_chat_model

        torch.set_num_threads(max(1, torch.get_num_threads()))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        mcfg, self.tok = load_chat_model(Path(reference_dir))
        self.reference = load_model(mcfg, Path(reference_dir) / "model.safetensors", device=self.device)
        self.rms = {}
        for axis, d in rm_dirs.items():
            cfg = ModelConfig.model_validate_json((Path(d) / "model_config.json").read_text())
            self.rms[axis] = load_reward_model(cfg, Path(d)).to(self.device)

    @torch.no_grad()
    def score(self, tokens: np.ndarray, lengths: np.ndarray, prompt_lengths: np.ndarray,
              batch_size: int = 64) -> dict[str, np.ndarray]:
        """tokens [B, W] right-padded prompt + response, lengths [B] real tokens per row,
        prompt_lengths [B] -> {"ref_logp": [B, W-1] log pi_ref(token t+1), "<axis>": [B] reward
        probability}."""
        from model.chat import encode_content
        from model.reward import pad_right
        from steps.gated_reward import sigmoid

        out = {"ref_logp": np.zeros((tokens.shape[0], tokens.shape[1] - 1), dtype=np.float32)}
        for s in range(0, len(tokens), batch_size):
            t = torch.tensor(tokens[s:s + batch_size], device=self.device)
            logits = self.reference(t)[:, :-1].float()
            out["ref_logp"][s:s + batch_size] = logits.log_softmax(-1).gather(-1, t[:, 1:, None]).squeeze(-1).cpu()
        # the reward models read what they were trained on (model/reward.py encode_example):
        # prompt + the answer's stripped text re-encoded + </s>. The sampled ids differ from that
        # at the end: the chat format puts a space before </s>, which the model samples and the
        # RMs never saw (scoring the raw ids lowered Rc from 0.39 to 0.16 on the V4 model).
        eos = self.tok.eos_id
        seqs = []
        for row, n, p in zip(tokens, lengths, prompt_lengths):
            answer = self.tok.decode([t for t in row[p:n].tolist() if t != eos]).strip()
            seqs.append(row[:p].tolist() + encode_content(self.tok, answer) + [eos])
        for axis, rm in self.rms.items():
            limit = rm.cfg.max_seq_len  # too long: keep the end, what the head reads (model/reward.py)
            scores = np.zeros(len(seqs))
            for s in range(0, len(seqs), batch_size):
                t, n = pad_right([q[-limit:] for q in seqs[s:s + batch_size]], self.tok.pad_id)
                scores[s:s + batch_size] = rm(t.to(self.device), n.to(self.device)).cpu().numpy()
            out[axis] = sigmoid(scores)
        return out
