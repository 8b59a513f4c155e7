"""Running a list of StepSpecs as a DAG of Ray tasks.

Each step is one `@ray.remote` task with its own resources; on a cluster, custom resources
place it on the nodes that run its image (`data_node`, `gpu_node`); upstream results are passed as
ObjectRefs, so Ray starts a step as soon as its inputs exist and independent steps (the two
reward models, say) run concurrently. Training steps keep their node light: the node only
launches Ray Train workers, which ask for the CPUs/GPUs.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from pipelines.config import Config, StepResources
from pipelines.console import Console, logged_step, verbose
from pipelines.runner import StepResult, StepSpec, plan_fingerprints
from pipelines.tracking import check_tracking_for_cluster, tracking_uri

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


class ClusterError(RuntimeError):
    """The run would join the wrong Ray cluster or lose its outputs or tracking on a cluster."""


def _in_ray_job() -> bool:
    # The job supervisor of `ray job submit` sets this (and RAY_ADDRESS) for the entrypoint.
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def ensure_ray(cfg: Config, say: Callable[[str], None] | None = None) -> str:
    """Start or join Ray and say which (printed, and returned).

    Inside `ray job submit` the run joins the job's cluster; with `run.ray_address` set it joins
    that cluster; otherwise it starts a private local instance (`address="local"`) and never
    joins a Ray that someone else started on this machine (`ray start` leaves a "current
    cluster" file that a plain `ray.init()` would follow). A RAY_ADDRESS in the environment that
    `run.ray_address` does not name is refused rather than silently followed. Once connected,
    it refuses a file/sqlite tracking store when the cluster has more than one node, and a
    storage root inside the job's temporary working directory, which Ray deletes.

    The local instance keeps workers' output off the console (log_to_driver=False): steps write
    to their own log files (pipelines/console.py), Ray's internal actors to its session logs.
    """
    if ray.is_initialized():
        return "ray: already initialised in this process"
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}}
    env_address = os.environ.get("RAY_ADDRESS")
    if _in_ray_job():
        # The job's runtime env (working_dir, env vars) already applies to every task.
        ray.init(address=env_address or "auto", log_to_driver=True)
        how = "joined the cluster of this Ray job"
    elif cfg.run.ray_address:
        ray.init(address=cfg.run.ray_address, runtime_env=env, log_to_driver=True)
        how = f"joined the cluster named by run.ray_address={cfg.run.ray_address}"
    elif env_address:
        raise ClusterError(
            f"RAY_ADDRESS={env_address} is set but run.ray_address is not: this run does not join a "
            f"cluster it was not told to use. Pass run.ray_address={env_address} to use it, submit "
            f"with `ray job submit`, or unset RAY_ADDRESS to run on a private local instance.")
    else:
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
        env["env_vars"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]
        ray.init(address="local", include_dashboard=False, runtime_env=env, log_to_driver=verbose(),
                 configure_logging=True, logging_level=logging.WARNING)
        how = "started a private local instance"
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    where = ray.get_runtime_context().gcs_address
    message = f"ray: {how} at {where} ({len(nodes)} node{'s' * (len(nodes) != 1)})"
    if say is None:
        print(message, file=sys.stderr, flush=True)
    else:
        say(message)
    check_cluster_storage(cfg, num_nodes=len(nodes), in_job=_in_ray_job())
    return message


def check_cluster_storage(cfg: Config, *, num_nodes: int, in_job: bool, cwd: Path | None = None) -> None:
    """Refuse storage that a cluster run would lose or split: a local file/sqlite tracking
    store on more than one node, or outputs inside `ray job submit`'s working-dir copy."""
    check_tracking_for_cluster(tracking_uri(cfg, Path(cfg.run.output_dir)), num_nodes)
    if not in_job:
        return
    cwd = (cwd or Path.cwd()).resolve()
    out = cfg.run.output_dir
    if "://" not in out and Path(out).resolve().is_relative_to(cwd) and "runtime_resources" in cwd.parts:
        raise ClusterError(
            f"run.output_dir {out} lies inside this job's working-directory copy ({cwd}), which Ray "
            f"deletes after the job, so nothing would be cached for the next one. Pass --output-dir "
            f"on storage every node shares (the cluster presets use /mnt/llama2/outputs).")


def step_resources(cfg: Config, name: str) -> StepResources | None:
    """`run.resources` of a step: by its name, else by its base name (`rs` for every `rs_v{i}`)."""
    return cfg.run.resources.get(name) or cfg.run.resources.get(re.sub(r"_v\d+$", "", name))


def _task_options(spec: StepSpec, res: StepResources | None) -> dict[str, Any]:
    """Ray task options of a step: CPUs/GPUs/memory, plus the custom resources that place it
    on the nodes of its image (`data_node`, `gpu_node`; see StepResources)."""
    res = res or StepResources(num_cpus=0.0 if spec.light else 1.0)
    opts: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus, "max_retries": 0,
                            "name": f"step:{spec.name}"}
    if res.memory_gb:
        opts["memory"] = int(res.memory_gb * 2**30)
    if res.resources:
        opts["resources"] = dict(res.resources)
    return opts


def run_dag(specs: list[StepSpec], cfg: Config, tracking: Any, *, all_specs: list[StepSpec] | None = None,
            console: Console | None = None, key_metrics: dict[str, list[str]] | None = None,
            ) -> list[StepResult]:
    """Run `specs` (a topologically ordered, closed subset of the pipeline) on Ray, printing a
    line per step as it ends (and, on a terminal, the steps in flight) on `console`."""
    console = console or Console(Path(cfg.run.output_dir), quiet=False)
    fps = plan_fingerprints(all_specs or specs, cfg)
    cfg_json = cfg.model_dump_json()
    remote = ray.remote(logged_step)
    refs: dict[str, ray.ObjectRef] = {}
    for spec in specs:
        upstream = {arg: refs[src] for arg, src in spec.inputs.items()}
        opts = _task_options(spec, step_resources(cfg, spec.name))
        refs[spec.name] = remote.options(**opts).remote(console.step_log(spec.name), spec, cfg_json,
                                                        fps[spec.name], tracking, **upstream)

    results: dict[str, StepResult] = {}
    pending = {ref: name for name, ref in refs.items()}
    while pending:
        # a short wait: between two, the console relays notices and redraws its status line
        done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
        if not done:
            console.poll(pending.values())
            continue
        name = pending.pop(done[0])
        try:
            results[name] = ray.get(done[0])
        except Exception as e:
            for ref in pending:
                ray.cancel(ref)
            if console.quiet:  # steps after the failed one fail with its error: said once, not at exit
                os.environ["RAY_IGNORE_UNHANDLED_ERRORS"] = "1"
            raise StepFailed(name, e) from e
        r = results[name]
        console.step_done(name, r.cached, r.seconds, r.metrics, key_metrics)
    return [results[s.name] for s in specs]


class StepFailed(RuntimeError):
    def __init__(self, step: str, cause: BaseException):
        cause = getattr(cause, "cause", None) or cause  # RayTaskError wraps the step's exception
        super().__init__(f"step {step!r} failed: {type(cause).__name__}: {cause}")
        self.step = step
        self.cause = cause
