"""Pretraining throughput: our model + engine vs transformers' LlamaForCausalLM + DeepSpeed ZeRO-3.

Both run through the SAME inner step (steps/engine/worker.py: build_engine + train_step, no
Ray) with the same DeepSpeed ZeRO-3 config, optimizer, sequence length, batch and precision;
only the module and its loss differ. Ours: run-time kernels (SDPA flash attention, Liger
RMSNorm/SwiGLU/RoPE and fused linear + cross-entropy on CUDA when installed; the chunked CE on
CPU). Theirs: LlamaForCausalLM with `labels` (its own loss, SDPA attention).

    python benchmarks/pretrain_throughput.py --device cpu     # tiny config, ~1-2 minutes
    python benchmarks/pretrain_throughput.py --device cuda    # ~1B model, seq 4096, bf16

Prints tokens/s, MFU and peak memory of both, and the ratio ours / HF.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from model.config import ModelConfig  # noqa: E402
from steps.engine.config import OptimConfig, TrainConfig  # noqa: E402

CONFIGS = {
    "cpu": dict(model=ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=8000, multiple_of=64,
                                  max_seq_len=256), seq=256, micro=4, precision="fp32", steps=15, warmup=3),
    "cuda": dict(model=ModelConfig(dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, vocab_size=32000,
                                   multiple_of=256, max_seq_len=4096), seq=4096, micro=2, precision="bf16",
                 steps=20, warmup=5),
}


def ours_module(cfg: ModelConfig):
    from model.llama import Transformer

    m = Transformer(cfg)
    m.init_weights()
    return m


def hf_module(cfg: ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.llama import ffn_hidden_dim

    hc = LlamaConfig(hidden_size=cfg.dim, intermediate_size=ffn_hidden_dim(cfg), num_hidden_layers=cfg.n_layers,
                     num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads or cfg.n_heads,
                     vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                     tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(hc)


def ours_loss(module, batch):
    from model.llama import lm_loss

    loss, n = lm_loss(module, batch["inputs"], batch["targets"])
    return loss, {"tokens": float(n)}


def hf_loss(module, batch):
    out = module(input_ids=batch["inputs"], labels=batch["inputs"])
    return out.loss, {"tokens": float(batch["inputs"].numel())}


def collate(rows):
    tokens = torch.as_tensor(rows["tokens"])
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def measure(name, build, loss, spec, device) -> dict:
    from steps.engine.objective import Objective
    from steps.engine.worker import build_engine, memory_gb, train_step

    cfg: ModelConfig = spec["model"]
    use_gpu = device == "cuda"
    tcfg = TrainConfig(num_workers=1, use_gpu=use_gpu, global_batch_size=spec["micro"], micro_batch_size=spec["micro"],
                       zero_stage=3, precision=spec["precision"], activation_checkpointing=use_gpu)
    obj = Objective(name=name, build_module=partial(build, cfg), loss=loss, train_files=[], columns=["tokens"],
                    collate=collate)
    torch.manual_seed(0)
    engine = build_engine(obj, tcfg, OptimConfig(lr=1e-4, warmup_steps=0), total_steps=1000, world=1, accum=1)
    if use_gpu:
        torch.cuda.reset_peak_memory_stats()
        if hasattr(engine.module, "gradient_checkpointing_enable"):
            engine.module.gradient_checkpointing_enable()
    rows = {"tokens": torch.randint(0, cfg.vocab_size, (spec["micro"], spec["seq"] + 1)).numpy()}
    for _ in range(spec["warmup"]):
        train_step(engine, [rows], obj)
    if use_gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(spec["steps"]):
        train_step(engine, [rows], obj)
    if use_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens_per_s = spec["steps"] * spec["micro"] * spec["seq"] / seconds
    from model.flops import flops_per_token, mfu

    n = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    n_emb = cfg.vocab_size * cfg.dim
    fpt = flops_per_token(n - n_emb, cfg.n_layers, spec["seq"], cfg.dim)
    out = {"tokens_per_s": tokens_per_s, "mfu": mfu(tokens_per_s, fpt, use_gpu), "peak_gb": memory_gb(use_gpu)}
    del engine
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if args.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if args.device == "cuda" else "gloo")
    spec = CONFIGS[args.device]
    results = {"ours": measure("ours", ours_module, ours_loss, spec, args.device),
               "hf+deepspeed": measure("hf", hf_module, hf_loss, spec, args.device)}
    cfg = spec["model"]
    print(f"\nmodel dim={cfg.dim} layers={cfg.n_layers} heads={cfg.n_heads}/{cfg.n_kv_heads} vocab={cfg.vocab_size} "
          f"seq={spec['seq']} micro-batch={spec['micro']} {spec['precision']} ZeRO-3, device={args.device}")
    print(f"{'':14} {'tokens/s':>10} {'MFU':>7} {'peak GB':>8}")
    for name, r in results.items():
        print(f"{name:14} {r['tokens_per_s']:>10.0f} {r['mfu']:>7.1%} {r['peak_gb']:>8.2f}")
    ratio = results["ours"]["tokens_per_s"] / results["hf+deepspeed"]["tokens_per_s"]
    print(f"ratio ours / hf+deepspeed: {ratio:.2f}x tokens/s")


if __name__ == "__main__":
    main()
