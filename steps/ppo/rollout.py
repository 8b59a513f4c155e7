"""The rollout sampler, a Ray actor (steps/ppo/launcher.py gives it its resources).

It holds the policy for generation: our KV-cached TorchSampler (model/generate.py) on CPU and
by default, or vLLM when `use_vllm` is set and vLLM is installed (GPU image only, imported
lazily; not measured on GPU). After each update the policy learner's gathered weights arrive
as a Ray object (numpy arrays in the shared-memory object store on one node) and are copied
into the sampler's model in place: no file is written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class RolloutSampler:
    def __init__(self, policy_dir: str, use_vllm: bool = False, vllm_kw: dict | None = None):
        from model.generate import TorchSampler
        from steps.sft import load_chat_model, load_model

        torch.set_num_threads(max(1, torch.get_num_threads()))
        mcfg, self.tok = load_chat_model(Path(policy_dir))
        self.vllm = None
        if use_vllm:
            from model.generate import VLLMSampler  # raises ImportError without vLLM

            self.vllm = VLLMSampler(Path(policy_dir) / "hf", self.tok.eos_id, **(vllm_kw or {}))
            return
        self.model = load_model(mcfg, Path(policy_dir) / "model.safetensors")
        self.sampler = TorchSampler(self.model, self.tok.eos_id, self.tok.pad_id)

    def generate(self, prompts: list[list[int]], params) -> list[tuple[list[int], list[float], bool]]:
        """(response ids with </s> appended when it ended, their log-probs, ended) per sample,
        prompt-major (prompt i's K samples at i*K .. i*K+K-1)."""
        eos = self.tok.eos_id
        samples = (self.vllm or self.sampler).generate(prompts, params)
        return [(s.tokens + ([eos] if s.finished else []), s.logprobs, s.finished) for s in samples]

    def load_weights(self, weights: dict[str, np.ndarray]) -> int:
        """Copy the learner's gathered weights into the sampling model; returns how many tensors."""
        if self.vllm is not None:  # vLLM takes HF names (not measured on GPU)
            from model.hf import to_hf_name

            model = self.vllm.llm.llm_engine.model_executor.driver_worker.model_runner.model
            model.load_weights([(to_hf_name(k), torch.as_tensor(v)) for k, v in weights.items()])
            return len(weights)
        params = dict(self.model.named_parameters())
        missing, unexpected = set(params) - set(weights), set(weights) - set(params)
        if missing or unexpected:  # e.g. a logit scale that was not folded into the output norm
            raise ValueError(f"the learner's weights do not match the sampler's model: missing "
                             f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(torch.tensor(weights[name], dtype=p.dtype))
        return len(params)
