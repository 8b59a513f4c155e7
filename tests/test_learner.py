"""The persistent learner (steps/engine/learner.py): one engine kept alive across steps."""

from functools import partial

import numpy as np
import pytest
import torch

from model.config import ModelConfig
from steps.engine import Objective, collate_lm, lm_objective_loss
from steps.engine.config import OptimConfig, TrainConfig
from steps.engine.learner import split_rows

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=32)


def build(cfg):
    from model.llama import Transformer

    return Transformer(cfg)


def next_token_logp(module, batch):
    """The log-probability of each target under the model (an `infer` function)."""
    logits = module(batch["inputs"])
    return logits.float().log_softmax(-1).gather(-1, batch["targets"][..., None]).squeeze(-1)


def rows(n=16, seq=17, seed=0):
    """Each token the previous plus one (mod 64): learnable in a few steps."""
    starts = np.random.default_rng(seed).integers(0, 64, n)
    return {"tokens": np.stack([(s + np.arange(seq)) % 64 for s in starts]).astype(np.int64)}


def test_split_rows_keeps_order_and_refuses_uneven_splits():
    parts = split_rows({"a": np.arange(6)}, 3)
    assert [p["a"].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="equal"):
        split_rows({"a": np.arange(5)}, 2)


@pytest.mark.slow
def test_learner_group_trains_across_calls_and_exports_what_it_sends(tmp_path, ray_local):
    """Two ranks under ZeRO-3 (each holds half of every parameter): steps, inference, the
    gathered weights and the export all go through the collectives. PPO's tiny preset runs the
    same class with one rank (tests/test_ppo_step.py)."""
    world = 2
    from model.weights import load_state_dict
    from steps.engine.learner import LearnerGroup

    obj = Objective(name="learner-test", build_module=partial(build, CFG), loss=lm_objective_loss, train_files=[],
                    columns=["tokens"], collate=collate_lm)
    tcfg = TrainConfig(num_workers=world, cpus_per_worker=0.5, micro_batch_size=4, zero_stage=3, precision="fp32")
    group = LearnerGroup(obj, tcfg, OptimConfig(lr=3e-3, schedule="constant", warmup_steps=0),
                         mini_batch_rows=8, total_steps=10, seed=0, name=f"test{world}")
    try:
        group.ready()
        data = rows()
        before = group.infer(next_token_logp, data)
        assert before.shape == (16, 16)
        losses = [group.step({k: v[i % 2 * 8:(i % 2 + 1) * 8] for k, v in data.items()})["loss"] for i in range(8)]
        # the engine stays alive: its optimizer state carries over from call to call
        assert losses[-1] < losses[0] - 0.3, losses
        after = group.infer(next_token_logp, data)
        assert after.mean() > before.mean() + 0.3  # inference sees the updated weights
        sent = ray_local.get(group.weights())
        exported = load_state_dict(group.export(tmp_path / "export"))
        assert sorted(sent) == sorted(exported)
        for name, value in exported.items():
            assert torch.equal(torch.tensor(sent[name]), value), name
    finally:
        group.shutdown()
