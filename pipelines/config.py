"""Typed, validated pipeline configuration.

One pydantic class per component (torchtitan style). A preset is a YAML file in configs/;
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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PRESET = CONFIG_DIR / "tiny.yaml"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------- run, resources
class StepResources(Section):
    """What the DAG node of one step asks Ray for. Training steps keep their node light
    and ask for workers in their own `train` section instead."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory_gb: float | None = Field(None, gt=0)
    image: str | None = None  # container image for this step on a cluster (runtime_env image_uri)


class RunConfig(Section):
    name: str = "llama2"
    seed: int = 0
    output_dir: str = "outputs"  # storage root: a local path or a URI pyarrow.fs understands
    tracking_uri: str | None = None  # default: sqlite:///<output_dir>/mlflow.db
    experiment: str = "llama2-recipe"
    ray_address: str | None = None  # None: join a reachable cluster, else start a local one
    resources: dict[str, StepResources] = Field(default_factory=dict)  # step name -> resources


# ----------------------------------------------------------------------------- data (RECIPE 1)
SourceKind = Literal["text", "gutenberg", "jsonl", "parquet", "mediawiki", "code", "stackexchange"]


class SourceConfig(Section):
    """One raw corpus. Exactly one of `weight` (share of output tokens) or `epochs`
    (passes over the cleaned source) sets how much of it the mixture takes."""

    name: str
    kind: SourceKind
    paths: list[str]  # files, directories or glob patterns; relative to the working dir
    weight: float | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0)
    text_field: str = "text"  # jsonl / parquet
    line_documents: bool = False  # text: one document per line instead of per file
    licenses: list[str] = Field(default_factory=lambda: ["MIT", "Apache-2.0", "BSD-2-Clause", "BSD-3-Clause", "PSF-2.0"])
    quality_filter: bool = True  # code keeps its own heuristics
    max_docs: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_amount(self) -> SourceConfig:
        if (self.weight is None) == (self.epochs is None):
            raise ValueError(f"source {self.name!r}: set exactly one of weight or epochs")
        return self


class QualityConfig(Section):
    """Gopher / C4 style document heuristics (thresholds as in the Gopher paper, Rae et al. 2021)."""

    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_len: float = 3.0
    max_mean_word_len: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2
    max_dup_line_ratio: float = 0.3
    c4_min_sentences: int = 3
    c4_min_words_per_line: int = 3
    c4_require_terminal_punct: bool = True
    languages: list[str] = Field(default_factory=lambda: ["en"])
    min_language_score: float = 0.65


class DedupConfig(Section):
    exact: bool = True
    minhash: bool = True
    ngram: int = Field(5, ge=1)  # word shingles
    num_perm: int = Field(112, ge=8)
    bands: int = Field(14, ge=1)
    threshold: float = Field(0.8, gt=0, le=1)  # Jaccard similarity counted as a near duplicate
    line_dedup: bool = True  # CCNet-style: drop lines repeated across many web documents
    line_min_count: int = 3

    @model_validator(mode="after")
    def _bands_divide(self) -> DedupConfig:
        if self.num_perm % self.bands:
            raise ValueError(f"num_perm ({self.num_perm}) must be a multiple of bands ({self.bands})")
        return self


class DataConfig(Section):
    sources: list[SourceConfig]
    quality: QualityConfig = QualityConfig()
    dedup: DedupConfig = DedupConfig()
    pii: bool = True
    on_error: Literal["skip", "fail"] = "skip"  # corrupt input: report and skip, or stop
    num_shards: int = Field(4, ge=1)
    total_tokens: int | None = Field(None, gt=0)  # mixture size when sources use weights


# ----------------------------------------------------------------------------- tokenizer (RECIPE 2)
class TokenizerConfig(Section):
    vocab_size: int = Field(32_000, ge=64)
    model_type: Literal["bpe"] = "bpe"
    split_digits: bool = True
    byte_fallback: bool = True
    character_coverage: float = Field(0.99995, gt=0, le=1)
    input_sentence_size: int = 10_000_000  # sentences SentencePiece samples for training
    max_sentence_length: int = 16_384
    seq_len: int = Field(4096, ge=8)  # packed pretraining sequence length
    val_fraction: float = Field(0.01, ge=0, lt=0.5)


# ----------------------------------------------------------------------------- model (RECIPE 3)
class ModelConfig(Section):
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: multi-head attention (= n_heads)
    vocab_size: int = 32_000
    multiple_of: int = 256  # SwiGLU hidden = 2/3 * 4d rounded up to this
    ffn_dim_multiplier: float | None = None
    ffn_hidden_dim: int | None = None  # explicit override (the published 70B uses 28672)
    norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    max_seq_len: int = 4096

    @model_validator(mode="after")
    def _heads(self) -> ModelConfig:
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({kv})")
        return self


# ----------------------------------------------------------------------------- training engine
class OptimConfig(Section):
    """AdamW + schedule; defaults are the paper's pretraining ones (RECIPE 4)."""

    lr: float = Field(3.0e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(2000, ge=0)
    warmup_fraction: float | None = Field(None, ge=0, lt=1)  # overrides warmup_steps (RM: 3%)
    min_warmup_steps: int = 0
    min_lr_ratio: float = Field(0.1, ge=0, le=1)


class TrainConfig(Section):
    """How the shared engine runs one training: workers, batch, precision, checkpoints."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    global_batch_size: int = Field(1024, ge=1)  # sequences (or pairs / rollouts) per optimizer step
    micro_batch_size: int = Field(1, ge=1)  # per worker per forward
    max_steps: int | None = Field(None, ge=1)  # None: derive from epochs
    epochs: float = Field(1.0, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 3
    precision: Literal["bf16", "fp32"] = "bf16"
    activation_checkpointing: bool = False
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(1, ge=1)
    eval_every: int = Field(100, ge=1)
    max_failures: int = Field(1, ge=0)
    offload_optimizer: bool = False


class PretrainConfig(Section):
    train: TrainConfig = TrainConfig(global_batch_size=1024, num_workers=256, use_gpu=True,
                                     gpus_per_worker=1, cpus_per_worker=8,
                                     activation_checkpointing=True, max_steps=500_000)
    optim: OptimConfig = OptimConfig()


# ----------------------------------------------------------------------------- SFT (RECIPE 5)
class SFTConfig(Section):
    train: TrainConfig = TrainConfig(global_batch_size=64, epochs=2.0, num_workers=64, use_gpu=True,
                                     gpus_per_worker=1, cpus_per_worker=8)
    optim: OptimConfig = OptimConfig(lr=2e-5, warmup_steps=0)
    seq_len: int = 4096
    sources: list[str] = Field(default_factory=list)  # dialogue files (alpaca/sharegpt/messages)
    max_source_examples: int | None = Field(None, ge=1)  # cap per file (the tiny preset keeps the world dominant)
    demo_world: bool = True  # add the seeded demo chat world (tiny preset)


class GAttConfig(Section):
    """Ghost Attention (RECIPE 8): synthetic multi-turn data under a system instruction."""

    enabled: bool = True
    after_iteration: int = Field(3, ge=0)  # applied to the RLHF V3 model (0: the SFT model)
    num_dialogues: int = Field(1000, ge=1)
    min_turns: int = Field(2, ge=2)
    turns: int = Field(3, ge=2)  # conversations have min_turns..turns user messages
    # The paper's synthetic constraints: hobbies, a language, a public figure to act as.
    instructions: list[str] = Field(default_factory=lambda: [
        "Always answer in French.", "Act as Napoleon.", "Act as Oscar Wilde.", "You enjoy tennis.",
        "You love gardening.", "Always answer in Spanish.", "Answer with a haiku.",
        "Act as a pirate."], min_length=1)
    sources: list[str] = Field(default_factory=list)  # dialogue files whose first user turns are the messages
    max_user_tokens: int = Field(256, ge=1)  # user messages longer than this are not used
    demo_world: bool = False  # tiny preset: messages and the outcome measure from the demo world
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(1024, ge=1)
    sample_batch_size: int = Field(64, ge=1)
    sampler: StepResources = StepResources(num_cpus=8, num_gpus=1)  # the Ray task that samples answers
    replay_ratio: float = Field(1.0, ge=0)  # + this many input-model training dialogues per GAtt dialogue
    seq_len: int = 4096
    train: TrainConfig = TrainConfig(global_batch_size=64, epochs=1.0, num_workers=64, use_gpu=True,
                                     gpus_per_worker=1, cpus_per_worker=8)
    optim: OptimConfig = OptimConfig(lr=1e-5, warmup_steps=0)

    @model_validator(mode="after")
    def _turns_ordered(self) -> GAttConfig:
        if self.min_turns > self.turns:
            raise ValueError(f"min_turns ({self.min_turns}) exceeds turns ({self.turns})")
        return self


# ----------------------------------------------------------------------------- preferences (RECIPE 6)
class PreferenceConfig(Section):
    batches: list[str] = Field(default_factory=list)  # preference batch dirs or URIs to ingest
    store: str = "preferences"  # relative to output_dir
    on_error: Literal["quarantine", "fail"] = "quarantine"


# ----------------------------------------------------------------------------- reward models (RECIPE 7)
class RewardConfig(Section):
    train: TrainConfig = TrainConfig(global_batch_size=512, epochs=1.0, num_workers=64, use_gpu=True,
                                     gpus_per_worker=1, cpus_per_worker=8)
    optim: OptimConfig = OptimConfig(lr=1e-5, warmup_fraction=0.03, min_warmup_steps=5)
    margin: Literal["none", "small", "large"] = "small"
    helpful_mix_other_ratio: float = 1.0  # helpfulness RM: + equal amount of safety/open data
    safety_mix_ratio: float = 0.9  # safety RM: 90% safety data, 10% helpfulness
    seq_len: int = 4096
    eval_fraction: float = 0.05


# ----------------------------------------------------------------------------- RLHF (RECIPE 8)
class RejectionSamplingConfig(Section):
    num_samples: int = Field(10, ge=1)  # K answers per prompt
    temperatures: list[float] = Field(default_factory=lambda: [1.2, 1.2, 1.3, 1.3, 1.3])  # per iteration
    top_p: float = 1.0
    max_new_tokens: int = 1024
    num_prompts: int = 20_000
    pool_from_iteration: int = 3  # from V3 on, pool the best samples of all prior iterations


class PPOConfig(Section):
    train: TrainConfig = TrainConfig(global_batch_size=512, micro_batch_size=8, num_workers=64,
                                     use_gpu=True, gpus_per_worker=1, cpus_per_worker=8)
    optim: OptimConfig = OptimConfig(lr=1e-6, schedule="constant", warmup_steps=0)
    mini_batch_size: int = 64
    clip: float = 0.2
    kl_beta: float = 0.01  # 0.005 for 34B/70B
    safety_threshold: float = 0.15
    iterations: int = 200
    max_new_tokens: int = 1024
    temperature: float = 1.0
    early_stop_patience: int = 20


class RLHFConfig(Section):
    iterations: int = Field(5, ge=1)  # V1..V5
    ppo_from: int = 4  # PPO on top of rejection sampling from V4
    rejection: RejectionSamplingConfig = RejectionSamplingConfig()
    ppo: PPOConfig = PPOConfig()
    gatt: GAttConfig = GAttConfig()


class EvalConfig(Section):
    num_prompts: int = 2000
    max_new_tokens: int = 1024
    temperature: float = 0.7
    reference: Literal["sft", "previous"] = "sft"


# ----------------------------------------------------------------------------- the whole config
class Config(Section):
    preset: str = "tiny"
    run: RunConfig = RunConfig()
    data: DataConfig
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    sft: SFTConfig = SFTConfig()
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
