"""Every Kubernetes manifest in infra/kuberay/, validated offline: core kinds against the
Kubernetes API schemas kubernetes-validate ships (pinned in requirements.txt), KubeRay's
RayCluster and RayJob against the OpenAPI schemas of the vendored KubeRay CRDs
(infra/kuberay/crds/), strictly (an unknown field is an error, as a typo would be), their pod
templates against Kubernetes' PodTemplate schema; and the names the manifests use for each
other (Services, Secrets, the volume claim) agree."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBERAY = ROOT / "infra" / "kuberay"
K8S_VERSION = "1.33.0"  # the oldest Kubernetes the manifests must suit (EKS/GKE/AKS standard support)
MANIFESTS = sorted(p for p in KUBERAY.glob("*.yaml"))


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, d) for p in MANIFESTS for d in _docs(p)]


@functools.cache
def _crd_schema(kind: str) -> dict[str, Any]:
    plural = {"RayCluster": "rayclusters", "RayJob": "rayjobs"}[kind]
    text = (KUBERAY / "crds" / f"ray.io_{plural}.yaml").read_text()
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: seconds faster on 1-2 MB
    crd = next(d for d in yaml.load_all(text, Loader=loader) if d and d["kind"] == "CustomResourceDefinition")
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def unknown_fields(doc: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the structural schema does not define: the API server would prune them (or reject
    them under strict field validation), so a misspelt key would silently do nothing."""
    out: list[str] = []
    if isinstance(doc, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        for key, value in doc.items():
            if key not in schema["properties"]:
                out.append(f"{path}.{key}")
            else:
                out += unknown_fields(value, schema["properties"][key], f"{path}.{key}")
    elif isinstance(doc, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, value in doc.items():
            out += unknown_fields(value, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(doc, list) and "items" in schema:
        for i, value in enumerate(doc):
            out += unknown_fields(value, schema["items"], f"{path}[{i}]")
    return out


def validate_kuberay(doc: dict[str, Any]) -> None:
    schema = _crd_schema(doc["kind"])
    jsonschema.Draft7Validator(schema).validate(doc)
    extra = [f for f in unknown_fields(doc, schema) if not f.startswith(".metadata.")]
    if extra:
        raise jsonschema.ValidationError(f"fields the {doc['kind']} CRD does not define: {extra}")
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"},
                        "template": group["template"]}
        kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)


def test_crds_are_vendored_with_version_and_licence():
    for name in ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml"):
        head = (KUBERAY / "crds" / name).read_text()[:600]
        assert "tag v1.7.0" in head and "Apache License, Version 2.0" in head
    assert "Apache License" in (KUBERAY / "crds" / "LICENSE").read_text()[:200]


@pytest.mark.parametrize("name,doc", _all_docs(), ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_manifest_validates(name, doc):
    if doc["apiVersion"].startswith("ray.io/"):
        validate_kuberay(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_validators_reject_broken_manifests():
    rc = _docs(KUBERAY / "raycluster.yaml")[0]
    typo = copy.deepcopy(rc)
    typo["spec"]["workerGroupSpecs"][0]["minReplica"] = 1  # misspelt minReplicas
    with pytest.raises(jsonschema.ValidationError, match="minReplica"):
        validate_kuberay(typo)
    bad_auth = copy.deepcopy(rc)
    bad_auth["spec"]["authOptions"]["mode"] = "password"
    with pytest.raises(jsonschema.ValidationError):
        validate_kuberay(bad_auth)
    bad_pod = copy.deepcopy(rc)
    bad_pod["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate_kuberay(bad_pod)
    cron = _docs(KUBERAY / "weekly-cronjob.yaml")[0]
    cron["spec"]["schedul"] = cron["spec"].pop("schedule")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cron, K8S_VERSION, strict=True)


def test_rayjob_cluster_is_the_long_lived_cluster_without_its_service_name():
    rc = _docs(KUBERAY / "raycluster.yaml")[0]
    job = _docs(KUBERAY / "rayjob-full.yaml")[0]
    expected = copy.deepcopy(rc["spec"])
    # a RayJob's cluster gets `<RayJob name>-head-svc`; naming it would collide with the long-lived one
    del expected["headGroupSpec"]["headService"]
    assert job["spec"]["rayClusterSpec"] == expected
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] > 0
    # the submission id is derived from the inputs: pipeline, preset, image tag
    entry = job["spec"]["entrypoint"].split()
    preset = entry[entry.index("--config") + 1]
    tag = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"].rsplit(":", 1)[1]
    assert job["spec"]["jobId"] == f"llama2-full-{preset}-img-{tag.replace('.', '-')}"
    assert job["metadata"]["name"] == f"llama2-full-{preset}"


def test_names_the_manifests_share_agree():
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in _all_docs()}
    rc = docs[("RayCluster", "llama2")]
    head_svc = rc["spec"]["headGroupSpec"]["headService"]["metadata"]["name"]
    cron = docs[("CronJob", "llama2-weekly-rlhf")]
    submit = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in submit["env"]}
    assert env["RAY_ADDRESS"]["value"] == f"http://{head_svc}:8265"
    # the Ray token: the Secret KubeRay mounts (key auth_token) is the one clients read
    secret = rc["spec"]["authOptions"]["secretName"]
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "auth_token"}
    assert rc["spec"]["authOptions"]["mode"] == "token"
    # MLflow: the host the Ray pods resolve the presets' tracking URI with is the Service
    mlflow_svc = docs[("Service", "llama2-mlflow")]
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    host = next(e["value"] for e in head["env"] if e["name"] == "LLAMA2_MLFLOW_HOST")
    assert host == mlflow_svc["metadata"]["name"] and mlflow_svc["spec"]["ports"][0]["port"] == 5000
    # every pod's shared volume is the one claim
    pvc = next(d for _, d in _all_docs() if d["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    claims = set()
    for _, d in _all_docs():
        text = yaml.safe_dump(d)
        claims |= {line.split("claimName:")[1].strip() for line in text.splitlines() if "claimName:" in line}
    assert claims == {pvc["metadata"]["name"]}
