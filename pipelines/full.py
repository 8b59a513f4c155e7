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

from pipelines.config import Config, ConfigError, load_config
from pipelines.runner import StepSpec
from pipelines.session import run_pipeline
from steps import data, gatt, pretrain, sft, tokenizer


def pipeline(cfg: Config) -> list[StepSpec]:
    """The full recipe's steps in topological order (RECIPE.md sections 1-8)."""
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
    chat_models = ["sft"]  # chat model of iteration i is chat_models[i]; the RLHF loop appends V1..V5
    if cfg.rlhf.gatt.enabled:
        # Ghost Attention on the model of iteration `after_iteration` (V3 in the paper); while
        # the loop has fewer iterations, on the newest chat model there is.
        base = chat_models[min(cfg.rlhf.gatt.after_iteration, len(chat_models) - 1)]
        steps.append(StepSpec("gatt", gatt, "rlhf", ("rlhf.gatt", "run.seed", "run.name"),
                              inputs={"model": base}, tags={"technique": "gatt"}, light=True))
    return steps


# What the end-of-run table shows for each step.
KEY_METRICS = {
    "data": ["docs_in", "docs_out", "duplicates_removed", "corrupt_records"],
    "tokenizer": ["vocab_size", "train_tokens", "unigram_loss", "roundtrip_exact"],
    "pretrain": ["val_loss", "unigram_loss", "tokens_per_s", "launch_seconds"],
    "sft": ["eval_loss", "judge.pretrained.helpfulness", "judge.sft.helpfulness", "judge.sft.safety"],
    "gatt": ["data.kept", "judge.before.follow.later_turns", "judge.gatt.follow.later_turns", "judge.gatt.helpfulness"],
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
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"run.output_dir={args.output_dir}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stages = args.stages.split(",") if args.stages else None
    return run_pipeline(cfg, pipeline(cfg), stages=stages, until=args.until, dry_run=args.dry_run,
                        title="full", key_metrics=KEY_METRICS)


if __name__ == "__main__":
    sys.exit(main())
