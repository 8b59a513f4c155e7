"""The step runner: fingerprints, skip-if-complete, MLflow nesting, manifests.

A step module (steps/*.py) exposes `VERSION` and `run(ctx, **inputs) -> metrics`. It knows
nothing of caching or the DAG. The runner computes the step's fingerprint from its version,
its config subset and its inputs' fingerprints; if a complete artifact with that fingerprint
exists it is a cache hit and nothing runs. Otherwise the step writes into a staging directory
inside its own nested MLflow run, and the runner publishes the artifact atomically.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from pipelines.artifacts import Artifact, ArtifactStore, fingerprint
from pipelines.config import Config
from pipelines.tracking import RunLogger, Tracking, link_cache_hit, start_run

log = logging.getLogger("pipelines")


@dataclass(frozen=True)
class StepSpec:
    """One node of a pipeline: which step module runs, on what, with which config."""

    name: str  # artifact directory and MLflow run name, e.g. "data", "rs_v3"
    module: str | ModuleType  # the step module (VERSION, run(ctx, **inputs)); kept as its import name
    stage: str  # MLflow tag, e.g. "data", "pretrain", "rlhf"
    config_keys: tuple[str, ...]  # dotted config subsets that determine the output
    inputs: dict[str, str] = field(default_factory=dict)  # run() kwarg -> upstream step name
    params: dict[str, Any] = field(default_factory=dict)  # extra run() kwargs (in the fingerprint)
    tags: dict[str, str] = field(default_factory=dict)
    light: bool = False  # the node only drives Ray Data jobs or Ray Train workers: it asks for no CPU

    def __post_init__(self) -> None:  # a module object is not picklable; its name travels to Ray
        if isinstance(self.module, ModuleType):
            object.__setattr__(self, "module", self.module.__name__)


@dataclass(frozen=True)
class StepResult:
    """What a step task returns to the driver (small, picklable)."""

    name: str
    fingerprint: str
    path: str
    cached: bool
    seconds: float
    metrics: dict[str, Any]
    run_id: str | None

    def artifact(self) -> Artifact:
        return Artifact.load(Path(self.path))


class StepContext:
    """What a step's run() receives besides its inputs. Logging methods (log_metrics,
    log_params, log_figure, log_table, log_artifact, log_history_figure, register_model,
    set_tags, ...) go to the step's MLflow
    run (pipelines/tracking.py RunLogger), or nowhere when the step runs untracked (tests)."""

    def __init__(self, cfg: Config, spec: StepSpec, out_dir: Path, work_dir: Path,
                 tracking: Tracking | None, run_id: str | None):
        self.cfg = cfg
        self.spec = spec
        self.step = spec.name
        self.out_dir = out_dir
        self.work_dir = work_dir
        self.seed = cfg.run.seed
        self.tracking_uri = tracking.uri if tracking else None
        self.mlflow_run_id = run_id
        self.logger: RunLogger | _NullLogger = (
            RunLogger(tracking.client(), run_id) if tracking and run_id else _NullLogger())
        self._parent: RunLogger | _NullLogger = (
            RunLogger(tracking.client(), tracking.parent_run_id) if tracking and tracking.parent_run_id
            else _NullLogger())

    def register_model(self, name: str, local_dir: Path, alias: str, tags: dict[str, str] | None = None) -> int:
        """Register an HF export as an MLflow Model version (RunLogger.register_model), its
        weights stored in run.registry_dtype (bf16 on the big presets)."""
        if isinstance(self.logger, _NullLogger):
            return 0
        return self.logger.register_model(name, local_dir, alias, tags, dtype=self.cfg.run.registry_dtype)

    def log_parent_figure(self, figure: Any, name: str) -> None:
        """A figure on the pipeline's parent run (one that grows across steps, e.g. win rate by
        RLHF version), so the MLflow UI shows it on the invocation as a whole."""
        self._parent.log_figure(figure, name)

    def __getattr__(self, name: str) -> Any:  # only reached for names not set above
        if name in ("logger", "_parent"):
            raise AttributeError(name)
        return getattr(self.logger, name)


class _NullLogger:
    """An untracked run: every logging call does nothing (register_model returns version 0)."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return lambda *args, **kwargs: 0 if name == "register_model" else None


def step_module(spec: StepSpec) -> Any:
    return importlib.import_module(spec.module)


def input_fingerprint(spec: StepSpec, cfg: Config) -> str | None:
    """Steps that read raw inputs outside the store (corpora, preference batches) fingerprint
    them with an optional module-level `fingerprint_inputs(cfg, **params) -> str | None`."""
    fn: Callable[..., str | None] | None = getattr(step_module(spec), "fingerprint_inputs", None)
    return fn(cfg, **spec.params) if fn else None


def plan_fingerprints(specs: list[StepSpec], cfg: Config) -> dict[str, str]:
    """Fingerprint every step in topological order, before anything runs."""
    fps: dict[str, str] = {}
    for spec in specs:
        missing = [src for src in spec.inputs.values() if src not in fps]
        if missing:
            raise ValueError(f"step {spec.name}: inputs {missing} are not earlier steps of the pipeline")
        inputs = {arg: fps[src] for arg, src in spec.inputs.items()}
        raw = input_fingerprint(spec, cfg)
        if raw is not None:
            inputs["__raw__"] = raw
        config = cfg.subset(*spec.config_keys)
        config["__params__"] = spec.params
        fps[spec.name] = fingerprint(spec.name, str(step_module(spec).VERSION), config, inputs)
    return fps


def execute_step(spec: StepSpec, cfg_json: str, fp: str, tracking: Tracking | None,
                 **inputs: StepResult) -> StepResult:
    """Run (or skip) one step. Called in a Ray task; also callable directly (tests)."""
    _configure_logging()
    cfg = Config.model_validate_json(cfg_json)
    store = ArtifactStore(cfg.run.output_dir)
    tags = {"stage": spec.stage, "step": spec.name, "fingerprint": fp, **spec.tags}
    start = time.time()

    existing = store.get(spec.name, fp)
    if existing is not None:
        store.check(existing)  # a cached artifact is reused only if intact
        run_id = None
        if tracking:
            run_id = start_run(tracking, spec.name, {**tags, "cache_hit": "true"})
            client = tracking.client()
            link_cache_hit(client, run_id, existing.manifest.get("mlflow_run_id"), existing.metrics,
                           str(existing.path))
            RunLogger(client, run_id).end()
        log.info("%-14s cached  %s", spec.name, existing.path)
        return StepResult(spec.name, fp, str(existing.path), True, time.time() - start, existing.metrics, run_id)

    input_artifacts = {arg: store.check(res.artifact()) for arg, res in inputs.items()}
    run_id = start_run(tracking, spec.name, {**tags, "cache_hit": "false"}) if tracking else None
    staging = store.staging_dir(spec.name, fp)
    ctx = StepContext(cfg, spec, staging, store.work_dir(spec.name, fp), tracking, run_id)
    ctx.log_params(cfg.subset(*spec.config_keys))
    for arg, art in input_artifacts.items():
        ctx.log_input_artifact(f"{art.step}:{arg}", art.fingerprint, art.path)
    log.info("%-14s running -> %s", spec.name, store.path(spec.name, fp))
    try:
        metrics = step_module(spec).run(ctx, **input_artifacts, **spec.params) or {}
        seconds = time.time() - start
        manifest = {
            "step": spec.name,
            "module": spec.module,
            "version": str(step_module(spec).VERSION),
            "fingerprint": fp,
            "config": cfg.subset(*spec.config_keys),
            "params": spec.params,
            "inputs": {arg: {"step": a.step, "fingerprint": a.fingerprint} for arg, a in input_artifacts.items()},
            "metrics": metrics,
            "seconds": round(seconds, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "mlflow_run_id": run_id,
        }
        artifact = store.publish(staging, manifest)
        ctx.log_metrics({**metrics, "step_seconds": seconds})
        ctx.log_dict(artifact.manifest, "manifest.json")
        ctx.set_tags({"artifact_path": str(artifact.path)})
        ctx.end()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        ctx.log_text(traceback.format_exc(), "error.txt")
        ctx.end("FAILED")
        raise
    return StepResult(spec.name, fp, str(artifact.path), False, seconds, metrics, run_id)


def _configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"),
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")


def summary_table(results: list[StepResult], key_metrics: dict[str, list[str]] | None = None) -> str:
    """A plain-text table of steps: ran or cached, seconds, a few key metrics."""
    rows = [("step", "status", "seconds", "metrics")]
    for r in results:
        base = re.sub(r"_v\d+$", "", r.name)  # rs_v3 -> rs: one entry for every iteration
        keys = (key_metrics or {}).get(r.name) or (key_metrics or {}).get(base) or list(r.metrics)[:4]
        shown = ", ".join(f"{k}={_fmt(r.metrics[k])}" for k in keys if k in r.metrics)
        rows.append((r.name, "cached" if r.cached else "ran", f"{r.seconds:.1f}", shown))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d}" for a, b, c, d in rows]
    lines.insert(1, "-" * max(len(x) for x in lines))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v) if not isinstance(v, str) else v
