"""Pretraining throughput: our model + engine vs transformers' LlamaForCausalLM + DeepSpeed ZeRO-3.

Both run through the SAME inner step (steps/engine/worker.py: build_engine + train_step, no
Ray) with the same DeepSpeed ZeRO-3 config, optimizer, sequence length, batch and precision;
only the module and its loss differ. Where DeepSpeed is not installed (the lent GPU machine has
no DeepSpeed) both run the same plain PyTorch step instead: the model in the benchmark's
precision, fused AdamW, activation checkpointing on CUDA (`--engine torch` forces it).
Ours: run-time kernels (SDPA flash attention, Liger RMSNorm/SwiGLU/RoPE and fused linear +
cross-entropy on CUDA when installed; the chunked CE on CPU). Theirs: LlamaForCausalLM with
`labels` (its own loss, SDPA attention).

    python benchmarks/pretrain_throughput.py --device cpu     # tiny config, ~1-2 minutes
    python benchmarks/pretrain_throughput.py --device cuda    # ~1B model, seq 4096, bf16

Prints tokens/s, MFU (on CUDA only: a CPU has no known peak) and peak memory of both, and the
ratio ours / HF, each figure also as one `FIGURE name value` line for scripts/gpu_check.sh.
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
                 steps=10, warmup=3),  # ~0.2 s a step on an H100: fits scripts/gpu_check.sh's budget
}


def ours_module(cfg: ModelConfig):
    from model.llama import Transformer

    return Transformer(cfg)  # initialised in construction


def hf_module(cfg: ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.llama import ffn_hidden_dim

    hc = LlamaConfig(hidden_size=cfg.dim, intermediate_size=ffn_hidden_dim(cfg), num_hidden_layers=cfg.n_layers,
                     num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads or cfg.n_heads,
                     vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                     tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(hc)


def ours_loss(module, batch):
    """(sum of token losses, metrics): the engine's Objective contract."""
    loss_sum, _ = module(batch["inputs"], targets=batch["targets"])
    return loss_sum, {}


def hf_loss(module, batch):
    out = module(input_ids=batch["inputs"], labels=batch["inputs"])  # HF shifts the labels itself
    return out.loss * (batch["inputs"].shape[1] - 1) * batch["inputs"].shape[0], {}


def collate(rows):
    tokens = torch.as_tensor(rows["tokens"])
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def deepspeed_step(name, build, loss, spec, device):
    """build_engine + train_step: the engine's inner step, exactly as training runs it."""
    from steps.engine.objective import Objective
    from steps.engine.worker import build_engine, train_step

    use_gpu = device == "cuda"
    tcfg = TrainConfig(num_workers=1, use_gpu=use_gpu, global_batch_size=spec["micro"], micro_batch_size=spec["micro"],
                       zero_stage=3, precision=spec["precision"], activation_checkpointing=use_gpu)
    obj = Objective(name=name, build_module=partial(build, spec["model"]), loss=loss, train_files=[],
                    columns=["tokens"], collate=collate)
    engine = build_engine(obj, tcfg, OptimConfig(lr=1e-4, warmup_steps=0), total_steps=1000, world=1, accum=1)
    if use_gpu and hasattr(engine.module, "gradient_checkpointing_enable"):
        engine.module.gradient_checkpointing_enable()
    params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    return (lambda rows: train_step(engine, [rows], obj)), params


def torch_step(name, build, loss, spec, device):
    """The same step without DeepSpeed: model in the benchmark's precision, fused AdamW."""
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    with torch.device(device):  # initialised where it lives (seconds for 1B parameters on a GPU)
        module = build(spec["model"])
    module = module.to(dtype=dtype).train()
    if device == "cuda":  # activation checkpointing, as the DeepSpeed path sets it
        if hasattr(module, "gradient_checkpointing_enable"):
            module.gradient_checkpointing_enable()
        else:
            module.checkpoint_layers = True
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device == "cuda")

    def step(rows):
        batch = {k: v.to(device) for k, v in collate(rows).items()}
        loss_sum, _ = loss(module, batch)
        (loss_sum / float((batch["targets"] != -100).sum())).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in module.parameters())


def measure(name, build, loss, spec, device, engine: str) -> dict:
    from model.flops import flops_per_token, mfu

    cfg: ModelConfig = spec["model"]
    use_gpu = device == "cuda"
    torch.manual_seed(0)
    step, n = (deepspeed_step if engine == "deepspeed" else torch_step)(name, build, loss, spec, device)
    if use_gpu:
        torch.cuda.reset_peak_memory_stats()
    rows = {"tokens": torch.randint(0, cfg.vocab_size, (spec["micro"], spec["seq"] + 1)).numpy()}
    for _ in range(spec["warmup"]):
        step(rows)
    if use_gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(spec["steps"]):
        step(rows)
    if use_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens_per_s = spec["steps"] * spec["micro"] * spec["seq"] / seconds
    fpt = flops_per_token(n - cfg.vocab_size * cfg.dim, cfg.n_layers, spec["seq"], cfg.dim)
    peak = torch.cuda.max_memory_allocated() / 2**30 if use_gpu else _rss_gb()
    out = {"tokens_per_s": tokens_per_s, "mfu": mfu(tokens_per_s, fpt, use_gpu) if use_gpu else None,
           "peak_gb": peak}
    del step
    if use_gpu:
        torch.cuda.empty_cache()
    return out


def _rss_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def loader_rows_per_s(seq: int, micro: int, data_bytes: int = 64 << 20) -> tuple[float, int]:
    """The engine's streaming loader (steps/engine/data.py RowSource) alone: rows/s of micro-
    batches drawn from a token Parquet of ~data_bytes (row groups of 256 rows, as many steps as
    one epoch holds, at most 400). Returns (rows/s, rows read)."""
    import tempfile

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from steps.engine.data import RowSource

    rows = max(4 * micro, data_bytes // (4 * (seq + 1)))
    values = np.random.default_rng(0).integers(0, 32000, rows * (seq + 1), dtype=np.int32)
    tokens = pa.ListArray.from_arrays(pa.array(np.arange(0, rows * (seq + 1) + 1, seq + 1, dtype=np.int32)),
                                      pa.array(values))
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/tokens.parquet"
        pq.write_table(pa.table({"tokens": tokens}), path, row_group_size=256)
        src = RowSource([path], ["tokens"], seed=0, global_batch=micro, micro_batch=micro, world=1)
        steps = min(src.steps_per_epoch, 400)
        start = time.perf_counter()
        for step in range(steps):
            src.micro_batches(step, 0)
        return steps * micro / (time.perf_counter() - start), steps * micro


def have_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--engine", choices=["auto", "deepspeed", "torch"], default="auto",
                   help="auto: DeepSpeed ZeRO-3 where installed, else the plain PyTorch step")
    args = p.parse_args()
    if args.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    engine = args.engine if args.engine != "auto" else ("deepspeed" if have_deepspeed() else "torch")
    if engine == "deepspeed":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"),
                          RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if args.device == "cuda" else "gloo")
    else:
        print("engine: plain PyTorch step (DeepSpeed not installed)" if args.engine == "auto"
              else "engine: plain PyTorch step (--engine torch)")
    spec = CONFIGS[args.device]
    results = {"ours": measure("ours", ours_module, ours_loss, spec, args.device, engine),
               "hf": measure("hf", hf_module, hf_loss, spec, args.device, engine)}
    cfg = spec["model"]
    where = "ZeRO-3" if engine == "deepspeed" else "plain torch"
    print(f"\nmodel dim={cfg.dim} layers={cfg.n_layers} heads={cfg.n_heads}/{cfg.n_kv_heads} vocab={cfg.vocab_size} "
          f"seq={spec['seq']} micro-batch={spec['micro']} {spec['precision']} {where}, device={args.device}")
    print(f"{'':14} {'tokens/s':>10} {'MFU':>7} {'peak GB':>8}")
    for name, r in results.items():
        mfu_text = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"{name:14} {r['tokens_per_s']:>10.0f} {mfu_text:>7} {r['peak_gb']:>8.2f}")
    ratio = results["ours"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
    print(f"ratio ours / hf: {ratio:.2f}x tokens/s")
    tag = f"pretrain.{args.device}.{engine}"
    for name, r in results.items():
        print(f"FIGURE {tag}.{name}.tokens_per_s {r['tokens_per_s']:.0f}")
        if r["mfu"] is not None:
            print(f"FIGURE {tag}.{name}.mfu {r['mfu']:.4f}")
        print(f"FIGURE {tag}.{name}.peak_gb {r['peak_gb']:.2f}")
    print(f"FIGURE {tag}.ratio_ours_over_hf {ratio:.3f}")
    rows_per_s, n = loader_rows_per_s(spec["seq"], spec["micro"])
    needed = results["ours"]["tokens_per_s"] / spec["seq"]
    print(f"loader: {rows_per_s:.0f} rows/s of {spec['seq'] + 1} tokens ({n} rows, one process); "
          f"the model step above consumes {needed:.1f} rows/s")
    print(f"FIGURE pretrain.{args.device}.loader_rows_per_s {rows_per_s:.0f}")


if __name__ == "__main__":
    main()
