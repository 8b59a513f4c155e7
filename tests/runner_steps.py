"""Two small step modules for the runner's tests: `produce` writes a file from its config;
`consume` reads it. Real steps as far as the runner is concerned (VERSION + run)."""

import json
import os

VERSION = "1"


def run(ctx, **inputs):
    """produce: writes numbers derived from tokenizer.vocab_size; fails on demand."""
    if os.environ.get("RUNNER_TEST_FAIL") == ctx.step:
        (ctx.work_dir / "progress.txt").write_text("half done")
        (ctx.out_dir / "partial.txt").write_text("not complete")
        raise RuntimeError("planned failure")
    resumed = (ctx.work_dir / "progress.txt").exists()
    if "upstream" in inputs:
        src = json.loads(inputs["upstream"].file("numbers.json").read_text())
        value = sum(src) * ctx.cfg.model.dim
    else:
        value = list(range(ctx.cfg.tokenizer.vocab_size % 7 + 3))
    (ctx.out_dir / "numbers.json").write_text(json.dumps(value))
    ctx.log_metrics({"value": float(sum(value) if isinstance(value, list) else value)})
    return {"resumed": float(resumed), "count": 1.0}
