"""Pretraining step (RECIPE.md sections 3-4): the LLaMA-2 model on the packed token sequences.

Input: the tokenizer artifact (train/ val/ Parquet of seq_len + 1 tokens, tokenizer.model,
meta.json). Output: model.safetensors (consolidated fp32), hf/ (a Hugging Face Llama
directory with the tokenizer), history.json, and metrics: the final train and validation
loss next to the unigram baseline the model must beat.
"""

from __future__ import annotations

import json
import math
from functools import partial
from typing import TYPE_CHECKING

from model.config import ModelConfig, Section
from steps.engine import Objective, collate_lm, lm_objective_loss, train
from steps.engine.config import OptimConfig, TrainConfig

if TYPE_CHECKING:  # steps receive artifacts; the runner (pipelines/) makes them
    from pipelines.artifacts import Artifact

VERSION = "2"  # 2: weights initialised in construction (it holds under ZeRO-3)


class PretrainConfig(Section):
    train: TrainConfig = TrainConfig(global_batch_size=1024, num_workers=256, use_gpu=True,
                                     gpus_per_worker=1, cpus_per_worker=8,
                                     activation_checkpointing=True, max_steps=500_000)
    optim: OptimConfig = OptimConfig()


def build_model(cfg: ModelConfig):
    from model.llama import Transformer

    return Transformer(cfg)  # initialised in construction, so also under ZeRO-3's zero.Init


def run(ctx, tokenized: Artifact) -> dict[str, float]:
    from model.flops import flops_per_token
    from model.hf import export_hf

    meta = json.loads(tokenized.file("meta.json").read_text())
    mcfg = ctx.cfg.model.model_copy(update={"vocab_size": meta["vocab_size"]})
    if meta["seq_len"] > mcfg.max_seq_len:
        raise ValueError(f"tokenizer.seq_len {meta['seq_len']} exceeds model.max_seq_len {mcfg.max_seq_len}")
    with __import__("torch").device("meta"):
        n_params = build_model(mcfg).num_params(exclude_embeddings=True)
    objective = Objective(
        name="pretrain",
        build_module=partial(build_model, mcfg),
        loss=lm_objective_loss,
        train_files=[str(p) for p in sorted((tokenized.path / "train").glob("*.parquet"))],
        eval_files=[str(p) for p in sorted((tokenized.path / "val").glob("*.parquet"))],
        columns=["tokens"],
        collate=collate_lm,
        tokens_per_row=meta["seq_len"],
        flops_per_token=flops_per_token(n_params, mcfg.n_layers, meta["seq_len"], mcfg.dim),
        model_cfg=mcfg,
    )
    ctx.log_params({"model.non_embedding_params": n_params, "model.vocab_size": mcfg.vocab_size})
    result = train(objective, ctx.cfg.pretrain.train, ctx.cfg.pretrain.optim, work_dir=ctx.work_dir,
                   out_dir=ctx.out_dir, seed=ctx.seed, tracking_uri=ctx.tracking_uri,
                   mlflow_run_id=ctx.mlflow_run_id)
    export_hf(result.weights, mcfg, ctx.out_dir / "hf", tokenizer_model=tokenized.file("tokenizer.model"))
    (ctx.out_dir / "model_config.json").write_text(mcfg.model_dump_json(indent=2))
    ctx.log_history_figure(result.history, ["loss", "eval_loss"], "loss_curve.png", "pretraining loss")
    final = result.final
    val = final.get("eval_loss", float("nan"))
    return {
        "train_loss": final.get("loss"), "val_loss": val, "val_perplexity": math.exp(val),
        "unigram_loss": meta["unigram_entropy_nats"], "first_loss": result.history[0]["loss"],
        "steps": final.get("step"), "tokens_per_s": final.get("tokens_per_s"),
        "launch_seconds": result.launch_seconds, "train_seconds": result.seconds,
        "params_non_embedding": n_params,
        **({"mfu": final["mfu"]} if "mfu" in final else {}),  # only where the device's peak is known
    }
