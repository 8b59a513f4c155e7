"""Reward-model training throughput: ours (steps/reward.py's objective on the shared engine, as
the pipeline launches it: Ray Train + DeepSpeed ZeRO-3) against TRL's RewardTrainer, in one run.

Same model (the tiny preset's LLaMA, our RewardModel and its LlamaForSequenceClassification
export with identical initial weights), same data (seeded random pre-tokenized pairs, written
once as our Parquet and as a `datasets` table with TRL's `chosen_ids`/`rejected_ids`), same
batch (pairs per optimizer step), sequence length, margin loss, AdamW, lr and precision (fp32 on
CPU), same number of CPU threads. Measured:
  - steady-state pairs/s: optimizer steps after the first `--warmup` ones (ours: the engine's
    `loss_units_per_s`, one unit = one pair; TRL: a callback timing each step);
  - end to end: wall time of the whole training call, launch included (ours: train(), which
    starts the Ray Train workers and DeepSpeed; TRL: RewardTrainer construction + train()).

    pip install -r requirements-bench.txt
    python benchmarks/reward_throughput.py            # ~2 minutes on 2 CPU cores

The last line is `ratio_vs_trl: X` (steady-state pairs/s, ours / TRL; above 1: we are faster).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

PAD, BOS, EOS = 3, 1, 2


def make_pairs(n: int, seq: int, vocab: int, seed: int) -> pa.Table:
    """Pre-tokenized pairs: <s> ... </s>, lengths uniform in [seq/2, seq], random strength."""
    rng = np.random.default_rng(seed)

    def side() -> list[int]:
        return [BOS, *rng.integers(8, vocab, int(rng.integers(seq // 2, seq - 1))).tolist(), EOS]

    from steps.reward import PAIR_TOKENS

    return pa.table({"chosen": [side() for _ in range(n)], "rejected": [side() for _ in range(n)],
                     "strength_id": rng.integers(0, 4, n).astype(np.int8), "pair_id": [f"p{i}" for i in range(n)]},
                    schema=PAIR_TOKENS)


def run_ours(args, mcfg, data: Path, init: Path, work: Path) -> dict:
    from pipelines.config import load_config
    from pipelines.dag import ensure_ray
    from steps.engine import train
    from steps.reward import build_objective

    cfg = load_config(None)
    ensure_ray(cfg)
    tcfg = cfg.reward.train.model_copy(update={
        "num_workers": args.workers, "cpus_per_worker": args.threads / args.workers, "global_batch_size": args.batch,
        "micro_batch_size": args.batch // args.workers, "max_steps": args.steps, "log_every": 1,
        "checkpoint_every": 10**6, "eval_every": 10**6, "precision": "fp32", "use_gpu": False})
    ocfg = cfg.reward.optim.model_copy(update={"lr": args.lr, "warmup_steps": 0, "warmup_fraction": None,
                                               "schedule": "constant"})
    obj = build_objective("helpfulness", mcfg, PAD, args.margin, str(data), [], str(init))
    start = time.time()
    result = train(obj, tcfg, ocfg, work_dir=work / "ours_work", out_dir=work / "ours_out", seed=0)
    wall = time.time() - start
    steady = [h["loss_units_per_s"] for h in result.history if h["step"] > args.warmup]
    return {"pairs_per_s": float(np.mean(steady)), "wall_s": wall, "launch_s": result.launch_seconds,
            "final_loss": result.final["loss"], "zero_stage": tcfg.zero_stage}


def run_trl(args, hf_dir: Path, table: pa.Table, work: Path) -> dict:
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from steps.reward import MARGINS

    torch.set_num_threads(args.threads)
    margins = np.asarray(MARGINS[args.margin], dtype=np.float32)
    ds = datasets.Dataset.from_dict({"chosen_ids": table["chosen"].to_pylist(),
                                     "rejected_ids": table["rejected"].to_pylist(),
                                     "margin": margins[table["strength_id"].to_numpy()].tolist()})
    ticks: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, *a, **k):
            ticks.append(time.time())

    start = time.time()
    model = AutoModelForSequenceClassification.from_pretrained(str(hf_dir), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    targs = RewardConfig(output_dir=str(work / "trl"), per_device_train_batch_size=args.batch, max_steps=args.steps,
                         learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.1,
                         adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, logging_steps=10**6,
                         save_strategy="no", report_to="none", use_cpu=True, bf16=False, fp16=False,
                         max_length=args.seq, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = RewardTrainer(model=model, args=targs, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
    out = trainer.train()
    wall = time.time() - start
    gaps = np.diff(ticks[args.warmup - 1:])
    return {"pairs_per_s": float(args.batch / gaps.mean()), "wall_s": wall, "launch_s": ticks[0] - start
            - float(np.diff(ticks[:args.warmup]).mean() if args.warmup > 1 else 0.0), "final_loss": out.training_loss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=16, help="pairs per optimizer step")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--workers", type=int, default=1, help="our Ray Train workers (threads split between them)")
    # 1 by default: on a shared, loaded 2-core machine two OpenMP threads per process oversubscribe
    # the cores and spin (measured: 4-6 s per step for either model in plain PyTorch vs 0.64 s with one)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--margin", default="small")
    p.add_argument("--ours-first", action="store_true", help="run ours before TRL (checks order effects)")
    args = p.parse_args()

    from safetensors.torch import save_file

    from model.config import ModelConfig
    from model.reward import RewardModel, export_hf_reward
    from pipelines.config import load_config

    mcfg: ModelConfig = load_config(None).model.model_copy(update={"max_seq_len": args.seq})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        table = make_pairs(args.batch * args.steps, args.seq, mcfg.vocab_size, seed=0)
        pq.write_table(table, work / "pairs.parquet")
        torch.manual_seed(0)
        rm = RewardModel(mcfg)
        torch.nn.init.normal_(rm.score.weight, std=0.02)  # both start from the same non-trivial head
        state = {k: v.contiguous() for k, v in rm.state_dict().items()}
        save_file(state, str(work / "init.safetensors"))
        tok_dir = _chat_export(work, mcfg)
        hf_dir = export_hf_reward(work / "init.safetensors", mcfg, work / "hf", tok_dir, PAD)

        if args.ours_first:
            ours = run_ours(args, mcfg, work / "pairs.parquet", work / "init.safetensors", work)
        trl = run_trl(args, hf_dir, table, work)
        if not args.ours_first:
            ours = run_ours(args, mcfg, work / "pairs.parquet", work / "init.safetensors", work)
    print(json.dumps({"setup": {k: getattr(args, k) for k in ("steps", "warmup", "batch", "seq", "workers", "threads")}
                      | {"model": mcfg.model_dump(include={"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size"})},
                      "ours": ours, "trl": trl}, indent=2, default=float))
    print(f"pairs_per_s: ours {ours['pairs_per_s']:.1f}  trl {trl['pairs_per_s']:.1f}")
    print(f"end_to_end_s: ours {ours['wall_s']:.1f} (launch {ours['launch_s']:.1f})  trl {trl['wall_s']:.1f}")
    print(f"end_to_end_ratio_vs_trl: {trl['wall_s'] / ours['wall_s']:.3f}")
    print(f"ratio_vs_trl: {ours['pairs_per_s'] / trl['pairs_per_s']:.3f}")


def _chat_export(work: Path, mcfg) -> Path:
    """The HF export of a chat model (steps/sft.py's hf/) whose tokenizer files the RM export
    copies: a SentencePiece model of the model's vocab size with the pad id the data uses (TRL
    wants a processing class; the data is pre-tokenized, so its merges do not matter)."""
    import random

    from model.hf import export_hf
    from model.llama import Transformer
    from model.tokenizer import Tokenizer

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    tok = Tokenizer.train((" ".join(rng.choice(words) for _ in range(12)) for _ in range(20000)), work / "tok",
                          mcfg.vocab_size)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (PAD, BOS, EOS), (tok.pad_id, tok.bos_id, tok.eos_id)
    return export_hf(Transformer(mcfg), mcfg, work / "chat_hf", tokenizer_model=tok.model_path)


if __name__ == "__main__":
    main()
