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
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
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
    p.add_argument("--artifacts", default=None, help="a finished pipeline's output root (its sft/ chat model, "
                   "V1 reward models and prefs_v1 prompts) for the best-of-K comparison; default: random weights")
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
    best_of_k(args, spec)  # last: its ratio is the script's last line


def random_artifacts(root: Path, cfg: ModelConfig, dtype) -> Path:
    """A pipeline-like output root with random weights (sft/x: a chat model with its hf/ export;
    rm_helpfulness_v1/x, rm_safety_v1/x: reward models) on a tokenizer trained here on seeded
    random words, for machines without a finished pipeline run."""
    import random
    import string

    from safetensors.torch import save_file

    from model.hf import export_hf
    from model.llama import Transformer
    from model.reward import RewardModel
    from model.tokenizer import Tokenizer

    rng = random.Random(0)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9))) for _ in range(20000)]
    tok = Tokenizer.train((" ".join(rng.choice(words) for _ in range(12)) for _ in range(40000)), root / "tok",
                          cfg.vocab_size)
    torch.manual_seed(0)
    for name, cls in (("sft", Transformer), ("rm_helpfulness_v1", RewardModel), ("rm_safety_v1", RewardModel)):
        d = root / name / "x"
        (d / "hf").mkdir(parents=True)
        m = cls(cfg)
        if cls is RewardModel:
            torch.nn.init.normal_(m.score.weight, std=0.02)
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(d / "model.safetensors"))
        (d / "model_config.json").write_text(cfg.model_dump_json())
        if cls is Transformer:
            export_hf(d / "model.safetensors", cfg, d / "hf", tokenizer_model=tok.model_path, dtype=dtype)
        else:
            shutil.copyfile(tok.model_path, d / "hf" / "tokenizer.model")
    return root


def best_of_k(args, spec) -> None:
    """Best of K as rs_v{i} runs it (steps/rejection.py: K samples per prompt from the shared-
    prefill sampler, then both reward models score every sample) against transformers'
    generate(num_return_sequences=K) plus the same scoring; same weights (the chat model's hf/
    export on both sides), prompts, K, max_new_tokens, temperature and top-p; EOS off on both
    sides, so both generate the same number of tokens (checked)."""
    import glob

    from transformers import LlamaForCausalLM

    from model.chat import Dialogue, Turn, encode_prompt
    from model.generate import SamplingParams, TorchSampler
    from steps.rejection import RewardScorer, load_sampling_model, prompts_of, sample_answers, to_dialogue

    dtype = spec["dtype"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.artifacts) if args.artifacts else random_artifacts(Path(tmp), spec["model"], dtype)
        one = lambda pattern: Path(sorted(glob.glob(str(root / pattern)))[0])  # noqa: E731
        policy_hf, rm_dirs = one("sft/*") / "hf", {a: one(f"rm_{a}_v1/*") for a in ("helpfulness", "safety")}
        ours, tok = load_sampling_model(policy_hf)  # the HF export, read by our importer
        ours = ours.to(device=args.device, dtype=dtype)
        try:
            hf = LlamaForCausalLM.from_pretrained(policy_hf, dtype=dtype)
        except TypeError:  # transformers before `dtype=`
            hf = LlamaForCausalLM.from_pretrained(policy_hf, torch_dtype=dtype)
        hf = hf.to(args.device).eval()
        scorers = {a: RewardScorer(d, tok) for a, d in rm_dirs.items()}
        prefs = sorted(glob.glob(str(root / "prefs_v1/*/pairs.parquet")))
        if prefs:  # the step's own prompts
            import pyarrow.parquet as pq

            dialogues = [to_dialogue(t) for _, t, _ in prompts_of(pq.read_table(prefs[0]), spec["prompts"], 0)]
        else:
            words = [tok.decode([i]) for i in range(300, 300 + spec["prompt_len"])]
            dialogues = [Dialogue([Turn("user", " ".join(words[j:] + words[:j]))]) for j in range(spec["prompts"])]
    K, new = spec["k"], spec["new"]
    params = SamplingParams(max_new_tokens=new, temperature=1.0, top_p=1.0, num_samples=K, seed=0)
    no_eos = spec["model"].vocab_size + 10
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def score(answers):
        return {a: s.probs(dialogues, answers, K) for a, s in scorers.items()}

    def run_ours():
        answers, tokens = sample_answers(TorchSampler(ours, no_eos, tok.pad_id, args.device), tok, dialogues, params,
                                         len(dialogues))
        return answers, tokens, score(answers)

    def run_hf():
        ids = [encode_prompt(tok, d) for d in dialogues]
        width = max(map(len, ids))
        inp = torch.tensor([[tok.pad_id] * (width - len(x)) + x for x in ids], device=args.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=args.device)
        with torch.no_grad():
            out = hf.generate(inp, attention_mask=mask, do_sample=True, temperature=params.temperature, top_p=1.0,
                              top_k=0, num_return_sequences=K, max_new_tokens=new, min_new_tokens=new,
                              eos_token_id=None, pad_token_id=tok.pad_id)
        gen = out[:, width:].cpu()
        texts = [tok.decode(row.tolist()).strip() for row in gen]
        answers = [texts[i * K:(i + 1) * K] for i in range(len(dialogues))]
        return answers, gen.numel(), score(answers)

    seconds, counts = {}, {}
    for name, fn in (("ours", run_ours), ("transformers", run_hf)):
        fn()  # warm-up
        sync()
        start = time.perf_counter()
        answers, tokens, probs = fn()
        sync()
        seconds[name] = time.perf_counter() - start
        counts[name] = (sum(map(len, answers)), tokens, int(sum(np.isfinite(p).sum() for p in probs.values())))
    assert counts["ours"] == counts["transformers"], f"unequal work: {counts}"
    samples, tokens, scored = counts["ours"]
    print(f"best of K={K}, rejection-sampling path: {len(dialogues)} prompts x {K} samples x {new} tokens "
          f"({samples} samples, {tokens} tokens, {scored} RM scores per side), weights {policy_hf}")
    for name, s in seconds.items():
        print(f"{name:14} {s:8.2f} s sampling + scoring   {tokens / s:10.0f} generated tokens/s")
    ratio = seconds["transformers"] / seconds["ours"]
    print(f"FIGURE generation.{args.device}.best_of_k.ours_s {seconds['ours']:.3f}")
    print(f"FIGURE generation.{args.device}.best_of_k.transformers_s {seconds['transformers']:.3f}")
    print(f"FIGURE generation.{args.device}.best_of_k.ratio_ours_over_transformers {ratio:.3f}")
    print(f"best-of-K ratio ours / transformers (sampling + scoring, time): {ratio:.2f}x")


if __name__ == "__main__":
    main()
