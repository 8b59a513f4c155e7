"""Config loading: presets carry the paper's numbers; bad keys/values fail naming the key."""

import pytest

from pipelines.config import ConfigError, load_config


@pytest.mark.parametrize("preset", ["tiny", "7b", "13b", "34b", "70b"])
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert cfg.preset == preset
    kv = cfg.model.n_kv_heads or cfg.model.n_heads
    assert cfg.model.n_heads % kv == 0


def test_big_presets_carry_the_recipe():
    c7, c34, c70 = load_config("7b"), load_config("34b"), load_config("70b")
    # RECIPE 3-4: architecture and pretraining optimisation
    assert (c7.model.dim, c7.model.n_layers, c7.model.n_heads, c7.model.max_seq_len) == (4096, 32, 32, 4096)
    assert (c70.model.n_kv_heads, c70.model.ffn_hidden_dim, c34.model.ffn_hidden_dim) == (8, 28672, 22016)
    o = c7.pretrain.optim
    assert (o.lr, tuple(o.betas), o.eps, o.weight_decay, o.grad_clip) == (3e-4, (0.9, 0.95), 1e-5, 0.1, 1.0)
    assert (o.warmup_steps, o.min_lr_ratio, o.schedule) == (2000, 0.1, "cosine")
    assert c34.pretrain.optim.lr == c70.pretrain.optim.lr == 1.5e-4
    assert c7.pretrain.train.global_batch_size * c7.tokenizer.seq_len == 4 * 2**20  # 4M tokens
    # RECIPE 5: SFT
    assert (c7.sft.optim.lr, c7.sft.train.global_batch_size, c7.sft.train.epochs, c7.sft.seq_len) == (2e-5, 64, 2, 4096)
    # RECIPE 7: reward models
    assert (c7.reward.optim.lr, c70.reward.optim.lr, c7.reward.train.global_batch_size) == (1e-5, 5e-6, 512)
    assert (c7.reward.optim.warmup_fraction, c7.reward.optim.min_warmup_steps, c7.reward.train.epochs) == (0.03, 5, 1)
    # RECIPE 8: PPO
    p = c7.rlhf.ppo
    assert (p.optim.lr, p.train.global_batch_size, p.mini_batch_size, p.clip, p.kl_beta) == (1e-6, 512, 64, 0.2, 0.01)
    assert c70.rlhf.ppo.kl_beta == c34.rlhf.ppo.kl_beta == 0.005
    assert c7.rlhf.safety_threshold == 0.15 and c7.rlhf.ppo_from == 4
    # RECIPE 1: LLaMA-1 mixture shares sum to 1
    assert abs(sum(s.weight for s in c7.data.sources) - 1.0) < 1e-9


def test_dotted_overrides_parse_yaml_values():
    cfg = load_config(None, ["pretrain.train.max_steps=7", "data.dedup.minhash=false",
                             "data.sources.0.epochs=2.5", "run.seed=3"])
    assert cfg.pretrain.train.max_steps == 7 and cfg.data.dedup.minhash is False
    assert cfg.data.sources[0].epochs == 2.5 and cfg.run.seed == 3


@pytest.mark.parametrize("override, key", [
    ("pretrain.train.max_stepz=3", "pretrain.train.max_stepz"),
    ("model.dim=abc", "model.dim"),
    ("data.sources.0.weight=-1", "data.sources.0.weight"),
    ("tokenizer.vocab_size=10", "tokenizer.vocab_size"),
    ("nonsense=1", "nonsense"),
])
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_semantic_validation_names_the_section(tmp_path):
    with pytest.raises(ConfigError, match="n_kv_heads"):
        load_config(None, ["model.n_kv_heads=3"])
    with pytest.raises(ConfigError, match="exactly one of weight or epochs"):
        load_config(None, ["data.sources.0.weight=0.5"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: tiny.yaml\nmodel: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_extends_merges_sections(tmp_path):
    from pipelines.config import CONFIG_DIR
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {CONFIG_DIR / 'tiny.yaml'}\nmodel: {{n_layers: 2}}\n")
    cfg = load_config(child)
    assert cfg.model.n_layers == 2 and cfg.model.dim == load_config("tiny").model.dim
    assert cfg.preset == "tiny"  # a child inherits the preset name unless it sets its own
