"""The whole LLaMA-2 recipe as one resumable, tracked Ray pipeline.

    python pipelines/full.py                              # tiny preset: CPU, local Ray + MLflow
    python pipelines/full.py --config 7b --until pretrain
    ray job submit --working-dir . -- python pipelines/full.py --config configs/7b.yaml
    python pipelines/full.py pretrain.train.max_steps=50  # dotted overrides

Re-running recomputes only steps whose config, code version or inputs changed; an
interrupted training resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python pipelines/full.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.config import Config, ConfigError, load_cli_config
from pipelines.runner import StepSpec
from pipelines.session import run_pipeline
from steps import (
    annotate,
    data,
    evaluate,
    gatt,
    ppo,
    preferences,
    pretrain,
    rejection,
    reward,
    sft,
    tokenizer,
)


def pipeline(cfg: Config) -> list[StepSpec]:
    """The full recipe's steps in topological order (RECIPE.md sections 1-9)."""
    steps = [
        # data steps are drivers of Ray Data jobs: their node holds no CPU the job needs
        StepSpec("data", data, "data", ("data", "run.seed"), light=True),
        StepSpec("tokenizer", tokenizer, "tokenizer", ("tokenizer", "run.seed"),
                 inputs={"corpus": "data"}, light=True),
        # training steps only launch Ray Train workers, which ask for the CPUs/GPUs
        StepSpec("pretrain", pretrain, "pretrain", ("model", "pretrain", "run.seed"),
                 inputs={"tokenized": "tokenizer"}, light=True),
        StepSpec("sft", sft, "sft", ("sft", "run.seed", "run.name"), inputs={"pretrained": "pretrain"},
                 light=True),
    ]
    chat = "sft"
    if cfg.rlhf.gatt.enabled and cfg.rlhf.gatt.after_iteration == 0:  # Ghost Attention on the SFT model
        steps.append(gatt_step("sft"))
        chat = "gatt"
    steps += rlhf_iterations(cfg, first=1, last=cfg.rlhf.iterations, chat=chat)
    return steps


def gatt_step(model: str, rms: dict[str, str] | None = None) -> StepSpec:
    """Ghost Attention on `model`; with the iteration's reward models (`rms`), each turn's answer
    is the best of K by the gated reward, as in rejection sampling."""
    return StepSpec("gatt", gatt, "rlhf", ("rlhf.gatt", "rlhf.safety_threshold", "run.seed", "run.name"),
                    inputs={"model": model, **(rms or {})}, tags={"technique": "gatt"}, light=True)


def rlhf_iterations(cfg: Config, first: int, last: int, chat: str, before: str | None = None) -> list[StepSpec]:
    """Iterations first..last of RLHF (RECIPE.md section 8), unrolled so that every node is
    cached, resumable and visible: annotate_v{i} (tiny preset: the simulated vendor) ->
    prefs_v{i} -> rm_helpfulness_v{i} || rm_safety_v{i} -> rs_v{i} [-> ppo_v{i} from
    `rlhf.ppo_from`] -> eval_v{i}; the next iteration builds on ppo_v{i} where it exists. Ghost
    Attention on the model of iteration `rlhf.gatt.after_iteration`. `chat` is the step whose
    model iteration `first` starts from, `before` the version before it (for the annotators)."""
    out: list[StepSpec] = []
    rlhf = ("rlhf.rejection", "rlhf.safety_threshold", "run.seed", "run.name")
    previous_chat = f"ppo_v{first - 1}" if first - 1 >= cfg.rlhf.ppo_from else (f"rs_v{first - 1}" if first > 1
                                                                               else "sft")
    for i in range(first, last + 1):
        v, tag = f"_v{i}", {"rlhf_version": f"v{i}"}
        prefs_inputs = {"previous": f"prefs_v{i - 1}"} if i > 1 else {}
        if cfg.sft.demo_world:  # the tiny preset's vendor answers with the current chat models
            annotate_inputs = {"model": chat, **({"previous_model": before} if before else {})}
            out.append(StepSpec(f"annotate{v}", annotate, "preferences", ("annotate", "run.seed"),
                                inputs=annotate_inputs, params={"iteration": i}, tags=tag, light=True))
            prefs_inputs["batch"] = f"annotate{v}"
        out.append(StepSpec(f"prefs{v}", preferences, "preferences", preferences.CONFIG_KEYS,
                            inputs=prefs_inputs, params={"iteration": i}, tags=tag))
        for axis in ("helpfulness", "safety"):  # independent: the two run at the same time
            out.append(StepSpec(f"rm_{axis}{v}", reward, "reward", ("reward", "run.seed", "run.name"),
                                inputs={"prefs": f"prefs{v}", "model": chat}, params={"axis": axis, "iteration": i},
                                tags={**tag, "axis": axis}, light=True))
        rms = {"rm_helpfulness": f"rm_helpfulness{v}", "rm_safety": f"rm_safety{v}"}
        out.append(StepSpec(f"rs{v}", rejection, "rlhf", rlhf,
                            inputs={"model": chat, "prefs": f"prefs{v}", **rms,
                                    **({"previous": f"rs_v{i - 1}"} if i > 1 else {}),
                                    **({"sft": "sft"} if cfg.rlhf.rejection.sft_mix > 0 else {})},  # replayed demos
                            params={"iteration": i}, tags={**tag, "technique": "rejection_sampling"}, light=True))
        newest = f"rs{v}"
        if i >= cfg.rlhf.ppo_from:  # PPO on top of the rejection-sampling checkpoint (V4 on in the paper)
            out.append(StepSpec(f"ppo{v}", ppo, "rlhf", ("rlhf.ppo", "rlhf.safety_threshold", "sft.demo_world",
                                                         "run.seed", "run.name"),
                                inputs={"model": f"rs{v}", "prefs": f"prefs{v}", **rms}, params={"iteration": i},
                                tags={**tag, "technique": "ppo"}, light=True))
            newest = f"ppo{v}"
        out.append(StepSpec(f"eval{v}", evaluate, "eval", ("eval", "rlhf.safety_threshold", "sft.demo_world",
                                                            "run.seed", "run.name"),
                            inputs={"model": newest, "sft": "sft", "previous": previous_chat,
                                    "prefs": f"prefs{v}", **rms, **({"prior": f"eval_v{i - 1}"} if i > 1 else {})},
                            params={"iteration": i}, tags=tag, light=True))
        before, chat = chat, newest
        previous_chat = newest  # V(i)'s model for eval_v{i+1}; Ghost Attention's is not a version
        if cfg.rlhf.gatt.enabled and i == cfg.rlhf.gatt.after_iteration:
            # Ghost Attention on this iteration's model (V3 in the paper); later ones build on it
            out.append(gatt_step(chat, rms))
            chat = "gatt"
    return out


# What the end-of-run table shows for each step.
KEY_METRICS = {
    "data": ["docs_in", "docs_out", "duplicates_removed", "corrupt_records"],
    "tokenizer": ["vocab_size", "train_tokens", "unigram_loss", "roundtrip_exact"],
    "pretrain": ["val_loss", "unigram_loss", "tokens_per_s", "launch_seconds"],
    "sft": ["eval_loss", "judge.pretrained.helpfulness", "judge.sft.helpfulness", "judge.sft.safety"],
    "gatt": ["data.kept", "judge.before.follow.later_turns", "judge.gatt.follow.later_turns", "judge.gatt.helpfulness"],
    # per RLHF iteration (the table matches rs_v3 to "rs")
    "annotate": ["pairs", "axis.safety", "strength.significantly_better", "heldout.test.pairs"],
    "prefs": ["pairs", "batches", "quarantined"],
    "rm_helpfulness": ["accuracy", "accuracy.significantly_better", "launch_seconds"],
    "rm_safety": ["accuracy", "accuracy.significantly_better", "world.unsafe.refusal_preferred"],
    "rs": ["reward.max", "reward.median", "pool.size", "train_loss"],
    "ppo": ["heldout.reward.gain", "kl", "judge.ppo.helpfulness", "iterations"],
    "eval": ["win_rate.vs_sft.judge", "win_rate.vs_prev.judge", "refusal.unsafe", "refusal.harmless"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="preset name (tiny, 7b, ...) or YAML path; default tiny")
    p.add_argument("--output-dir", default=None, help="artifacts and (by default) the MLflow store")
    p.add_argument("--stages", default=None, help="comma-separated steps/stages to run (plus what they need)")
    p.add_argument("--until", default=None, help="run the pipeline up to and including this step/stage")
    p.add_argument("--dry-run", action="store_true", help="print the plan (fingerprints, cache state) and exit")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_cli_config(args.config, args.output_dir, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stages = args.stages.split(",") if args.stages else None
    return run_pipeline(cfg, pipeline(cfg), stages=stages, until=args.until, dry_run=args.dry_run,
                        title="full", key_metrics=KEY_METRICS)


if __name__ == "__main__":
    sys.exit(main())
