"""K-sample generation throughput: our KV-cached batched sampler vs transformers' `generate`.

Same weights (our model exported with model/hf.py, then loaded both as LlamaForCausalLM and by
our own import, each built directly on the device in the benchmark's dtype), same prompts, K
samples per prompt, max_new_tokens, temperature and top-p, in the same process.
Both decode with a KV cache; ours prefills each prompt once and repeats its cache K times,
`generate(num_return_sequences=K)` prefills every copy. EOS is disabled on both sides so both
produce exactly max_new_tokens per sample (equal work).

    python benchmarks/generation.py --device cpu     # tiny model
    python benchmarks/generation.py --device cuda    # ~1B model, bf16

Each figure is also printed as one `FIGURE name value` line (scripts/gpu_check.sh collects them).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from model.config import ModelConfig  # noqa: E402

CONFIGS = {
    "cpu": dict(model=ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=8000, multiple_of=64,
                                  max_seq_len=512), prompts=8, prompt_len=64, k=4, new=64, dtype=torch.float32),
    "cuda": dict(model=ModelConfig(dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, vocab_size=32000,
                                   multiple_of=256, max_seq_len=4096), prompts=32, prompt_len=512, k=8, new=256,
                 dtype=torch.bfloat16),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    from transformers import LlamaForCausalLM

    from model.generate import SamplingParams, TorchSampler
    from model.hf import export_hf, import_hf
    from model.llama import Transformer

    spec = CONFIGS[args.device]
    cfg: ModelConfig = spec["model"]
    dtype = spec["dtype"]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        with torch.device(args.device):  # initialised where it is built (fast on a GPU)
            built = Transformer(cfg)
        export_hf(built, cfg, tmp, dtype=dtype)
        del built
        try:
            hf = LlamaForCausalLM.from_pretrained(tmp, dtype=dtype)
        except TypeError:  # transformers before `dtype=`
            hf = LlamaForCausalLM.from_pretrained(tmp, torch_dtype=dtype)
        hf = hf.to(device=args.device, dtype=dtype).eval()
        ours, _ = import_hf(tmp, device=args.device, dtype=dtype)  # meta device, tensor by tensor
    ours = ours.eval()
    no_eos = cfg.vocab_size + 10  # an id that is never sampled: every sample runs to max_new_tokens
    prompts = torch.randint(4, cfg.vocab_size, (spec["prompts"], spec["prompt_len"]))
    params = SamplingParams(max_new_tokens=spec["new"], temperature=0.8, top_p=0.95, num_samples=spec["k"], seed=0)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def run_ours():
        TorchSampler(ours, eos_id=no_eos, pad_id=0, device=args.device).generate(prompts.tolist(), params)

    def run_hf():
        with torch.no_grad():
            hf.generate(prompts.to(args.device), attention_mask=torch.ones_like(prompts).to(args.device),
                        do_sample=True, temperature=params.temperature, top_p=params.top_p,
                        num_return_sequences=params.num_samples, max_new_tokens=params.max_new_tokens,
                        min_new_tokens=params.max_new_tokens, eos_token_id=None, pad_token_id=0, top_k=0)

    results = {}
    for name, fn in (("ours", run_ours), ("transformers", run_hf)):
        fn()  # warm-up
        sync()
        start = time.perf_counter()
        fn()
        sync()
        seconds = time.perf_counter() - start
        results[name] = spec["prompts"] * spec["k"] * spec["new"] / seconds
    print(f"model dim={cfg.dim} layers={cfg.n_layers} vocab={cfg.vocab_size}; {spec['prompts']} prompts x "
          f"K={spec['k']} samples x {spec['new']} new tokens, prompt {spec['prompt_len']} tokens, device={args.device}")
    for name, tps in results.items():
        print(f"{name:14} {tps:10.0f} generated tokens/s")
    ratio = results["ours"] / results["transformers"]
    print(f"ratio ours / transformers: {ratio:.2f}x")
    for name, tps in results.items():
        print(f"FIGURE generation.{args.device}.{name}.tokens_per_s {tps:.0f}")
    print(f"FIGURE generation.{args.device}.ratio_ours_over_transformers {ratio:.3f}")


if __name__ == "__main__":
    main()
