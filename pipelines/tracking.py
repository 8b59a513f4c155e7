"""MLflow tracking: one parent run per pipeline invocation, one nested run per step.

Everything goes through an explicit `MlflowClient` and run ids (no fluent global state), so
the same code works in the driver, in Ray step tasks and in rank 0 of training workers.

Lineage (what a person needs to trust a number in the UI): every run carries the git commit
(and whether the tree was dirty), the Ray job and the user, resolved once in the driver and
inherited by the nested runs from their parent; a cache-hit run links to the run that produced
its artifact and carries that run's params and metrics; registered models are MLflow Models
(pipelines/registry.py).
"""

from __future__ import annotations

import functools
import getpass
import json
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow import MlflowClient
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag

if TYPE_CHECKING:
    from pipelines.config import Config

REPO = Path(__file__).resolve().parent.parent
# MLflow 3's UI opens an experiment in its GenAI view unless this tag says it is for model
# training (the values are the UI's: `custom_model_development` is "machine learning").
EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT = "mlflow.experimentKind", "custom_model_development"
PRODUCER_TAG = "lineage.producer_run_id"  # on a cache-hit run: the run that produced its artifact
# Tags resolved in the driver for the parent run and copied onto every nested run.
CONTEXT_TAGS = ("mlflow.user", "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit",
                "git.commit", "git.dirty", "ray.job_id", "ray.session")


@dataclass(frozen=True)
class Tracking:
    """Where to log: picklable, handed to every step task."""

    uri: str
    experiment_id: str
    parent_run_id: str | None = None

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri)


def tracking_uri(cfg: Config, output_root: Path) -> str:
    """run.tracking_uri with environment variables expanded (cluster presets name the head as
    ${LLAMA2_MLFLOW_HOST}, which the head's start command or pod spec sets), else a sqlite file under the
    storage root. Resolved once in the driver: every step gets the resolved string."""
    if not cfg.run.tracking_uri:
        return f"sqlite:///{output_root / 'mlflow.db'}"
    uri = os.path.expandvars(cfg.run.tracking_uri)
    if "$" in uri:
        raise TrackingStoreError(
            f"run.tracking_uri {cfg.run.tracking_uri!r} names an environment variable that is not set "
            f"(got {uri!r}). On a cluster the head sets LLAMA2_MLFLOW_HOST (ray_cluster.yaml, "
            f"infra/kuberay/); elsewhere pass run.tracking_uri=<server URL>.")
    return uri


class TrackingStoreError(ValueError):
    """The tracking URI cannot work where the pipeline runs."""


def local_store_path(uri: str) -> str | None:
    """The local path behind a file- or sqlite-backed tracking URI; None for a server
    (http/https/databricks) or a database reached over the network (postgresql, mysql)."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri  # a plain path: MLflow's file store
    if scheme == "file":
        return rest
    if scheme == "sqlite":
        return rest.removeprefix("/") if rest.startswith("//") else rest  # sqlite:////abs, sqlite:///rel
    return None


def check_tracking_for_cluster(uri: str, num_nodes: int) -> None:
    """Refuse a file- or sqlite-backed store on more than one node: steps on other nodes would
    write their own copy (a path that exists only there) or contend on one sqlite file over a
    network file system, and the UI on the head would miss their runs."""
    path = local_store_path(uri)
    if path is None or num_nodes <= 1:
        return
    kind = "sqlite" if uri.startswith("sqlite:") else "file"
    raise TrackingStoreError(
        f"run.tracking_uri is {uri!r}, a {kind} store on a local path ({path}), but this Ray cluster has "
        f"{num_nodes} nodes. Point run.tracking_uri at the cluster's MLflow server (the cluster presets "
        f"use http://${{LLAMA2_MLFLOW_HOST}}:5000: the server ray_cluster.yaml starts on the head, or "
        f"infra/kuberay/mlflow.yaml); see infra/README.md.")


def setup_experiment(uri: str, name: str, artifact_root: Path) -> str:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        _mark_training(client, exp)
        return exp.experiment_id
    # A tracking server stores artifacts where its --artifacts-destination says (proxied, so no
    # client needs the store's path or credentials); a local store keeps them under the storage root.
    location = None if uri.startswith(("http://", "https://")) else artifact_root.as_uri()
    try:
        return client.create_experiment(name, artifact_location=location,
                                        tags={EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT})
    except Exception:  # created concurrently by another invocation
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        _mark_training(client, exp)
        return exp.experiment_id


def _mark_training(client: MlflowClient, exp: Any) -> None:
    """Experiments created before this tag existed (or by hand) open in the training view too."""
    if exp.tags.get(EXPERIMENT_KIND_TAG) != TRAINING_EXPERIMENT:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT)


def start_run(tracking: Tracking, name: str, tags: dict[str, str]) -> str:
    """A run with the invocation's context tags: resolved here for a parent run (the driver),
    copied from the parent for a nested one (a Ray task may run where there is no git checkout,
    and every step of one invocation is the same commit, job and user)."""
    if tracking.parent_run_id:
        context = _parent_context(tracking.uri, tracking.parent_run_id)
        all_tags = {**context, **tags, "mlflow.parentRunId": tracking.parent_run_id}
    else:
        all_tags = {**run_context_tags(), **tags}
    run = tracking.client().create_run(tracking.experiment_id, run_name=name, tags=all_tags)
    return run.info.run_id


@functools.lru_cache(maxsize=8)
def _parent_context(uri: str, parent_run_id: str) -> dict[str, str]:
    tags = MlflowClient(tracking_uri=uri).get_run(parent_run_id).data.tags
    return {k: tags[k] for k in CONTEXT_TAGS if k in tags}


def run_context_tags(repo: Path = REPO) -> dict[str, str]:
    """Who ran what where: the user, the entry point, the git commit and whether the tree had
    uncommitted changes, and the Ray job (the submission id under `ray job submit`, else this
    driver's job in its Ray session). `mlflow.*` names are the ones the MLflow UI shows."""
    tags = {"mlflow.user": _user(), "mlflow.source.name": Path(sys.argv[0]).name or "python",
            "mlflow.source.type": "JOB" if _ray_submission_id() else "LOCAL"}
    commit, dirty = git_state(repo)
    tags.update({"mlflow.source.git.commit": commit, "git.commit": commit, "git.dirty": dirty})
    tags.update(ray_tags())
    return tags


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name (a container user without a passwd entry)
        return os.environ.get("USER", "unknown")


def git_state(repo: Path) -> tuple[str, str]:
    """(commit, "true"/"false" dirty) of the checkout the code runs from. A copy without .git
    (`ray job submit --working-dir`, an image) reports LLAMA2_GIT_COMMIT if set (the submit
    command or the image build sets it), else "unknown"."""
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        # untracked files (outputs, caches) do not change what runs; modified tracked files do
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30, check=True).stdout
        return commit, "true" if status.strip() else "false"
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("LLAMA2_GIT_COMMIT", "unknown"), os.environ.get("LLAMA2_GIT_DIRTY", "unknown")


def _ray_submission_id() -> str | None:
    """The id `ray job submit` gave this job: the job supervisor hands the driver its job
    config (with the submission id in its metadata) in this environment variable."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None


def ray_tags() -> dict[str, str]:
    tags: dict[str, str] = {}
    if submission := _ray_submission_id():
        tags["ray.job_id"] = submission
    if "ray" in sys.modules:  # never import Ray (seconds) just to name a session that is not there
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            tags.setdefault("ray.job_id", ctx.get_job_id())
            tags["ray.session"] = ctx.get_session_name()
    return tags


def pipeline_run_name(title: str, preset: str, now: datetime | None = None) -> str:
    """The parent run's name: distinct per invocation, sortable, readable in the run list.
    `full-tiny-2026-11-30T20:15` (UTC); a weekly run names its ISO week and weekday,
    `weekly-tiny-2026-W48-1T20:15` (ISO 8601 week date), so a week's runs group by name."""
    now = now or datetime.now(UTC)
    if title == "weekly":
        year, week, day = now.isocalendar()
        return f"{title}-{preset}-{year}-W{week:02d}-{day}T{now:%H:%M}"
    return f"{title}-{preset}-{now:%Y-%m-%dT%H:%M}"


def start_pipeline_run(tracking: Tracking, title: str, preset: str, tags: dict[str, str]) -> str:
    """The parent run of one invocation, named by pipeline_run_name; a second invocation within
    the same minute gets a `-2`, `-3`, ... suffix, so names stay distinct."""
    now = datetime.now(UTC)
    base = name = pipeline_run_name(title, preset, now)
    client = tracking.client()
    taken = {r.info.run_name for r in client.search_runs(
        [tracking.experiment_id], f"attributes.run_name LIKE '{base}%'", max_results=1000)}
    n = 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    year, week, _ = now.isocalendar()
    return start_run(tracking, name, {"started": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                                      "iso_week": f"{year}-W{week:02d}", **driver_tags(), **tags})


# On the parent run: the driver process of the invocation, so that the next invocation can tell
# a run left RUNNING by a killed driver (kill -9, a lost head node) from one still going.
DRIVER_TAGS = ("driver.host", "driver.pid", "driver.started")


def driver_tags() -> dict[str, str]:
    import psutil

    return {"driver.host": socket.gethostname(), "driver.pid": str(os.getpid()),
            "driver.started": f"{psutil.Process().create_time():.2f}"}  # a reused pid has another start


def _driver_alive(tags: dict[str, str]) -> bool:
    import psutil

    try:
        return f"{psutil.Process(int(tags['driver.pid'])).create_time():.2f}" == tags["driver.started"]
    except (psutil.Error, KeyError, ValueError):
        return False


def close_orphaned_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED the runs a killed invocation left RUNNING: parent runs whose driver ran on
    this host and is gone, with every run nested under them (steps, Tune trials) still RUNNING;
    each gets a tag saying so. Drivers on other hosts cannot be checked from here and are left
    alone (a pipeline's driver runs on the head node, where the next invocation runs too).
    Returns the ids of the closed parent runs."""
    host = socket.gethostname()
    closed = []
    for parent in client.search_runs([experiment_id], "attributes.status = 'RUNNING' and "
                                     f"tags.`driver.host` = '{host}'", max_results=1000):
        if _driver_alive(parent.data.tags):
            continue
        note = (f"closed by a later invocation: driver pid {parent.data.tags.get('driver.pid')} on {host} "
                "was gone (killed) while this run was RUNNING")
        todo = [parent.info.run_id]
        while todo:
            run_id = todo.pop()
            todo += [r.info.run_id for r in client.search_runs(
                [experiment_id], f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'",
                max_results=1000)]
            client.set_tag(run_id, "ended_by", note)
            client.set_terminated(run_id, status="KILLED")
        closed.append(parent.info.run_id)
    return closed


def link_cache_hit(client: MlflowClient, run_id: str, producer_run_id: str | None,
                   manifest_metrics: dict[str, Any], artifact_path: str) -> None:
    """Make a cache-hit run stand for its artifact: tag and link (in the run's description) the
    run that produced it, and copy that run's params and latest metric values, so runs of
    different invocations compare side by side whether a step ran or not. A producer that this
    tracking store does not hold (the store was reset) leaves the manifest's metrics."""
    logger = RunLogger(client, run_id)
    producer = None
    if producer_run_id:
        try:
            producer = client.get_run(producer_run_id)
        except Exception:  # not in this store
            producer = None
    tags = {"artifact_path": artifact_path}
    if producer is None:
        logger.log_metrics(manifest_metrics)
        note = (f"Cache hit: nothing ran. The artifact `{artifact_path}` was produced by run "
                f"`{producer_run_id or 'unknown'}`, which this tracking store does not hold.")
    else:
        info = producer.info
        params = [Param(k, v) for k, v in producer.data.params.items()]
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in producer.data.metrics.items()
                   if not k.startswith("system/")]  # the producer's machine load is not this run's
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i:i + 100])
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        started = datetime.fromtimestamp(info.start_time / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")
        tags.update({PRODUCER_TAG: info.run_id, "lineage.producer_experiment_id": info.experiment_id,
                     "lineage.producer_run_name": info.run_name or ""})
        note = (f"Cache hit: nothing ran. The artifact `{artifact_path}` was produced by run "
                f"[{info.run_name} ({info.run_id[:8]})](#/experiments/{info.experiment_id}/runs/{info.run_id}) "
                f"on {started}; its params and metrics are copied here.")
    tags["mlflow.note.content"] = note
    logger.set_tags(tags)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class RunLogger:
    """Logging into one MLflow run; the methods a StepContext exposes to steps."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        flat = flatten(params)
        items = [Param(k[:250], json.dumps(v, default=str)[:6000] if not isinstance(v, str) else v[:6000])
                 for k, v in flat.items()]
        for i in range(0, len(items), 100):  # MLflow's per-batch limit
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in flatten(metrics).items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_figure(self, figure: Any, name: str) -> None:
        self.client.log_figure(self.run_id, figure, name)

    def log_table(self, data: dict[str, list] | Any, name: str) -> None:
        self.client.log_table(self.run_id, data, name)

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        self.client.log_dict(self.run_id, data, name)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_input_artifact(self, name: str, fingerprint: str, path: Path, context: str = "input") -> None:
        """Record an upstream artifact as an MLflow dataset input with its digest."""
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source

        with warnings.catch_warnings():  # two registered local sources match; both are equivalent
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(path))
        dataset = MetaDataset(source=source, name=name, digest=fingerprint)
        inputs = [DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])]
        for attempt in range(5):
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
                return
            except Exception as e:
                # Steps running at the same time (the two reward models) log the same upstream
                # artifact: both may try to create its dataset row, and one insert loses the race.
                # The row exists now, so the next attempt links to it.
                if "UNIQUE constraint" not in str(e) or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def log_history_figure(self, history: list[dict[str, float]], keys: list[str], name: str,
                           title: str = "") -> None:
        """Plot metric curves from a list of {step, key: value} rows and log the PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in keys:
            pts = [(h["step"], h[key]) for h in history if key in h]
            if pts:
                ax.plot(*zip(*pts), label=key)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        self.log_figure(fig, name)
        plt.close(fig)

    def register_model(self, name: str, local_dir: Path, alias: str, tags: dict[str, str] | None = None,
                       dtype: str = "auto") -> int:
        """Log `local_dir` (an HF model directory) to the run as an MLflow Model at artifact path
        `hf` (pipelines/registry.py: loadable and servable by `models:/<name>@<alias>`, weights in
        `dtype`: auto = as exported) and register it as a new version of model `name` with
        `alias` (e.g. `sft`, `rlhf-v3`, `champion`) and version `tags` (e.g. the data versions a
        reward model saw), plus the step, fingerprint, task and dtype; returns the version."""
        from pipelines.registry import log_mlflow_model

        client = self.client
        run = client.get_run(self.run_id)
        step, fp = run.data.tags.get("step", run.info.run_name), run.data.tags.get("fingerprint", "")
        card = (f"Registered by step `{step}` (artifact fingerprint `{fp}`) in MLflow run `{self.run_id}` "
                f"as alias `{alias}`.")
        source, info = log_mlflow_model(client, self.run_id, Path(local_dir), "hf", name=name, dtype=dtype,
                                        card=card)
        try:
            client.create_registered_model(name)
        except Exception:  # already registered
            pass
        version = client.create_model_version(
            name, source=source, run_id=self.run_id, description=card,
            tags={"alias": alias, "step": step, "fingerprint": fp, **info, **(tags or {})})
        client.set_registered_model_alias(name, alias, version.version)
        return int(version.version)

    def set_model_alias(self, name: str, alias: str, version: int) -> None:
        """Point `alias` (e.g. `champion`) of registered model `name` at an existing version."""
        self.client.set_registered_model_alias(name, alias, str(version))

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
