"""Ray Tune sweep of a reward model (`reward.tune`): a grid over learning rate x margin table
(x `num_samples` seeds), each trial one training on the shared engine, chosen by accuracy on
a validation share of the train split (steps/reward.py split_validation; never the eval
split, which the step's reported accuracy comes from).

Shape (shared/STACK.md, Ray 2.60): each trial is a light driver function (`driver_cpus`) that
calls steps.engine.train, whose TorchTrainer asks for the workers; `max_concurrent_trials`
bounds how many trainings run at once (1 on two cores). Train V2 rejects Tune's logger
callbacks, so each trial's engine logs its curves into its own MLflow child run of the step's
run (created here, tagged with the trial's lr and margin), and the trial table goes on the
step's run. The chosen trial's weights and history become the step's output.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np


def _trial(config: dict, base: dict) -> None:
    """One Tune trial: train with this grid point's lr and margin, report validation accuracy."""
    from ray import tune

    from steps.engine import train

    idx = config["idx"]
    lr, margin, sample = base["grid"][idx]
    trial_dir = Path(base["root"]) / f"trial_{idx:03d}"
    optim = base["optim_cfg"].model_copy(update={"lr": lr})
    result = train(base["objectives"][margin], base["train_cfg"], optim, work_dir=trial_dir / "work",
                   out_dir=trial_dir / "out", seed=base["seed"] + sample, tracking_uri=base["tracking_uri"],
                   mlflow_run_id=base["run_ids"][idx])
    final = result.final  # the engine evaluates the validation pairs after the last step
    tune.report({"val_accuracy": float(final.get("eval_accuracy", np.nan)),
                 "val_loss": float(final.get("eval_loss", np.nan)), "train_loss": float(final.get("loss", np.nan)),
                 "steps": float(result.final.get("step", 0)), "seconds": result.seconds})


def _child_runs(ctx, grid: list[tuple]) -> list[str | None]:
    if not (ctx.tracking_uri and ctx.mlflow_run_id):
        return [None] * len(grid)
    from mlflow import MlflowClient

    client = MlflowClient(ctx.tracking_uri)
    step_run = client.get_run(ctx.mlflow_run_id)
    exp = step_run.info.experiment_id
    # trials carry the invocation's lineage (commit, Ray job, user) like every run of the pipeline
    context = {k: v for k, v in step_run.data.tags.items()
               if k.startswith(("git.", "ray.", "mlflow.user", "mlflow.source."))}
    ids = []
    for i, (lr, margin, sample) in enumerate(grid):
        run = client.create_run(exp, run_name=f"{ctx.step}/trial_{i:03d}", tags={
            **context, "mlflow.parentRunId": ctx.mlflow_run_id, "stage": "reward-tune", "step": ctx.step,
            "tune.lr": str(lr), "tune.margin": margin, "tune.sample": str(sample)})
        ids.append(run.info.run_id)
    return ids


def _close_child_runs(ctx, run_ids: list[str | None], rows: list[dict]) -> None:
    if not ctx.tracking_uri:
        return
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(ctx.tracking_uri)
    now = int(time.time() * 1000)
    for run_id, row in zip(run_ids, rows):
        if run_id is None:
            continue
        client.log_batch(run_id, params=[Param("lr", str(row["lr"])), Param("margin", row["margin"])],
                         metrics=[Metric(k, float(row[k]), now, 0) for k in ("val_accuracy", "val_loss", "train_loss")
                                  if np.isfinite(row[k])])
        client.set_terminated(run_id, "FINISHED" if not row["error"] else "FAILED")


def sweep(ctx, rcfg, make_objective):
    """Run the grid; returns (the chosen trial's TrainResult with weights copied into
    ctx.out_dir, its margin, metrics)."""
    from ray import tune

    from steps.engine import TrainResult
    from steps.reward import MARGINS

    tcfg = rcfg.tune
    grid = [(lr, m, s) for s in range(tcfg.num_samples) for lr in tcfg.lrs for m in tcfg.margins]
    root = ctx.work_dir / "tune"
    run_ids = _child_runs(ctx, grid)
    base = {"grid": grid, "root": str(root), "objectives": {m: make_objective(m) for m in tcfg.margins},
            "train_cfg": rcfg.train, "optim_cfg": rcfg.optim, "seed": ctx.seed, "tracking_uri": ctx.tracking_uri,
            "run_ids": run_ids}
    trainable = tune.with_resources(tune.with_parameters(_trial, base=base), {"cpu": tcfg.driver_cpus})
    tuner = tune.Tuner(trainable, param_space={"idx": tune.grid_search(list(range(len(grid))))},
                       tune_config=tune.TuneConfig(metric="val_accuracy", mode="max",
                                                   max_concurrent_trials=tcfg.max_concurrent_trials),
                       run_config=tune.RunConfig(name=ctx.step, storage_path=str(root / "ray"), verbose=0))
    results = tuner.fit()

    rows = []
    for r in results:
        lr, margin, sample = grid[r.config["idx"]]
        m = r.metrics or {}
        rows.append({"trial": r.config["idx"], "lr": lr, "margin": margin, "sample": sample,
                     "val_accuracy": float(m.get("val_accuracy", np.nan)), "val_loss": float(m.get("val_loss", np.nan)),
                     "train_loss": float(m.get("train_loss", np.nan)), "error": str(r.error or "")})
    rows.sort(key=lambda x: x["trial"])
    _close_child_runs(ctx, [run_ids[x["trial"]] for x in rows], rows)
    ctx.log_table({k: [x[k] for x in rows] for k in rows[0]}, "tune_trials.json")
    ok = [x for x in rows if not x["error"] and np.isfinite(x["val_accuracy"])]
    if not ok:
        raise RuntimeError(f"reward tune sweep: every trial failed: {[x['error'][:200] for x in rows]}")
    best = max(ok, key=lambda x: (x["val_accuracy"], -x["val_loss"]))  # ties: the better-calibrated one
    out = root / f"trial_{best['trial']:03d}" / "out"
    shutil.copyfile(out / "model.safetensors", ctx.out_dir / "model.safetensors")
    shutil.copyfile(out / "history.json", ctx.out_dir / "history.json")
    history = json.loads((out / "history.json").read_text())
    ctx.log_params({"tune.best_lr": best["lr"], "tune.best_margin": best["margin"], "tune.trials": len(rows)})
    ctx.set_tags({"tune.best_trial": str(best["trial"])})
    metrics = {"tune.trials": float(len(rows)), "tune.failed_trials": float(len(rows) - len(ok)),
               "tune.best_val_accuracy": best["val_accuracy"], "tune.best_lr": best["lr"],
               "tune.best_margin_max": max(MARGINS[best["margin"]])}
    return TrainResult(ctx.out_dir / "model.safetensors", history, float("nan"), float("nan")), best["margin"], metrics
