"""Batched sampling with a KV cache: K samples per prompt, temperature, top-p, EOS, seeded.

`TorchSampler` is plain PyTorch: prompts are left-padded into one batch, prefilled once, the
cache is repeated K times, and one token per row is decoded per step; rows stop at EOS
independently. Sampling is batch-invariant: each (prompt, sample) stream has its own generator
seeded from (seed, prompt index, sample index), so K samples from one shared prefill equal K
independent single-sample generations with those seeds, whatever the batch they ran in. It holds the whole model on one device: `load_model` builds it there directly
(meta device, then tensor by tensor from the safetensors in the target dtype), so a model that
fits one GPU in bf16 never exists in fp32 on the host. `VLLMSampler` puts vLLM behind the same
interface for models that need tensor parallelism or serving-grade throughput (it loads the
Hugging Face export; vLLM has no CPU build and is imported lazily). `generate_uncached`
recomputes the whole sequence every step: the reference the cached path is tested against.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import ModelConfig
from model.llama import KVCache, Transformer


def default_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """CUDA in bf16 where there is a GPU, else CPU in fp32 (unless given)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def load_model(cfg: ModelConfig, weights: str | Path, device=None, dtype=None) -> Transformer:
    """Our model for inference, built directly on `device` in `dtype` (default_device_dtype):
    constructed on the meta device (no memory, no init), then each tensor read from `weights`
    (a safetensors file, index or directory) straight into its place."""
    from model.weights import load_into

    device, dtype = default_device_dtype(device, dtype)
    with torch.device("meta"):
        model = Transformer(cfg)
    return load_into(model, weights, device=device, dtype=dtype).eval()


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    num_samples: int = 1  # K answers per prompt
    seed: int = 0


@dataclass
class Sample:
    prompt_index: int
    sample_index: int
    tokens: list[int]  # generated ids, EOS excluded
    logprobs: list[float]  # log-probability of each generated token under the sampling policy's model
    finished: bool  # stopped at EOS (else at max_new_tokens)


def stream_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of one (prompt, sample) stream: a hash of the three, so streams are independent
    of each other and of which other prompts share the batch."""
    digest = hashlib.blake2b(f"{seed}/{prompt_index}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def stream_uniforms(seed: int, num_prompts: int, num_samples: int, steps: int, first_index: int = 0,
                    first_sample: int = 0) -> torch.Tensor:
    """[num_prompts * num_samples, steps] uniforms in [0, 1): row (i, k) drawn from its own
    torch.Generator seeded by stream_seed(seed, first_index + i, first_sample + k). One uniform per decoding
    step decides that row's token, so a row's tokens depend only on its prompt, its seeds and
    the model, never on the batch it was decoded in (batch size, padding, K, chunking)."""
    out = torch.empty(num_prompts * num_samples, steps)
    for i in range(num_prompts):
        for k in range(num_samples):
            gen = torch.Generator().manual_seed(stream_seed(seed, first_index + i, first_sample + k))
            out[i * num_samples + k] = torch.rand(steps, generator=gen)
    return out


def next_token(logits: torch.Tensor, p: SamplingParams, uniforms: torch.Tensor) -> torch.Tensor:
    """logits [N, V], one uniform per row [N] -> sampled ids [N] (greedy at temperature 0;
    nucleus filtering by top_p). Inverse-CDF sampling: row r takes the first token whose
    cumulative probability exceeds uniforms[r], so each row's draw uses its own stream only."""
    if p.temperature == 0:
        return logits.argmax(-1)
    probs = (logits / p.temperature).softmax(-1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < p.top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    cdf = probs.cumsum(-1)
    # right=True: a zero-probability token (cdf equal to its predecessor's) is never chosen
    target = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)


class TorchSampler:
    def __init__(self, model: Transformer, eos_id: int, pad_id: int, device: str | torch.device | None = None):
        self.model = model.eval()
        self.eos_id, self.pad_id = eos_id, pad_id
        self.device = torch.device(device) if device is not None else next(model.parameters()).device

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], p: SamplingParams, first_index: int = 0,
                 first_sample: int = 0) -> list[Sample]:
        """K samples per prompt. Sample (i, k) draws from stream (first_index + i, first_sample + k)
        (stream_uniforms): a caller that splits its prompts into chunks passes each chunk's offset
        and gets the samples of one call over the whole list; one sample with first_sample=k is
        the k-th of K. Sample.prompt_index / sample_index stay local to this call."""
        if not prompts:
            return []
        B, K = len(prompts), p.num_samples
        width = max(map(len, prompts))
        tokens = torch.full((B, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(B, width + p.max_new_tokens, dtype=torch.bool)
        for i, ids in enumerate(prompts):  # left padding: every prompt ends at column width-1
            tokens[i, width - len(ids):] = torch.tensor(ids)
            mask[i, width - len(ids):] = True
        mask[:, width:] = True
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        padded = any(len(ids) < width for ids in prompts)  # no padding: no mask (faster kernels)
        tokens, mask, positions = tokens.to(self.device), mask.to(self.device), positions.to(self.device)
        dtype = next(self.model.parameters()).dtype
        cache = KVCache.allocate(self.model.cfg, B, width + p.max_new_tokens, self.device, dtype)
        logits = self.model(tokens, positions=positions[:, :width], kv_cache=cache,
                            attention_mask=mask[:, :width] if padded else None)
        # one prefill per prompt, then K independent continuations
        cache = cache.repeat_interleave(K)
        last = logits[:, -1].repeat_interleave(K, 0)  # [B*K, V]
        mask, positions = mask.repeat_interleave(K, 0), positions.repeat_interleave(K, 0)
        # sampling stays on the model's device: no [B*K, V] logits cross to the host per step
        dev = self.device
        # one uniform per (row, step), from the row's own stream; drawn on the host once (cheap)
        uniforms = stream_uniforms(p.seed, B, K, p.max_new_tokens, first_index, first_sample).to(dev) \
            if p.temperature > 0 else torch.zeros(B * K, p.max_new_tokens, device=dev)
        out = torch.full((B * K, p.max_new_tokens), self.pad_id, dtype=torch.long, device=dev)
        logps = torch.zeros(B * K, p.max_new_tokens, device=dev)
        done = torch.zeros(B * K, dtype=torch.bool, device=dev)
        lengths = torch.full((B * K,), p.max_new_tokens, device=dev)
        for t in range(p.max_new_tokens):
            logits = last.float()
            nxt = next_token(logits, p, uniforms[:, t])
            logps[:, t] = logits.log_softmax(-1).gather(1, nxt[:, None]).squeeze(1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            out[:, t] = nxt
            newly = (nxt == self.eos_id) & ~done
            lengths[newly] = t
            done |= newly
            if bool(done.all()) or t == p.max_new_tokens - 1:
                break
            col = width + t
            last = self.model(nxt[:, None], positions=positions[:, col:col + 1], kv_cache=cache,
                              attention_mask=mask[:, :col + 1] if padded else None)[:, -1]
        return _samples(out.cpu(), logps.cpu(), lengths.cpu(), done.cpu(), K)


def _samples(out, logps, lengths, done, K) -> list[Sample]:
    res = []
    for r in range(out.shape[0]):
        n = int(lengths[r])
        res.append(Sample(r // K, r % K, out[r, :n].tolist(), logps[r, :n].tolist(), bool(done[r])))
    return res


@torch.no_grad()
def generate_uncached(model: Transformer, prompts: list[list[int]], p: SamplingParams, eos_id: int,
                      pad_id: int) -> list[Sample]:
    """Reference: every step re-runs the full (unpadded) sequence of every row."""
    K = p.num_samples
    uniforms = stream_uniforms(p.seed, len(prompts), K, p.max_new_tokens)
    seqs = [list(ids) for ids in prompts for _ in range(K)]
    out = torch.full((len(seqs), p.max_new_tokens), pad_id, dtype=torch.long)
    logps = torch.zeros(len(seqs), p.max_new_tokens)
    done = torch.zeros(len(seqs), dtype=torch.bool)
    lengths = torch.full((len(seqs),), p.max_new_tokens)
    for t in range(p.max_new_tokens):
        last = torch.stack([model(torch.tensor([s]))[0, -1] for s in seqs])
        nxt = next_token(last.float(), p, uniforms[:, t])
        logps[:, t] = last.float().log_softmax(-1).gather(1, nxt[:, None]).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out[:, t] = nxt
        newly = (nxt == eos_id) & ~done
        lengths[newly] = t
        done |= newly
        for s, x in zip(seqs, nxt.tolist()):
            s.append(x)
        if bool(done.all()):
            break
    return _samples(out, logps, lengths, done, K)


class VLLMSampler:
    """vLLM behind the same interface, for models too big for one GPU's TorchSampler.

    It loads an HF export directory (model/hf.py: sharded safetensors, config, tokenizer with
    the chat template) and shards the model over `tensor_parallel_size` GPUs of one node.
    Limits, stated rather than hidden:
      - vLLM is not a CPU requirement: it ships CUDA wheels only and pins its own torch, which
        conflicts with requirements.txt's. It must come with the GPU image (infra/docker/) and
        is imported here lazily; without it the constructor raises ImportError.
      - untested in CI (no GPU there); the tested reference is TorchSampler, whose greedy output
        it should match up to bf16 kernel differences. Sampled tokens differ from TorchSampler's
        for the same seed (different RNG streams).
      - logprobs are vLLM's raw-logit log-probabilities (before temperature / top-p), as ours.
      - prompts are token ids (the chat format is encoded by model/chat.py), so vLLM's own chat
        template handling is not involved.
    """

    def __init__(self, hf_dir: str | Path, eos_id: int, tensor_parallel_size: int = 1, dtype: str = "bfloat16",
                 **engine_kw):
        try:
            from vllm import LLM  # lazy: GPU-only package, not in requirements.txt
        except ImportError as e:
            raise ImportError("VLLMSampler needs vLLM, which is installed only in the GPU image "
                              "(its torch pin conflicts with requirements.txt); use TorchSampler") from e

        self.llm = LLM(model=str(hf_dir), tokenizer=str(hf_dir), tensor_parallel_size=tensor_parallel_size,
                       dtype=dtype, **engine_kw)
        self.eos_id = eos_id

    def generate(self, prompts: list[list[int]], p: SamplingParams, first_index: int = 0,
                 first_sample: int = 0) -> list[Sample]:
        from vllm import SamplingParams as VParams
        from vllm.inputs import TokensPrompt

        # one seed per prompt (vLLM seeds each request's own generator): batch-invariant like ours,
        # though not the same streams
        params = [VParams(n=p.num_samples, temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_new_tokens,
                          seed=stream_seed(p.seed, first_index + i, first_sample) % 2**31, logprobs=0,
                          stop_token_ids=[self.eos_id]) for i in range(len(prompts))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params)
        res = []
        for i, o in enumerate(outputs):
            for k, c in enumerate(o.outputs):
                ids = [t for t in c.token_ids if t != self.eos_id]
                lps = [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs or [])][: len(ids)]
                res.append(Sample(i, k, ids, lps, c.finish_reason == "stop"))
        return res
