"""Registered models as MLflow Models: what `mlflow.transformers.load_model("models:/name@alias")`,
`mlflow.pyfunc.load_model(...)` and `mlflow models serve -m models:/name@alias` load.

A step exports its model in the Hugging Face layout (`hf/`: config, safetensors, tokenizer).
Registering it writes the transformers flavour around that checkpoint into the step's MLflow
run at artifact path `hf` (MLmodel, `model/` = the checkpoint, `components/tokenizer`, the pip
requirements, a model card): chat models as task `llm/v1/chat` (a text-generation pipeline
whose pyfunc takes OpenAI-style messages and applies the chat template), reward models
(`LlamaForSequenceClassification`, one regression label) as `text-classification`, whose
score is the raw reward.

Disk: the weights are not copied. With a local artifact store (the tiny preset's sqlite store,
artifacts under the storage root) they are hard links to the step's own export, which is
content-addressed and never rewritten; only a store across a network (a tracking server)
receives an upload. `dtype` (run.registry_dtype) may ask for bf16 weights: an fp32 export is
then converted tensor by tensor (model/hf.py convert_weights), never held whole in memory.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch

from model.weights import INDEX

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SERVING_PACKAGES = ("torch", "transformers", "safetensors", "sentencepiece")


def is_weights(f: Path) -> bool:
    """model.safetensors, model-0000k-of-0000n.safetensors and their index."""
    return f.name.startswith("model") and (f.suffix == ".safetensors" or f.name == INDEX)


def model_task(hf_dir: Path) -> str:
    """The MLflow task of an HF export: from its architecture (and a chat template)."""
    arch = json.loads((hf_dir / "config.json").read_text())["architectures"][0]
    if arch.endswith("ForSequenceClassification"):
        return "text-classification"
    if arch.endswith("ForCausalLM"):
        tok = hf_dir / "tokenizer_config.json"
        chat = tok.exists() and "chat_template" in json.loads(tok.read_text())
        return "llm/v1/chat" if chat else "text-generation"
    raise ValueError(f"{hf_dir}/config.json: architecture {arch} is neither a causal LM nor a sequence classifier")


def stored_dtype(hf_dir: Path, requested: str) -> str:
    """"auto" keeps the export's dtype (fp32 on the tiny preset, bf16 for big chat models)."""
    if requested == "auto":
        return json.loads((hf_dir / "config.json").read_text()).get("torch_dtype", "float32")
    if requested not in DTYPES:
        raise ValueError(f"registry dtype {requested!r} is not one of auto, {', '.join(DTYPES)}")
    return requested


def local_artifact_dir(artifact_uri: str) -> Path | None:
    """The directory behind a run's artifact URI when it is on this machine's file system."""
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(artifact_uri)
    return None  # mlflow-artifacts:, s3:, ...: the store is across a network


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (no bytes written: both names are immutable artifacts), a copy across devices."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save_mlflow_model(hf_dir: Path, path: Path, *, name: str, dtype: str = "auto", card: str = "") -> dict[str, str]:
    """Write an MLflow Model (transformers flavour) at `path` for the HF export `hf_dir`;
    returns {"task", "dtype"} for the model version's tags."""
    import huggingface_hub
    import mlflow.transformers
    from mlflow.models import Model

    hf_dir, path = Path(hf_dir), Path(path)
    task, target = model_task(hf_dir), stored_dtype(hf_dir, dtype)
    source = json.loads((hf_dir / "config.json").read_text()).get("torch_dtype", "float32")
    with tempfile.TemporaryDirectory(prefix="mlflow-light-") as light:
        # MLflow copies the checkpoint it is given: hand it everything but the weights, which
        # are linked (or converted) into place afterwards
        for f in hf_dir.iterdir():
            if f.is_file() and not is_weights(f):
                shutil.copyfile(f, Path(light) / f.name)
        config = json.loads((Path(light) / "config.json").read_text())
        config["torch_dtype"] = target
        (Path(light) / "config.json").write_text(json.dumps(config, indent=2))
        model_card = huggingface_hub.ModelCard(
            f"---\nlicense: other\nlibrary_name: transformers\ntags: [llama-2]\n---\n# {name}\n\n{card}\n")
        if path.exists():
            shutil.rmtree(path)
        with _pipeline_classes_resolved(), _quiet_license_warning():
            mlflow.transformers.save_model(
                light, path=str(path), task=task, model_card=model_card,
                torch_dtype=DTYPES[target] if target != "float32" else None,
                pip_requirements=serving_requirements())
    weights_dir = path / "model"  # the flavour's model_binary
    if target == source:
        for f in hf_dir.iterdir():
            if f.is_file() and is_weights(f):
                link_or_copy(f, weights_dir / f.name)
    else:
        from model.hf import convert_weights

        convert_weights(hf_dir, weights_dir, DTYPES[target])
    mlmodel = Model.load(str(path / "MLmodel"))
    # the flavour records the checkpoint's path (a temporary dir): name the model instead
    mlmodel.flavors["transformers"]["source_model_name"] = name
    mlmodel.model_size_bytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    mlmodel.save(str(path / "MLmodel"))
    (path / "LICENSE.txt").write_text(
        f"{name} was trained by this project's LLaMA-2 pipeline; its terms are the project's.\n")
    return {"task": task, "dtype": target}


def log_mlflow_model(client, run_id: str, hf_dir: Path, artifact_path: str, *, name: str,
                     dtype: str = "auto", card: str = "") -> tuple[str, dict[str, str]]:
    """Write the MLflow Model of `hf_dir` into run `run_id` at `artifact_path`; returns its URI
    (a model version's source) and {"task", "dtype"}."""
    artifact_uri = client.get_run(run_id).info.artifact_uri
    local = local_artifact_dir(artifact_uri)
    if local is not None:  # written in place: weights hard-linked from the export
        local.mkdir(parents=True, exist_ok=True)
        info = save_mlflow_model(hf_dir, local / artifact_path, name=name, dtype=dtype, card=card)
    else:
        with tempfile.TemporaryDirectory(prefix="mlflow-model-", dir=Path(hf_dir).parent) as tmp:
            info = save_mlflow_model(hf_dir, Path(tmp) / artifact_path, name=name, dtype=dtype, card=card)
            client.log_artifacts(run_id, str(Path(tmp) / artifact_path), artifact_path)
    return f"{artifact_uri}/{artifact_path}", info


def serving_requirements() -> list[str]:
    """Pinned to what trained the model; a CUDA build of torch serves a CPU-built model too,
    so torch's local version label (+cpu, +cu128) is dropped."""
    reqs = []
    for pkg in SERVING_PACKAGES:
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


@contextmanager
def _pipeline_classes_resolved() -> Iterator[None]:
    """transformers 5 lists each pipeline's class as an import path (loaded lazily) where
    mlflow 3.17's save of a local checkpoint reads the class's `__name__`: resolve the class for
    the duration of the save. A no-op on versions that list classes."""
    import transformers.pipelines as pipelines

    original = pipelines.check_task

    def check_task(task: str):
        name, meta, options = original(task)
        if isinstance(meta.get("impl"), str):
            module, _, cls = meta["impl"].rpartition(".")
            meta = {**meta, "impl": getattr(importlib.import_module(module), cls)}
        return name, meta, options

    pipelines.check_task = check_task
    try:
        yield
    finally:
        pipelines.check_task = original


class _DropLicenseWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "license information" not in record.getMessage()


@contextmanager
def _quiet_license_warning() -> Iterator[None]:
    """MLflow looks for a Hugging Face Hub licence of the checkpoint and warns that a model of
    ours has none; LICENSE.txt says what applies instead."""
    logger, flt = logging.getLogger("mlflow.transformers"), _DropLicenseWarning()
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)
