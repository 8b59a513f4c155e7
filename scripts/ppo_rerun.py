"""Rerun a finished run's ppo_v{i} with other settings, outside the pipeline.

    python scripts/ppo_rerun.py RUN_DIR [--iteration 5] [--config tiny] [--out DIR] [key=value ...]
    python scripts/ppo_rerun.py outputs --iteration 5 rlhf.ppo.iterations=25 rlhf.ppo.ppo_epochs=2

Takes exactly what the run's newest ppo_v{i} started from (the inputs its manifest names: rs_v{i},
both reward models of iteration i, the prompts of prefs_v{i}) and runs the step's own code on it:
`steps.ppo.run_ppo` on a local Ray (the same roles, learners, held-out evaluations and early
stopping) and the step's judge (`judge_change`, tiny preset), with the preset plus the dotted
overrides. The run's seed must be the config's. It prints the held-out evaluations, the gain and
the judge before/after; `--out` (new or empty) gets result.json and the PPO work directory. The
run directory and its MLflow store are not touched. With no override and the run's own settings
it repeats the run's ppo_v{i} (tests/test_e2e_ppo.py: the same figures), so settings can be
compared on the same inputs; the README's tables of PPO settings on fixed V4/V5 inputs were
measured with it. Changes that reach later steps (how far V4 sharpens, what rs_v5 then starts
from) need the pipeline itself: `pipelines/full.py --output-dir COPY_OF_RUN key=value`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> dict:
    from pipelines.artifacts import Artifact
    from pipelines.config import load_config
    from steps.ppo import judge_change, ppo_prompts, run_ppo

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="the pipeline's --output-dir")
    ap.add_argument("--iteration", type=int, default=5)
    ap.add_argument("--config", default=None, help="the preset the run used (default tiny)")
    ap.add_argument("--out", type=Path, default=None, help="default: a temporary directory")
    ap.add_argument("overrides", nargs="*", help="dotted key=value, as pipelines/full.py takes them")
    args = ap.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    i, seed = args.iteration, cfg.run.seed

    done = sorted(args.run_dir.glob(f"ppo_v{i}/*/manifest.json"), key=lambda p: p.stat().st_mtime)
    if not done:
        raise SystemExit(f"{args.run_dir}: no complete ppo_v{i} (run the pipeline through ppo_v{i} first)")
    ppo = Artifact.load(done[-1].parent)
    inputs = {name: Artifact.load(args.run_dir / ref["step"] / ref["fingerprint"])
              for name, ref in ppo.manifest["inputs"].items()}
    if ppo.manifest["config"]["run.seed"] != seed:
        raise SystemExit(f"the run's ppo_v{i} used run.seed={ppo.manifest['config']['run.seed']}, the config "
                         f"{seed}: pass run.seed={ppo.manifest['config']['run.seed']}")
    if ppo.manifest["config"]["rlhf.ppo"] != cfg.subset("rlhf.ppo")["rlhf.ppo"]:
        print(f"note: these rlhf.ppo settings differ from the run's ppo_v{i} ({ppo.path})", flush=True)
    policy = inputs["model"]
    prompts, heldout = ppo_prompts(inputs["prefs"], cfg.rlhf.ppo, seed + i)
    out = args.out or Path(tempfile.mkdtemp(prefix=f"ppo_rerun_v{i}_"))
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: run_ppo would resume the PPO checkpoints in it")
    out.mkdir(parents=True, exist_ok=True)

    import ray

    from pipelines.dag import ensure_ray

    owned = not ray.is_initialized()
    ensure_ray(cfg)  # a private local Ray, as the pipeline starts it, unless the caller has one
    try:
        t0 = time.time()
        res = run_ppo(policy.path, inputs["rm_helpfulness"].path, inputs["rm_safety"].path, prompts,
                      cfg.rlhf.ppo, safety_threshold=cfg.rlhf.safety_threshold, work_dir=out / "work",
                      out_dir=out / "model", seed=seed + i, heldout=heldout)
        seconds = time.time() - t0
    finally:
        if owned:
            ray.shutdown()
    for e in res.evals:
        print("held-out", {k: round(v, 4) for k, v in e.items()})
    result = {"overrides": args.overrides, "seconds": seconds, "stop_reason": res.stop_reason,
              "gain": res.evals[-1]["reward"] - res.evals[0]["reward"], "kl": res.evals[-1]["kl"],
              "evals": res.evals, "history": res.history}
    if cfg.sft.demo_world:
        result["judge"] = judge_change(policy, res, seed, seed + i)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"ppo_v{i} {' '.join(args.overrides) or '(the preset)'}: {len(res.history)} iterations in {seconds:.0f} s, "
          f"held-out gain {result['gain']:+.4f}, KL {result['kl']:.3f}" + (f", stopped: {res.stop_reason}"
                                                                         if res.stop_reason else ""))
    if "judge" in result:
        j = result["judge"]
        print(f"judge (greedy) {j['judge.start.helpfulness']:.4f} -> {j['judge.ppo.helpfulness']:.4f}, paired "
              f"{j['judge.diff.helpfulness']:+.4f} +- {j['judge.diff_se.helpfulness']:.4f}, "
              f"{j['judge.changed_answers']:.1%} of the answers changed; sampled (T=1) "
              f"{j['judge.sampled.diff.helpfulness']:+.4f} +- {j['judge.sampled.diff_se.helpfulness']:.4f}")
    print(f"result: {out / 'result.json'}")
    return result


if __name__ == "__main__":
    main()
