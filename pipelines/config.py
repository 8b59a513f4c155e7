"""Typed, validated pipeline configuration: composes the sections that live beside their code.

One pydantic class per component (torchtitan style), defined beside the component:
ModelConfig in model/config.py, the engine's TrainConfig/OptimConfig in steps/engine/config.py,
DataConfig in steps/data/config.py, each stage's section at the top of its step module. This
file only composes them (plus the run section) and loads presets. A preset is a YAML file in configs/;
`tiny.yaml` is the embedded default. A preset may `extends:` another preset file, and any
key can be overridden on the command line as dotted `key=value` (the value is parsed as
YAML, so `pretrain.train.max_steps=10` is an int and `data.dedup.minhash=false` a bool).
An unknown key or a bad value raises ConfigError naming the key before anything runs.

The defaults of the big presets (7b/13b/34b/70b) are the numbers of ../shared/RECIPE.md;
the tiny preset keeps every mechanism and shrinks sizes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from model.config import ModelConfig, Section
from steps.annotate import AnnotateConfig
from steps.data.config import DataConfig
from steps.engine.config import OptimConfig, StepResources, TrainConfig
from steps.evaluate import EvalConfig
from steps.gatt import GAttConfig
from steps.ppo.config import PPOConfig
from steps.preferences import PreferenceConfig
from steps.pretrain import PretrainConfig
from steps.rejection import RejectionConfig
from steps.reward import RewardConfig
from steps.sft import SFTConfig
from steps.tokenizer import TokenizerConfig

# Re-exported: every section class, wherever it lives, can be named from here.
__all__ = ["Config", "ConfigError", "DataConfig", "GAttConfig", "ModelConfig", "OptimConfig", "PreferenceConfig",
           "PPOConfig", "PretrainConfig", "RejectionConfig", "RewardConfig", "SFTConfig", "StepResources", "TokenizerConfig", "TrainConfig",
           "load_config"]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PRESET = CONFIG_DIR / "tiny.yaml"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


# ----------------------------------------------------------------------------- run
class RunConfig(Section):
    name: str = "llama2"
    seed: int = 0
    output_dir: str = "outputs"  # storage root: a local path or a URI pyarrow.fs understands
    tracking_uri: str | None = None  # default: sqlite:///<output_dir>/mlflow.db
    experiment: str = "llama2-recipe"
    # weights of registered MLflow models: auto = as the step exported them (fp32 on the tiny
    # preset); bfloat16 halves registry bytes on the big presets (pipelines/registry.py)
    registry_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    ray_address: str | None = None  # None: join a reachable cluster, else start a local one
    resources: dict[str, StepResources] = Field(default_factory=dict)  # step name -> resources


# ----------------------------------------------------------------------------- RLHF (RECIPE 8)
class RLHFConfig(Section):
    iterations: int = Field(5, ge=1)  # V1..V5
    ppo_from: int = 4  # PPO on top of rejection sampling from V4
    # Rc = Rs for safety prompts and answers with Rs below this, else Rh: one gate for rejection
    # sampling and PPO (steps/gated_reward.py); RM probabilities, 0.15 as calibrated in the paper
    safety_threshold: float = Field(0.15, gt=0, lt=1)
    rejection: RejectionConfig = RejectionConfig()
    ppo: PPOConfig = PPOConfig()
    gatt: GAttConfig = GAttConfig()


# ----------------------------------------------------------------------------- the whole config
class Config(Section):
    preset: str = "tiny"
    run: RunConfig = RunConfig()
    data: DataConfig
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    sft: SFTConfig = SFTConfig()
    annotate: AnnotateConfig = AnnotateConfig()  # tiny preset: the simulated vendor (annotate_v{i})
    preference: PreferenceConfig = PreferenceConfig()
    reward: RewardConfig = RewardConfig()
    rlhf: RLHFConfig = RLHFConfig()
    eval: EvalConfig = EvalConfig()

    def subset(self, *keys: str) -> dict[str, Any]:
        """The config values under dotted `keys`, as plain JSON data (for fingerprints)."""
        full = self.model_dump(mode="json")
        out: dict[str, Any] = {}
        for key in keys:
            node: Any = full
            for part in key.split("."):
                node = node[part]
            out[key] = node
        return out


# ----------------------------------------------------------------------------- loading
def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = raw.pop("extends", None)
    if base is None:
        return raw
    return _deep_merge(_read_yaml((path.parent / base).resolve()), raw)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one dotted `a.b.c=value` override in place. The value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    key, _, text = override.partition("=")
    key = key.strip()
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {text!r}: {e}") from e
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {key}: {part!r} is not an index of the list")
            node = node[int(part)]
            continue
        node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {key}: {part!r} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {key}: {last!r} is not an index of the list")
        node[int(last)] = value
    else:
        node[last] = value


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {json.dumps(got, default=str)[:80]})"
            lines.append(f"  {key}: {e['msg']}{shown}")
    return f"invalid config ({source}):\n" + "\n".join(lines)


def load_cli_config(preset: str | None, output_dir: str | None, overrides: list[str]) -> Config:
    """What every entry point (full.py, weekly.py) does with --config, --output-dir and dotted
    overrides; raises ConfigError naming the key."""
    return load_config(preset, [*overrides, *([f"run.output_dir={output_dir}"] if output_dir else [])])


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a preset (default: configs/tiny.yaml), apply overrides, validate."""
    path = Path(path) if path else DEFAULT_PRESET
    if not path.exists() and not path.suffix and (CONFIG_DIR / f"{path}.yaml").exists():
        path = CONFIG_DIR / f"{path}.yaml"  # `--config 7b` means configs/7b.yaml
    raw = _read_yaml(path)
    raw.setdefault("preset", path.stem)
    for override in overrides or []:
        apply_override(raw, override)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, str(path))) from None
