"""One pipeline invocation: storage root, MLflow parent run, Ray, the DAG, the summary.

Shared by pipelines/full.py and pipelines/weekly.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from mlflow import MlflowClient

from pipelines.artifacts import ArtifactStore
from pipelines.config import Config
from pipelines.console import Console, TrainingProgress
from pipelines.dag import ClusterError, StepFailed, ensure_ray, run_dag, select
from pipelines.runner import StepResult, StepSpec, plan_fingerprints, summary_table
from pipelines.tracking import (
    RunLogger,
    Tracking,
    TrackingStoreError,
    close_orphaned_runs,
    setup_experiment,
    start_pipeline_run,
    tracking_uri,
)

log = logging.getLogger("pipelines")


def run_pipeline(cfg: Config, specs: list[StepSpec], *, stages: list[str] | None = None,
                 until: str | None = None, dry_run: bool = False, title: str = "full",
                 key_metrics: dict[str, list[str]] | None = None) -> int:
    store = ArtifactStore(cfg.run.output_dir)
    store.root.mkdir(parents=True, exist_ok=True)
    cfg.run.output_dir = str(store.root)  # absolute: Ray workers may run elsewhere
    chosen = select(specs, stages, until)
    fps = plan_fingerprints(chosen, cfg)  # `chosen` is closed under inputs

    if dry_run:
        for s in chosen:
            state = "cached" if store.get(s.name, fps[s.name]) else "to run"
            print(f"{s.name:<18} {fps[s.name]}  {state}")
        return 0

    with Console(store.root, total=len(chosen)) as console:
        return _run(cfg, chosen, store, console, title, key_metrics)


def _run(cfg: Config, chosen: list[StepSpec], store: ArtifactStore, console: Console, title: str,
         key_metrics: dict[str, list[str]] | None) -> int:
    start = time.time()
    try:  # Ray first: a run that may not proceed on this cluster writes nothing
        ensure_ray(cfg, say=console.say)
        uri = tracking_uri(cfg, store.root)
    except (ClusterError, TrackingStoreError) as e:
        console.say(f"error: {e}")
        return 2
    console.link_ray_logs()
    exp_id = setup_experiment(uri, cfg.run.experiment, store.root / "mlartifacts")
    if orphans := close_orphaned_runs(MlflowClient(uri), exp_id):  # a killed invocation's runs
        console.say(f"marked {len(orphans)} run(s) of a killed invocation KILLED in MLflow")
    parent = start_pipeline_run(Tracking(uri, exp_id), title, cfg.preset,  # e.g. full-tiny-2026-11-30T20:15
                                {"pipeline": title, "preset": cfg.preset,
                                 "steps": ",".join(s.name for s in chosen)})
    tracking = Tracking(uri, exp_id, parent)
    parent_log = RunLogger(tracking.client(), parent)
    parent_log.log_dict(cfg.model_dump(mode="json"), "config.json")
    parent_log.log_params({"preset": cfg.preset, "seed": cfg.run.seed, "output_dir": str(store.root)})
    console.progress = TrainingProgress(tracking)

    try:
        results = run_dag(chosen, cfg, tracking, console=console, key_metrics=key_metrics)
    except StepFailed as e:
        parent_log.set_tags({"failed_step": e.step})
        parent_log.end("FAILED")
        console.failure(e.step, str(e))
        console.say("Re-run the same command to resume: finished steps are cached and "
                    "an interrupted training continues from its last checkpoint.")
        return 1
    parent_log.log_metrics({"pipeline_seconds": time.time() - start,
                            "steps_cached": sum(r.cached for r in results),
                            "steps_ran": sum(not r.cached for r in results)})
    for r in results:
        parent_log.log_metrics({f"{r.name}.{k}": v for k, v in r.metrics.items()})
    parent_log.end()
    print_summary(results, uri, store.root, time.time() - start, key_metrics, show=console.show)
    return 0


def print_summary(results: list[StepResult], uri: str, root: Path, seconds: float,
                  key_metrics: dict[str, list[str]] | None = None,
                  show: Callable[[str], None] = print) -> None:
    show("\n" + summary_table(results, key_metrics))
    show(f"\n{len(results)} steps in {seconds:.1f}s "
         f"({sum(r.cached for r in results)} cached). Artifacts under {root}")
    if uri.startswith(("http://", "https://")):  # the cluster's tracking server (infra/README.md)
        show(f"MLflow UI:  {uri} (from your machine: a port-forward to the server, infra/README.md)")
    else:
        show(f"MLflow UI:  mlflow ui --backend-store-uri {uri} --workers 1")
