"""Supervised fine-tuning step (RECIPE.md section 5): the pretrained model -> the first chat model.

Data: the demo chat world's gold dialogues (tiny preset) plus public instruction data
(Alpaca / ShareGPT / messages files in `sft.sources`), packed into rows of `sft.seq_len` with
attention kept within each example and the loss on assistant tokens only. Training runs on the
shared engine from the pretrained weights. Afterwards the world's judge scores greedy answers
to held-out prompts from the pretrained and the SFT model; the HF export is registered in the
MLflow model registry with alias `sft`.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq
import torch
from pydantic import Field

from model.chat import Dialogue
from model.config import ModelConfig, Section
from steps.engine import Objective, TrainResult, lm_objective_loss, train
from steps.engine.config import OptimConfig, TrainConfig

if TYPE_CHECKING:  # steps receive artifacts; the runner (pipelines/) makes them
    from pipelines.artifacts import Artifact

VERSION = "4"  # 3: wider demo world (train/validation/test splits, graded judge); 4: transformers chat layout


class SFTConfig(Section):
    train: TrainConfig = TrainConfig(global_batch_size=64, epochs=2.0, num_workers=64, use_gpu=True,
                                     gpus_per_worker=1, cpus_per_worker=8)
    optim: OptimConfig = OptimConfig(lr=2e-5, warmup_steps=0)
    seq_len: int = 4096
    sources: list[str] = Field(default_factory=list)  # dialogue files (alpaca/sharegpt/messages)
    max_source_examples: int | None = Field(None, ge=1)  # cap per file (the tiny preset keeps the world dominant)
    demo_world: bool = True  # add the seeded demo chat world (tiny preset)
REPO_ROOT = Path(__file__).resolve().parent.parent


def build_model(cfg: ModelConfig):
    from model.llama import Transformer

    return Transformer(cfg)


def collate_packed(rows: dict) -> dict[str, torch.Tensor]:
    col = {k: torch.from_numpy(np.stack(rows[k]).astype(np.int64)) for k in rows}
    return {"inputs": col["tokens"], "targets": col["targets"], "segment_ids": col["segment_ids"],
            "positions": col["positions"]}


def load_model(cfg: ModelConfig, weights: Path, device=None, dtype=None):
    """The model for sampling, built directly on its device and dtype (GPU in bf16 where there is
    one, else CPU in fp32), tensor by tensor: never a full fp32 copy on the host first."""
    from model.generate import load_model as load_for_inference

    return load_for_inference(cfg, weights, device, dtype)


def model_answerer(model, tok, params, batch_size: int = 64, device=None):
    """Answer with model/generate.py's KV-cached sampler, `batch_size` prompts at a time, on the
    model's own device unless told otherwise."""
    from model.chat import encode_prompt
    from model.generate import TorchSampler
    from steps.engine.launch import report_progress

    sampler = TorchSampler(model, tok.eos_id, tok.pad_id, device)

    def answer(dialogues: list[Dialogue]) -> list[tuple[str, bool]]:
        out = []
        for i in range(0, len(dialogues), batch_size):
            chunk = [encode_prompt(tok, d) for d in dialogues[i:i + batch_size]]
            # first_index: each prompt keeps its own random stream whatever chunk it lands in
            out += [(tok.decode(s.tokens).strip(), s.finished) for s in sampler.generate(chunk, params, first_index=i)]
            report_progress(len(out), len(dialogues) * params.num_samples, "answers")
        return out

    return answer


def judge_model(model, tok, items, max_new_tokens: int, temperature: float = 0.0, num_samples: int = 1,
                seed: int = 0) -> tuple[dict[str, float], list[dict]]:
    """Answers to the world's items (greedy by default; else `num_samples` per item at
    `temperature`, seeded), scored by its ground-truth judge; scores are means over items of each
    item's mean over its samples. Rows: one per answer."""
    from model.generate import SamplingParams
    from steps.world import judge

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                            num_samples=num_samples if temperature > 0 else 1, seed=seed)
    answers = model_answerer(model, tok, params)([it.dialogue for it in items])
    K = params.num_samples  # the sampler returns each prompt's K answers together
    rows, scores = [], {"helpfulness": [], "safety": []}
    for n, it in enumerate(items):
        js = [judge(it, text) for text, _ in answers[n * K:(n + 1) * K]]
        for k in scores:
            scores[k].append(float(np.mean([j[k] for j in js])))
        rows += [{"kind": it.kind, "prompt": it.dialogue.turns[-1].content, "response": text, **j}
                 for (text, _), j in zip(answers[n * K:(n + 1) * K], js)]
    out = {k: float(np.mean(v)) for k, v in scores.items()}
    for kind in sorted({it.kind for it in items}):
        out[f"helpfulness.{kind}"] = float(np.mean([h for h, it in zip(scores["helpfulness"], items)
                                                     if it.kind == kind]))
    return out, rows


def resolve(path: str) -> list[Path]:
    path = os.path.expanduser(path)
    p = Path(path)
    hits = sorted(p.parent.glob(p.name)) if p.is_absolute() else sorted(Path.cwd().glob(path)) or \
        sorted(REPO_ROOT.glob(path))
    if not hits:
        raise FileNotFoundError(f"sft.sources: no file matches {path!r}")
    return hits


def load_chat_model(model_dir: Path):
    """(model config, tokenizer) of a model artifact's directory (pretrain, sft, gatt, rlhf-*)."""
    from model.tokenizer import Tokenizer

    return (ModelConfig.model_validate_json((model_dir / "model_config.json").read_text()),
            Tokenizer(model_dir / "hf" / "tokenizer.model"))


def finetune(ctx, name: str, base: Artifact, dialogues: list, eval_dialogues: list, train_cfg, optim_cfg,
             seq_len: int, fit_check: bool = False) -> tuple[TrainResult, dict[str, float]]:
    """Fine-tune `base` on dialogues with the loss on trained assistant turns only; shared by
    SFT, Ghost Attention and rejection-sampling fine-tuning. Writes dialogues.parquet, packed/,
    model.safetensors, model_config.json and the HF export hf/ into ctx.out_dir. fit_check (no
    eval_dialogues): the engine evaluates the training rows before the first step and at the end
    (`eval_loss_at_start` in the first history row, `eval_loss` in the last)."""
    from model.hf import export_hf
    from steps.sft_data import pack, to_table, write_packed

    mcfg, tok = load_chat_model(base.path)
    pq.write_table(to_table(dialogues, name), ctx.out_dir / "dialogues.parquet")
    rows, stats = pack(tok, dialogues, seq_len)
    write_packed(rows, ctx.out_dir / "packed" / "train.parquet")
    eval_files = []
    if eval_dialogues:
        write_packed(pack(tok, eval_dialogues, seq_len)[0], ctx.out_dir / "packed" / "eval.parquet")
        eval_files = [str(ctx.out_dir / "packed" / "eval.parquet")]
    elif fit_check:
        eval_files = [str(ctx.out_dir / "packed" / "train.parquet")]
    ctx.log_metrics({f"data.{k}": v for k, v in stats.items()})
    objective = Objective(
        name=name, build_module=partial(build_model, mcfg), loss=lm_objective_loss,
        train_files=[str(ctx.out_dir / "packed" / "train.parquet")], eval_files=eval_files,
        columns=["tokens", "targets", "segment_ids", "positions"], collate=collate_packed,
        init_weights=str(base.path), model_cfg=mcfg, eval_at_start=fit_check)  # init: model.safetensors or its shards' index
    result = train(objective, train_cfg, optim_cfg, work_dir=ctx.work_dir, out_dir=ctx.out_dir,
                   seed=ctx.seed, tracking_uri=ctx.tracking_uri, mlflow_run_id=ctx.mlflow_run_id)
    ctx.log_history_figure(result.history, ["loss", "eval_loss"], f"{name}_loss_curve.png", f"{name} loss")
    export_hf(result.weights, mcfg, ctx.out_dir / "hf", tokenizer_model=base.file("hf/tokenizer.model"))
    (ctx.out_dir / "model_config.json").write_text(mcfg.model_dump_json(indent=2))
    return result, stats


def run(ctx, pretrained: Artifact) -> dict[str, float]:
    from steps.sft_data import read_dialogues
    from steps.world import World

    scfg = ctx.cfg.sft
    world = World(ctx.seed)
    dialogues = world.sft_dialogues("train") if scfg.demo_world else []
    n_world = len(dialogues)
    for src in scfg.sources:
        for f in resolve(src):
            dialogues += read_dialogues(f)[: scfg.max_source_examples]
    rng = np.random.default_rng(ctx.seed)
    dialogues = [dialogues[i] for i in rng.permutation(len(dialogues))]
    ctx.log_params({"sft.examples": len(dialogues), "sft.world_examples": n_world})
    eval_dialogues = world.sft_dialogues("validation") if scfg.demo_world else []
    result, stats = finetune(ctx, "sft", pretrained, dialogues, eval_dialogues, scfg.train, scfg.optim, scfg.seq_len)

    metrics = {"train_loss": result.final.get("loss"), "eval_loss": result.final.get("eval_loss"),
               "first_loss": result.history[0]["loss"], "steps": result.final.get("step"),
               **{f"data.{k}": v for k, v in stats.items()}}
    if scfg.demo_world:
        mcfg, tok = load_chat_model(pretrained.path)
        items = world.items("test")
        before, _ = judge_model(load_model(mcfg, pretrained.file("model.safetensors")), tok, items, 32)
        after, rows = judge_model(load_model(mcfg, result.weights), tok, items, 32)
        metrics.update({f"judge.pretrained.{k}": v for k, v in before.items()})
        metrics.update({f"judge.sft.{k}": v for k, v in after.items()})
        ctx.log_table({k: [r[k] for r in rows[:100]] for k in rows[0]}, "sft_generations.json")
        (ctx.out_dir / "judge.json").write_text(json.dumps({"pretrained": before, "sft": after}, indent=2))
    metrics["registry_version"] = ctx.register_model(f"{ctx.cfg.run.name}-chat", ctx.out_dir / "hf", "sft")
    return metrics
