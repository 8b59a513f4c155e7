"""Ray Tune search over rejection sampling's temperature (`rlhf.rejection.tune`).

RECIPE.md section 8: the temperature that maximises the best-of-K gain shifts as the model
changes across iterations, so it is worth re-choosing. Each trial samples K answers per
validation prompt at one temperature with the step's own sampler and scores them with both
reward models (steps/rejection.py:sample_and_score); its score is the mean over prompts of the
max minus the median gated reward among the K (the gap rejection sampling gains, the paper's
Figure 7). Every trial uses the same seed, so the temperatures are compared on the same random
streams (inverse-CDF sampling: common random numbers). No training happens in a trial: a sweep
costs a few samplings, not trainings.

Validation prompts are a fixed share of the train split's prompts (by prompt key); the step
then fine-tunes on the rest, and the eval split (the test prompts of eval_v{i}) is never read.

Shape as steps/reward_tune.py: one Tune function trial per temperature asking for the
sampler's resources, `max_concurrent_trials` at once; each trial gets an MLflow child run of the
step's run (temperature, gain, max, median), the trial table and a reward-vs-temperature figure
go on the step's run, and the step records the chosen temperature.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from steps.gated_reward import gated_reward


def gain_of(probs: dict[str, np.ndarray], is_safety: np.ndarray, threshold: float) -> dict[str, float]:
    """Mean over prompts of the max, the median and their gap of the K samples' gated reward."""
    reward = gated_reward(probs["helpfulness"], probs["safety"], np.asarray(is_safety)[:, None], threshold)
    best, median = reward.max(axis=1), np.median(reward, axis=1)
    return {"gain": float((best - median).mean()), "max": float(best.mean()), "median": float(median.mean())}


def choose(rows: list[dict], objective: str = "gain") -> dict:
    """The trial whose temperature is used: the highest `objective` ("gain": max minus median,
    the issue's criterion; "max": the best answer's reward, the paper's Figure 8); on a tie the
    other one, then the lower temperature (fewer degenerate samples). Failed trials and
    non-finite scores never win."""
    other = "max" if objective == "gain" else "gain"
    ok = [r for r in rows if not r.get("error") and np.isfinite(r["gain"]) and np.isfinite(r["max"])]
    if not ok:
        raise RuntimeError(f"rejection tune: every trial failed: {[str(r.get('error'))[:200] for r in rows]}")
    return max(ok, key=lambda r: (round(r[objective], 9), round(r[other], 9), -r["temperature"]))


def _trial(config: dict, base: dict) -> None:
    """One Tune trial: sample and score the validation prompts at one temperature."""
    from ray import tune

    from steps.rejection import sample_and_score

    start = time.time()
    params = dataclasses.replace(base["params"], temperature=config["temperature"])
    _, probs = sample_and_score(base["policy_dir"], base["rm_dirs"], base["dialogues"],
                                [[] for _ in base["dialogues"]], params, base["batch_size"])
    tune.report({**gain_of(probs, base["is_safety"], base["threshold"]), "seconds": time.time() - start})


def _child_run(client, ctx, temperature: float) -> str:
    step_run = client.get_run(ctx.mlflow_run_id)
    # trials carry the invocation's lineage (commit, Ray job, user) like every run of the pipeline
    context = {k: v for k, v in step_run.data.tags.items()
               if k.startswith(("git.", "ray.", "mlflow.user", "mlflow.source."))}
    return client.create_run(step_run.info.experiment_id, run_name=f"{ctx.step}/T={temperature}", tags={
        **context, "mlflow.parentRunId": ctx.mlflow_run_id, "stage": "rejection-tune", "step": ctx.step,
        "tune.temperature": str(temperature)}).info.run_id


def _log_trials(ctx, rows: list[dict]) -> None:
    """One MLflow child run per trial (its temperature and scores), under the step's run."""
    if not (ctx.tracking_uri and ctx.mlflow_run_id):
        return
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(ctx.tracking_uri)
    now = int(time.time() * 1000)
    for row in rows:
        run_id = _child_run(client, ctx, row["temperature"])
        client.log_batch(run_id, params=[Param("temperature", str(row["temperature"]))],
                         metrics=[Metric(k, float(row[k]), now, 0) for k in ("gain", "max", "median", "seconds")
                                  if np.isfinite(row[k])])
        client.set_terminated(run_id, "FAILED" if row["error"] else "FINISHED")


def sweep(ctx, rcfg, policy_dir: str, rm_dirs: dict[str, str], dialogues: list, is_safety: np.ndarray,
          params, threshold: float) -> tuple[float, dict[str, float]]:
    """Run one trial per candidate temperature; returns (the chosen temperature, metrics)."""
    import ray
    from ray import tune

    tcfg = rcfg.tune
    if not ray.is_initialized():  # a step runs inside Ray already; a direct call starts a local one
        ray.init(include_dashboard=False)
    base = {"policy_dir": policy_dir, "rm_dirs": rm_dirs, "dialogues": dialogues, "is_safety": is_safety,
            "params": params, "threshold": threshold, "batch_size": rcfg.sample_batch_size}
    res = rcfg.sampler
    bundle = {"CPU": res.num_cpus, "GPU": res.num_gpus, **res.resources,
              **({"memory": res.memory_gb * 2**30} if res.memory_gb else {})}
    trainable = tune.with_resources(tune.with_parameters(_trial, base=base),
                                    tune.PlacementGroupFactory([{k: v for k, v in bundle.items() if v}]))
    tuner = tune.Tuner(trainable, param_space={"temperature": tune.grid_search(list(tcfg.temperatures))},
                       tune_config=tune.TuneConfig(metric="gain", mode="max",
                                                   max_concurrent_trials=tcfg.max_concurrent_trials),
                       run_config=tune.RunConfig(name=ctx.step, storage_path=str(ctx.work_dir / "tune"), verbose=0))
    rows = []
    for r in tuner.fit():
        m = r.metrics or {}
        rows.append({"temperature": float(r.config["temperature"]),
                     **{k: float(m.get(k, np.nan)) for k in ("gain", "max", "median", "seconds")},
                     "error": str(r.error or "")})
    rows.sort(key=lambda x: x["temperature"])
    best = choose(rows, tcfg.objective)
    _log_trials(ctx, rows)
    ctx.log_table({k: [x[k] for x in rows] for k in rows[0]}, "tune_trials.json")
    _log_figure(ctx, rows, best["temperature"])
    ctx.log_params({"tune.temperature": best["temperature"], "tune.trials": len(rows), "tune.objective": tcfg.objective})
    metrics = {"tune.trials": float(len(rows)), "tune.failed_trials": float(sum(bool(x["error"]) for x in rows)),
               "tune.validation_prompts": float(len(dialogues)), "tune.best_gain": best["gain"],
               "tune.best_max": best["max"], "tune.temperature": best["temperature"]}
    return best["temperature"], metrics


def _log_figure(ctx, rows: list[dict], chosen: float) -> None:
    """Max and median reward of the K samples against temperature (validation prompts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r["error"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["temperature"] for r in ok], [r["max"] for r in ok], marker="o", label="max of K")
    ax.plot([r["temperature"] for r in ok], [r["median"] for r in ok], marker="o", label="median of K")
    ax.axvline(chosen, color="grey", linestyle=":", label=f"chosen T={chosen}")
    ax.set_xlabel("temperature")
    ax.set_ylabel("gated reward (validation prompts)")
    ax.set_title(f"{ctx.step}: temperature sweep")
    ax.legend()
    fig.tight_layout()
    ctx.log_figure(fig, "reward_vs_temperature.png")
    plt.close(fig)
