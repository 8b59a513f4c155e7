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
    plural = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayCronJob": "raycronjobs"}[kind]
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
    spec = {"RayCluster": lambda s: s, "RayJob": lambda s: s.get("rayClusterSpec"),
            "RayCronJob": lambda s: s["jobTemplate"].get("rayClusterSpec")}[doc["kind"]](doc["spec"])
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]] if spec else []:  # none: clusterSelector
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
    cron = _docs(KUBERAY / "cronjob-weekly.yaml")[0]
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


# ---------------------------------------------------------------- the weekly schedules
def test_raycronjob_crd_is_vendored_from_the_same_tag():
    head = (KUBERAY / "crds" / "ray.io_raycronjobs.yaml").read_text()[:600]
    assert "tag v1.7.0" in head and "Apache License, Version 2.0" in head
    assert _crd_schema("RayCronJob")["properties"]["spec"]["required"] == ["jobTemplate", "schedule"]


def _weekly_schedules() -> dict[str, Any]:
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in _all_docs()}
    return {"rc": docs[("RayCluster", "llama2")], "raycron": docs[("RayCronJob", "llama2-weekly-rlhf")],
            "cron": docs[("CronJob", "llama2-weekly-rlhf")]}


def _cron_fields_valid(schedule: str) -> bool:
    ranges = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
    fields = schedule.split()
    return len(fields) == 5 and all(f == "*" or (f.isdigit() and lo <= int(f) <= hi)
                                    for f, (lo, hi) in zip(fields, ranges))


def test_raycronjob_runs_one_shot_checks_on_the_long_lived_cluster():
    s = _weekly_schedules()
    job = s["raycron"]["spec"]["jobTemplate"]
    # clusterSelector mode: the check runs on raycluster.yaml's cluster; nothing is created or deleted
    assert job["clusterSelector"] == {"ray.io/cluster": s["rc"]["metadata"]["name"]}
    assert "rayClusterSpec" not in job and not job.get("backoffLimit") and "shutdownAfterJobFinishes" not in job
    assert {r["policy"] for r in job["deletionStrategy"]["deletionRules"]} == {"DeleteSelf"}
    entry = job["entrypoint"].split()
    assert entry[1].endswith("pipelines/weekly.py") and "--once" in entry
    assert _cron_fields_valid(s["raycron"]["spec"]["schedule"])
    broken = copy.deepcopy(s["raycron"])
    broken["spec"]["jobTemplate"]["clusterSelectors"] = broken["spec"]["jobTemplate"].pop("clusterSelector")
    with pytest.raises(jsonschema.ValidationError, match="clusterSelectors"):
        validate_kuberay(broken)


def test_cronjob_and_crontab_submit_one_check_per_batch_with_its_own_id():
    import importlib.util
    import shlex

    s = _weekly_schedules()
    pod = s["cron"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    script = pod["containers"][0]["args"][0]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert _cron_fields_valid(s["cron"]["spec"]["schedule"]) and s["cron"]["spec"]["concurrencyPolicy"] == "Forbid"
    lines = [x for x in (ROOT / "infra" / "crontab").read_text().splitlines() if x.strip() and not x.startswith("#")]
    assert len(lines) == 1 and _cron_fields_valid(" ".join(lines[0].split()[:5]))
    raycron_args = s["raycron"]["spec"]["jobTemplate"]["entrypoint"].split()
    landing = raycron_args[raycron_args.index("--watch") + 1]
    assert env["LANDING"] == landing and landing in lines[0]  # one landing location for all three
    for text in (script.replace('"$LANDING"', landing), lines[0]):
        # first the pending batch's key, then a one-shot check of that batch only, submitted with an
        # id derived from its arguments
        assert "--pending" in text and "infra/submit.py" in text and "--no-wait" in text
        submitted = shlex.split(text.split("infra/submit.py", 1)[1].split(";")[0].replace("\\\n", " "))
        args = submitted[submitted.index("--") + 1:]
        assert args[args.index("--watch") + 1] == landing and "--once" in args
        assert args[args.index("--only") + 1] in ("$k", "$key")  # the key --pending printed
    spec = importlib.util.spec_from_file_location("submit", ROOT / "infra" / "submit.py")
    submit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(submit)
    ids = {k: submit.submission_id("pipelines/weekly.py", ["--config", "7b", "--watch", landing, "--once", "--only", k])
           for k in ("2026-W49@0123456789abcdef", "2026-W50@fedcba9876543210")}
    assert len(set(ids.values())) == 2 and all(i.startswith("weekly-7b-") for i in ids.values())
