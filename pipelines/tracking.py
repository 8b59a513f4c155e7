"""MLflow tracking: one parent run per pipeline invocation, one nested run per step.

Everything goes through an explicit `MlflowClient` and run ids (no fluent global state), so
the same code works in the driver, in Ray step tasks and in rank 0 of training workers.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow import MlflowClient
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag

if TYPE_CHECKING:
    from pipelines.config import Config



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
        return exp.experiment_id
    # A tracking server stores artifacts where its --artifacts-destination says (proxied, so no
    # client needs the store's path or credentials); a local store keeps them under the storage root.
    location = None if uri.startswith(("http://", "https://")) else artifact_root.as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another invocation
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def start_run(tracking: Tracking, name: str, tags: dict[str, str]) -> str:
    all_tags = dict(tags)
    if tracking.parent_run_id:
        all_tags["mlflow.parentRunId"] = tracking.parent_run_id
    run = tracking.client().create_run(tracking.experiment_id, run_name=name, tags=all_tags)
    return run.info.run_id


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

    def register_model(self, name: str, local_dir: Path, alias: str, tags: dict[str, str] | None = None) -> int:
        """Log `local_dir` (an HF model directory) to the run and register it as a new version
        of model `name` with `alias` (e.g. `sft`, `rlhf-v3`, `champion`) and version `tags` (e.g.
        the data versions a reward model saw); returns the version."""
        client = self.client
        self.log_artifact(local_dir, "hf")
        run = client.get_run(self.run_id)
        try:
            client.create_registered_model(name)
        except Exception:  # already registered
            pass
        version = client.create_model_version(name, source=f"{run.info.artifact_uri}/hf", run_id=self.run_id,
                                              tags={"alias": alias, **(tags or {})})
        client.set_registered_model_alias(name, alias, version.version)
        return int(version.version)

    def set_model_alias(self, name: str, alias: str, version: int) -> None:
        """Point `alias` (e.g. `champion`) of registered model `name` at an existing version."""
        self.client.set_registered_model_alias(name, alias, str(version))

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
