"""The AWS cluster path, checked offline: ray_cluster.yaml through Ray's own config preparation
and validation and the AWS node provider's checks that need no credentials, the shared file
system reaching the containers, the images, each step's image mapped to the node types and
KubeRay worker groups that run it, and the guards that keep a cluster run's outputs and
tracking where every node sees them."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipelines.config import load_config

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
CLUSTER_PRESETS = ["7b", "13b", "34b", "70b"]


def _cluster() -> dict:
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def _site_env() -> dict[str, str]:
    out = {}
    for line in (INFRA / "aws" / "site.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def _pinned(package: str) -> str:
    text = (ROOT / "requirements.txt").read_text()
    return re.search(rf"^{re.escape(package)}(?:\[[^\]]*\])?==(\S+)", text, re.M).group(1)


def test_ray_prepares_validates_and_aws_checks_accept_the_cluster():
    from ray.autoscaler._private.aws import config as aws
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(_cluster())  # what `ray up` does first: defaults, docker checks
    validate_config(prepared)  # Ray's JSON schema and node-type rules
    # The AWS provider's bootstrap steps that need no AWS credentials (the rest call EC2/IAM).
    aws.check_legacy_fields(prepared)
    boot = aws._configure_from_launch_template(prepared)
    boot = aws._configure_from_network_interfaces(boot)  # rejects interfaces without subnet/groups
    aws._check_ami(boot)  # aborts for a node type without an image where Ray has no default
    assert all(t["node_config"].get("ImageId") for t in boot["available_node_types"].values())
    # Subnets and security groups are Ray's defaults (it picks and creates them at `ray up`):
    # nothing half-specified that the provider would reject.
    for node_type in prepared["available_node_types"].values():
        nc = node_type["node_config"]
        assert not {"SubnetId", "SubnetIds", "SecurityGroupIds", "NetworkInterfaces"} & set(nc)


def test_the_cluster_checks_reject_what_the_issue_found():
    """The checks above have teeth: the old file's empty EFA subnet and groups fail them."""
    from ray.autoscaler._private.aws import config as aws
    from ray.autoscaler._private.util import prepare_config

    broken = copy.deepcopy(_cluster())
    broken["available_node_types"]["a100_80g"]["node_config"]["NetworkInterfaces"] = [
        {"DeviceIndex": 0, "NetworkCardIndex": 0, "InterfaceType": "efa", "Groups": [], "SubnetId": ""}]
    with pytest.raises(ValueError, match="missing a subnet"):
        aws._configure_from_network_interfaces(prepare_config(broken))


def test_shared_file_system_is_mounted_on_hosts_and_passed_into_containers():
    cluster, site = _cluster(), _site_env()
    mount = site["SHARED_MOUNT"]
    run_options = cluster["docker"]["run_options"]
    assert f"-v {mount}:{mount}" in run_options
    # the host mount happens in initialization_commands (before the container starts), from
    # the synced site scripts; the path Ray syncs file mounts to on a docker host:
    from ray.autoscaler.sdk import get_docker_host_mount_location

    host = get_docker_host_mount_location(cluster["cluster_name"])
    assert cluster["initialization_commands"] == [f"sudo bash {host}/run/llama2-site/node-init.sh"]
    assert (ROOT / cluster["file_mounts"]["/run/llama2-site"]).resolve() == INFRA / "aws"
    env_file = next(o for o in run_options if o.startswith("--env-file"))
    assert env_file == f"--env-file {host}/run/llama2-secrets/mlflow-client.env"
    assert "/run/llama2-secrets" in cluster["file_mounts"]
    node_init = (INFRA / "aws" / "node-init.sh").read_text()
    assert 'mount -t lustre' in node_init and '"$SHARED_MOUNT"' in node_init
    # every cluster preset keeps its outputs on that file system
    for preset in CLUSTER_PRESETS:
        assert load_config(preset).run.output_dir.startswith(mount + "/")


def test_site_parameters_are_defined_and_setup_fails_loudly():
    cluster, site = _cluster(), _site_env()
    scripts = {p.name: p.read_text() for p in (INFRA / "aws").glob("*.sh")}
    assert {"FSX_DNS", "FSX_MOUNT_NAME", "SHARED_MOUNT", "MLFLOW_BACKEND_STORE_URI",
            "MLFLOW_ARTIFACTS_DESTINATION", "RAY_VERSION"} <= set(site)
    for name, text in scripts.items():
        assert text.splitlines()[1:] and "set -euo pipefail" in text, name
        assert "|| true" not in text, name
        used = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", text))
        # defined in site.env, set by the script itself, or standard shell/OS variables
        own = set(re.findall(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=", text, re.M))
        own |= set(re.findall(r"\b(?:for|read)\s+([A-Za-z_]+)", text))
        missing = used - set(site) - own - {"HOME", "MLFLOW_AUTH_CONFIG_PATH", "VERSION_CODENAME"}
        assert not missing, f"{name} uses undefined {missing}"
    commands = [c for key in ("initialization_commands", "setup_commands", "head_start_ray_commands",
                              "worker_start_ray_commands") for c in cluster[key]]
    assert not any("|| true" in c for c in commands)
    assert not any("pip install" in c for c in commands)  # the image's (CUDA) torch stays
    assert site["RAY_VERSION"] == _pinned("ray")
    assert "${" not in yaml.safe_dump(cluster)  # nothing Ray would pass on unexpanded


def test_images_share_one_base_and_only_the_gpu_image_pulls_cuda():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    stages = {name: base for base, name in re.findall(r"^FROM\s+(\S+)\s+AS\s+(\w+)", text, re.M | re.I)}
    assert stages["data"] == stages["train"] == "base"
    assert len(re.findall(r"^FROM\s", text, re.M)) == 3  # one external base image
    data = text.split("AS data", 1)[1].split("AS train", 1)[0]
    train = text.split("AS train", 1)[1]
    assert "download.pytorch.org/whl/cpu" in data and "requirements-gpu.txt" not in data
    assert "assert not torch.version.cuda" in data
    assert "requirements-gpu.txt" in train and "assert torch.version.cuda" in train
    assert "PIP_CONSTRAINT" in text  # no later install can swap torch
    for line in re.findall(r"^COPY\s+(.+)$", text, re.M):
        for src in line.split()[:-1]:
            assert (ROOT / src).exists(), src


def _kuberay_groups() -> dict[str, list[tuple[str, dict]]]:
    """image -> [(group, Ray resources)] over the RayCluster and the RayJob's cluster."""
    out: dict[str, list[tuple[str, dict]]] = {}
    for name in ("raycluster.yaml", "rayjob-full.yaml"):
        doc = yaml.safe_load((INFRA / "kuberay" / name).read_text())
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        for group in spec["workerGroupSpecs"]:
            image = group["template"]["spec"]["containers"][0]["image"]
            out.setdefault(image, []).append((f"{name}:{group['groupName']}", group.get("resources", {})))
    return out


def _aws_node_types() -> dict[str, list[tuple[str, dict]]]:
    cluster = _cluster()
    out: dict[str, list[tuple[str, dict]]] = {}
    for name, node_type in cluster["available_node_types"].items():
        if name == cluster["head_node_type"]:
            image = cluster["docker"]["head_image"]
        else:
            image = node_type.get("docker", {}).get("worker_image", cluster["docker"]["worker_image"])
        out.setdefault(image, []).append((name, node_type["resources"]))
    return out


@pytest.mark.parametrize("preset", CLUSTER_PRESETS)
def test_every_step_runs_on_nodes_of_its_image(preset):
    from pipelines.dag import _task_options, step_resources
    from pipelines.full import pipeline

    cfg = load_config(preset)
    aws, kuberay = _aws_node_types(), _kuberay_groups()
    for spec in pipeline(cfg):
        res = step_resources(cfg, spec.name)
        assert res is not None and res.image and res.resources, \
            f"{preset}: step {spec.name!r} declares no image/placement in run.resources"
        markers = set(res.resources)
        for where, table in (("ray_cluster.yaml node type", aws), ("KubeRay worker group", kuberay)):
            hosts = [n for n, r in table.get(res.image, []) if markers <= set(r)]
            assert hosts, f"{preset}: step {spec.name!r} needs {res.image} with {markers}: no {where}"
            # ...and no node of another image carries the marker, so Ray cannot misplace it
            others = [n for img, rows in table.items() if img != res.image for n, r in rows if markers & set(r)]
            assert not others, f"{preset}: {markers} also on {others}"
        assert _task_options(spec, res)["resources"] == res.resources  # what Ray is asked for


def test_ray_version_is_one_across_images_and_clusters():
    ray_pin = _pinned("ray")
    import ray

    assert ray.__version__ == ray_pin
    for name in ("raycluster.yaml", "rayjob-full.yaml"):
        doc = yaml.safe_load((INFRA / "kuberay" / name).read_text())
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert spec["rayVersion"] == ray_pin


def test_head_starts_token_auth_and_mlflow_server_the_presets_use():
    cluster = _cluster()
    opts = cluster["docker"]["run_options"]
    assert "-e RAY_AUTH_MODE=token" in opts
    assert "-e RAY_AUTH_TOKEN_PATH=/run/llama2-secrets/ray_auth_token" in opts
    start = " ".join(cluster["head_start_ray_commands"])
    assert "export LLAMA2_MLFLOW_HOST=" in start and "ray start --head" in start
    assert start.index("export LLAMA2_MLFLOW_HOST=") < start.index("ray start --head")  # drivers inherit it
    mlflow = (INFRA / "aws" / "start-mlflow.sh").read_text()
    args = shlex.split(mlflow.split("nohup", 1)[1].split(">", 1)[0].replace("\\\n", " "))
    assert args[:4] == ["mlflow", "server", "--app-name", "basic-auth"]
    assert "--artifacts-destination" in args and "--backend-store-uri" in args
    site = _site_env()
    assert site["MLFLOW_BACKEND_STORE_URI"].startswith(f"sqlite:///{site['SHARED_MOUNT']}/")
    assert site["MLFLOW_ARTIFACTS_DESTINATION"].startswith(site["SHARED_MOUNT"] + "/")
    for preset in CLUSTER_PRESETS:
        assert load_config(preset).run.tracking_uri == f"http://${{LLAMA2_MLFLOW_HOST}}:{site['MLFLOW_PORT']}"


def test_tracking_uri_resolves_the_head_and_refuses_local_stores_on_many_nodes(monkeypatch, tmp_path):
    from pipelines.tracking import TrackingStoreError, check_tracking_for_cluster, tracking_uri

    cfg = load_config("7b")
    monkeypatch.delenv("LLAMA2_MLFLOW_HOST", raising=False)
    with pytest.raises(TrackingStoreError, match="LLAMA2_MLFLOW_HOST"):
        tracking_uri(cfg, tmp_path)
    monkeypatch.setenv("LLAMA2_MLFLOW_HOST", "10.0.3.7")
    uri = tracking_uri(cfg, tmp_path)
    assert uri == "http://10.0.3.7:5000"
    check_tracking_for_cluster(uri, num_nodes=9)  # a server: fine on any number of nodes

    local = tracking_uri(load_config("tiny"), tmp_path)
    assert local == f"sqlite:///{tmp_path}/mlflow.db"
    check_tracking_for_cluster(local, num_nodes=1)  # one machine: fine
    for bad in (local, f"file://{tmp_path}/mlruns", str(tmp_path / "mlruns"), "sqlite:///mlflow.db"):
        with pytest.raises(TrackingStoreError, match="9 nodes"):
            check_tracking_for_cluster(bad, num_nodes=9)
    check_tracking_for_cluster("postgresql://mlflow@db:5432/mlflow", num_nodes=9)


def test_local_run_refuses_a_cluster_it_was_not_told_to_join(monkeypatch):
    import ray

    from pipelines.dag import ClusterError, ensure_ray

    if ray.is_initialized():
        pytest.skip("Ray already initialised in this test process")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    with pytest.raises(ClusterError, match="run.ray_address=127.0.0.1:6379"):
        ensure_ray(load_config("tiny"))
    assert not ray.is_initialized()


def test_job_outputs_inside_the_working_dir_copy_are_refused(tmp_path):
    from pipelines.dag import ClusterError, check_cluster_storage

    job_cwd = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    job_cwd.mkdir(parents=True)
    cfg = load_config("tiny", [f"run.output_dir={job_cwd / 'outputs'}"])
    with pytest.raises(ClusterError, match="deletes after the job"):
        check_cluster_storage(cfg, num_nodes=1, in_job=True, cwd=job_cwd)
    check_cluster_storage(cfg, num_nodes=1, in_job=False, cwd=job_cwd)  # a local run: its own cwd
    shared = load_config("tiny", [f"run.output_dir={tmp_path / 'shared'}"])
    check_cluster_storage(shared, num_nodes=1, in_job=True, cwd=job_cwd)


def test_submission_id_follows_the_job_inputs(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("submit", INFRA / "submit.py")
    submit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(submit)
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "configs").mkdir()
    (tmp_path / "pipelines" / "full.py").write_text("print('v1')\n")
    (tmp_path / "configs" / "7b.yaml").write_text("run: {name: a}\n")  # not a git checkout: the image's case
    args = ["--config", "7b", "--until", "pretrain"]
    first = submit.submission_id("pipelines/full.py", args, tmp_path)
    assert first == submit.submission_id("pipelines/full.py", list(args), tmp_path)  # a retry: same id
    assert first.startswith("full-7b-")
    assert submit.submission_id("pipelines/full.py", args + ["pretrain.train.max_steps=5"], tmp_path) != first
    assert submit.submission_id("pipelines/weekly.py", args, tmp_path) != first
    (tmp_path / "configs" / "7b.yaml").write_text("run: {name: b}\n")  # the preset changed
    assert submit.submission_id("pipelines/full.py", args, tmp_path) != first
