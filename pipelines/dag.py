"""Running a list of StepSpecs as a DAG of Ray tasks.

Each step is one `@ray.remote` task with its own resources and, on a cluster, its own
container image (`runtime_env={"image_uri": ...}`); upstream results are passed as
ObjectRefs, so Ray starts a step as soon as its inputs exist and independent steps (the two
reward models, say) run concurrently. Training steps keep their node light: the node only
launches Ray Train workers, which ask for the CPUs/GPUs.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import ray

from pipelines.config import Config, StepResources
from pipelines.runner import StepResult, StepSpec, execute_step, plan_fingerprints

log = logging.getLogger("pipelines")
REPO_ROOT = Path(__file__).resolve().parent.parent


def select(specs: list[StepSpec], stages: list[str] | None, until: str | None) -> list[StepSpec]:
    """The steps to run: `until` keeps the prefix up to and including that step or stage;
    `stages` keeps the named steps/stages and everything they need."""
    names = [s.name for s in specs]
    if until:
        hits = [i for i, s in enumerate(specs) if until in (s.name, s.stage)]
        if not hits:
            raise ValueError(f"--until {until!r}: no such step or stage (steps: {', '.join(names)})")
        specs = specs[: hits[-1] + 1]
    if stages:
        unknown = [x for x in stages if not any(x in (s.name, s.stage) for s in specs)]
        if unknown:
            raise ValueError(f"--stages: unknown {unknown} (steps: {', '.join(names)})")
        by_name = {s.name: s for s in specs}
        keep: set[str] = set()
        todo = [s.name for s in specs if s.name in stages or s.stage in stages]
        while todo:
            n = todo.pop()
            if n not in keep:
                keep.add(n)
                todo.extend(by_name[n].inputs.values())
        specs = [s for s in specs if s.name in keep]
    return specs


def ensure_ray(cfg: Config) -> None:
    """Join a reachable cluster (`ray job submit` sets RAY_ADDRESS), else start a local one."""
    if ray.is_initialized():
        return
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}}
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=None if "RAY_JOB_ID" in os.environ else env,
                 log_to_driver=True)
        return
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    env["env_vars"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]
    ray.init(include_dashboard=False, runtime_env=env, log_to_driver=True,
             configure_logging=True, logging_level=logging.WARNING)


def _task_options(spec: StepSpec, res: StepResources | None) -> dict[str, Any]:
    res = res or StepResources(num_cpus=0.0 if spec.light else 1.0)
    opts: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus, "max_retries": 0,
                            "name": f"step:{spec.name}"}
    if res.memory_gb:
        opts["memory"] = int(res.memory_gb * 2**30)
    if res.image:
        opts["runtime_env"] = {"image_uri": res.image}
    return opts


def run_dag(specs: list[StepSpec], cfg: Config, tracking: Any, *, all_specs: list[StepSpec] | None = None,
            ) -> list[StepResult]:
    """Run `specs` (a topologically ordered, closed subset of the pipeline) on Ray."""
    fps = plan_fingerprints(all_specs or specs, cfg)
    cfg_json = cfg.model_dump_json()
    remote = ray.remote(execute_step)
    refs: dict[str, ray.ObjectRef] = {}
    for spec in specs:
        upstream = {arg: refs[src] for arg, src in spec.inputs.items()}
        opts = _task_options(spec, cfg.run.resources.get(spec.name))
        refs[spec.name] = remote.options(**opts).remote(spec, cfg_json, fps[spec.name], tracking, **upstream)

    results: dict[str, StepResult] = {}
    pending = {ref: name for name, ref in refs.items()}
    started = time.time()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        name = pending.pop(done[0])
        try:
            results[name] = ray.get(done[0])
        except Exception as e:
            for ref in pending:
                ray.cancel(ref)
            raise StepFailed(name, e) from e
        r = results[name]
        print(f"[{time.time() - started:7.1f}s] {name}: {'cached' if r.cached else 'done'} "
              f"({r.seconds:.1f}s) -> {r.path}", file=sys.stderr, flush=True)
    return [results[s.name] for s in specs]


class StepFailed(RuntimeError):
    def __init__(self, step: str, cause: BaseException):
        cause = getattr(cause, "cause", None) or cause  # RayTaskError wraps the step's exception
        super().__init__(f"step {step!r} failed: {type(cause).__name__}: {cause}")
        self.step = step
        self.cause = cause
