"""The temperature sweep of rejection sampling (steps/rejection_tune.py): its selection rule,
its validation prompts, and a real 2-trial Ray Tune sweep of sampling + scoring."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from model.config import ModelConfig
from steps.rejection import split_validation, subsample
from steps.rejection_tune import choose, gain_of

WORDS = "what is the capital of answer country river two plus three seven hello thanks sure sorry"


def make_models(root: Path, tok, seeds: dict[str, int]) -> dict[str, Path]:
    """Tiny chat models ("policy", "teacher", ...) and reward models ("rm_*") on disk in the
    pipeline's artifact layout (model.safetensors, model_config.json, hf/tokenizer.model), each
    with its own random weights (peaky, so samples vary and temperature matters)."""
    from model.llama import Transformer
    from model.reward import RewardModel

    cfg = ModelConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, multiple_of=16,
                      max_seq_len=128)
    out = {}
    for name, seed in seeds.items():
        torch.manual_seed(seed)
        if name.startswith("rm_"):
            m = RewardModel(cfg)
            torch.nn.init.normal_(m.score.weight, std=1.0)  # its zero init would score every answer alike
        else:
            m = Transformer(cfg)
            m.init_weights(std=0.2)
        d = root / name
        (d / "hf").mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(d / "model.safetensors"))
        (d / "model_config.json").write_text(cfg.model_dump_json())
        shutil.copyfile(tok.model_path, d / "hf" / "tokenizer.model")
        out[name] = d
    return out


def test_choose_takes_the_biggest_gain_then_the_better_best_then_the_cooler():
    rows = [{"temperature": 0.8, "gain": 0.10, "max": 0.7, "error": ""},
            {"temperature": 1.2, "gain": 0.25, "max": 0.6, "error": ""},
            {"temperature": 1.4, "gain": 0.40, "max": 0.9, "error": "OOM"},  # failed: never chosen
            {"temperature": 1.6, "gain": float("nan"), "max": 0.9, "error": ""}]
    assert choose(rows)["temperature"] == 1.2
    tie = [{"temperature": 1.3, "gain": 0.2, "max": 0.6, "error": ""},
           {"temperature": 1.1, "gain": 0.2, "max": 0.8, "error": ""},
           {"temperature": 0.9, "gain": 0.2, "max": 0.8, "error": ""}]
    assert choose(tie)["temperature"] == 0.9
    assert choose(rows, "max")["temperature"] == 0.8  # the best answer's reward instead of the gap
    with pytest.raises(RuntimeError, match="every trial failed"):
        choose(rows[2:])


def test_gain_is_max_minus_median_of_the_gated_reward():
    rh = np.array([[0.2, 0.9, 0.5], [0.3, 0.3, 0.3]])
    rs = np.array([[0.9, 0.9, 0.9], [0.05, 0.6, 0.4]])  # prompt 1 is a safety prompt: Rs decides
    g = gain_of({"helpfulness": rh, "safety": rs}, np.array([False, True]), 0.15)
    assert g["max"] == pytest.approx((0.9 + 0.6) / 2)
    assert g["median"] == pytest.approx((0.5 + 0.4) / 2)
    assert g["gain"] == pytest.approx(((0.9 - 0.5) + (0.6 - 0.4)) / 2)


def test_validation_prompts_are_a_fixed_disjoint_share():
    prompts = [(f"{i:04x}", [{"role": "user", "content": str(i)}], i % 5 == 0) for i in range(2000)]
    fit, val = split_validation(prompts, 0.1)
    assert {p[0] for p in fit}.isdisjoint(p[0] for p in val) and len(fit) + len(val) == 2000
    assert 150 < len(val) < 250
    assert split_validation(prompts[::-1], 0.1)[1] == val[::-1]  # by key, not by position
    assert subsample(fit, 10, seed=3) == subsample(fit, 10, seed=3) and len(subsample(fit, 10, seed=3)) == 10


@pytest.mark.slow
def test_a_two_trial_sweep_picks_the_best_measured_temperature(tmp_path, ray_local):
    from model.chat import Dialogue, Turn
    from model.generate import SamplingParams
    from pipelines.config import load_config
    from pipelines.runner import StepContext, StepSpec
    from steps import rejection
    from steps.rejection import sample_and_score
    from steps.rejection_tune import sweep
    from tests.conftest import train_tiny_tokenizer

    tok = train_tiny_tokenizer(tmp_path, WORDS)
    dirs = make_models(tmp_path, tok, {"policy": 1, "rm_helpfulness": 2, "rm_safety": 3})
    cfg = load_config(None)
    rcfg = cfg.rlhf.rejection.model_copy(update={"tune": cfg.rlhf.rejection.tune.model_copy(
        update={"temperatures": [0.5, 2.0]})})
    ctx = StepContext(cfg, StepSpec("rs_v1", rejection, "rlhf", ()), tmp_path / "out", tmp_path / "work", None, None)
    dialogues = [Dialogue([Turn("user", q)]) for q in ("hello", "what is two plus three", "the capital river")]
    is_safety = np.array([False, True, False])
    params = SamplingParams(max_new_tokens=8, temperature=1.0, num_samples=4, seed=7)
    rm_dirs = {"helpfulness": str(dirs["rm_helpfulness"]), "safety": str(dirs["rm_safety"])}
    chosen, metrics = sweep(ctx, rcfg, str(dirs["policy"]), rm_dirs, dialogues, is_safety, params, 0.15)

    # each trial's score is reproducible outside Tune (same streams, same models)
    direct = {}
    for t in (0.5, 2.0):
        _, probs = sample_and_score(str(dirs["policy"]), rm_dirs, dialogues, [[]] * 3,
                                    SamplingParams(max_new_tokens=8, temperature=t, num_samples=4, seed=7), 64)
        direct[t] = gain_of(probs, is_safety, 0.15)["gain"]
    assert direct[0.5] != direct[2.0]
    assert chosen == max(direct, key=direct.get)
    assert metrics["tune.trials"] == 2 and metrics["tune.failed_trials"] == 0
    assert metrics["tune.best_gain"] == pytest.approx(direct[chosen])
