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


def test_a_scaled_policy_leaves_as_a_plain_transformer_with_the_same_logits(tmp_path):
    """PPO's ScaledPolicy (steps/ppo/objectives.py) starts from a chat model's weights with its
    logit scale at 1, and what leaves it (the streamed export, the sampler's weights) is a plain
    Transformer whose logits are the scaled policy's: the scale folds into the output norm."""
    from safetensors.torch import save_file

    from model.llama import Transformer
    from steps.engine.checkpoint import load_initial_weights
    from steps.ppo.objectives import ScaledPolicy

    torch.manual_seed(0)
    chat = Transformer(CFG)
    save_file({k: v.contiguous() for k, v in chat.state_dict().items()}, tmp_path / "chat.safetensors")
    policy = ScaledPolicy(CFG)
    load_initial_weights(policy, str(tmp_path / "chat.safetensors"), zero3=False)  # no log_scale there: 0
    tokens = torch.tensor(rows(4)["tokens"])
    with torch.no_grad():
        assert torch.equal(policy(tokens), chat(tokens))
        policy.log_scale.fill_(0.4)
        policy.norm.weight.mul_(torch.linspace(0.5, 1.5, CFG.dim))
        assert next(iter(policy.named_parameters()))[0] == "log_scale"  # seen before norm.weight
        out = {n: policy.export_tensor(n, p.detach()) for n, p in policy.named_parameters()}
        plain = Transformer(CFG)
        plain.load_state_dict({n: t for n, t in out.items() if t is not None})
        assert out["log_scale"] is None
        torch.testing.assert_close(plain(tokens), policy(tokens), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(chat(tokens), policy(tokens))


def gathered(name):
    """An `infer` function: the learner's own copy of one parameter (its training copy, gathered
    under ZeRO-3), once per row."""
    def fn(module, batch):
        import deepspeed

        p = dict(module.named_parameters())[name]
        with deepspeed.zero.GatheredParameters([p]):
            return p.detach().float().reshape(1, -1).repeat(batch["inputs"].shape[0], 1)
    return fn


def scaled_lm_loss(module, batch):
    logits = module(batch["inputs"]).float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), reduction="sum"), {}


@pytest.mark.slow
def test_a_scaled_policy_learner_sends_and_exports_folded_weights(tmp_path, ray_local):
    """Under ZeRO-3 on two ranks (the one-element logit scale is partitioned too) the learner's
    gathered weights and its export carry no `log_scale`, and a plain Transformer loaded from
    them computes what the learner computes after its scale has moved."""
    from model.llama import Transformer
    from model.weights import load_state_dict
    from steps.engine.learner import LearnerGroup
    from steps.ppo.objectives import build_policy

    obj = Objective(name="scaled-test", build_module=partial(build_policy, CFG, True), loss=scaled_lm_loss,
                    train_files=[], columns=["tokens"], collate=collate_lm)
    tcfg = TrainConfig(num_workers=2, cpus_per_worker=0.5, micro_batch_size=4, zero_stage=3, precision="fp32")
    ocfg = OptimConfig(lr=1e-4, schedule="constant", warmup_steps=0, lr_scale={"log_scale": 500})
    group = LearnerGroup(obj, tcfg, ocfg, mini_batch_rows=8, total_steps=10, seed=0, name="scaled")
    try:
        data = rows()
        for i in range(4):
            group.step({k: v[i % 2 * 8:(i % 2 + 1) * 8] for k, v in data.items()})
        learner = group.infer(next_token_logp, data)
        log_scale = float(group.infer(gathered("log_scale"), data)[0, 0])
        gain = torch.tensor(group.infer(gathered("norm.weight"), data)[0])  # unfolded
        assert abs(log_scale) > 0.02  # the scale moved: a lost or wrong fold would show below
        sent = ray_local.get(group.weights())
        exported = load_state_dict(group.export(tmp_path / "export"))
        assert "log_scale" not in sent and sorted(sent) == sorted(exported)
        for name, value in exported.items():  # the sampler gets exactly what the export writes
            assert torch.equal(torch.tensor(sent[name]), value), name
        torch.testing.assert_close(exported["norm.weight"], gain * np.exp(log_scale), rtol=1e-5, atol=1e-6)
        plain = Transformer(CFG)
        plain.load_state_dict(exported)
        batch = collate_lm(data)
        with torch.no_grad():
            mine = next_token_logp(plain, batch).numpy()
        np.testing.assert_allclose(mine, learner, rtol=1e-4, atol=1e-4)
    finally:
        group.shutdown()
