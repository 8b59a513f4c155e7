"""The shared training engine: schedule, gradient accumulation, ZeRO-3 on 2 Ray Train
workers, and kill-and-resume with the same data position."""

import dataclasses
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.config import ModelConfig
from steps.engine import Objective, collate_lm, lm_objective_loss, train
from steps.engine.config import OptimConfig, TrainConfig
from steps.engine.data import RowSource
from steps.engine.optim import build_optimizer, lr_multiplier

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=32)


def build(cfg):
    from model.llama import Transformer

    return Transformer(cfg)  # initialised in construction, also under ZeRO-3


def write_tokens(path, n_rows=256, seq=17, seed=0):
    """Sequences with learnable structure: each token is the previous plus one (mod 64)."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, 64, n_rows)
    rows = [((s + np.arange(seq)) % 64).astype(np.int32) for s in starts]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"tokens": pa.array(rows, type=pa.list_(pa.int32()))}), path)
    return str(path)


def objective(tmp_path):
    return Objective(name="test", build_module=partial(build, CFG), loss=lm_objective_loss,
                     train_files=[write_tokens(tmp_path / "train.parquet")],
                     eval_files=[write_tokens(tmp_path / "val.parquet", 64, seed=1)],
                     columns=["tokens"], collate=collate_lm, tokens_per_row=16)


def test_cosine_schedule_with_warmup_to_ten_percent():
    cfg = OptimConfig(lr=3e-4, warmup_steps=2000, min_lr_ratio=0.1)
    assert lr_multiplier(0, 100_000, cfg) == pytest.approx(1 / 2000)
    assert lr_multiplier(1999, 100_000, cfg) == pytest.approx(1.0)
    assert lr_multiplier(99_999, 100_000, cfg) == pytest.approx(0.1)
    mid = lr_multiplier(2000 + (100_000 - 2001) // 2, 100_000, cfg)
    assert mid == pytest.approx(0.55, abs=1e-3)
    const = OptimConfig(lr=1e-6, schedule="constant", warmup_steps=0)
    assert lr_multiplier(0, 10, const) == lr_multiplier(9, 10, const) == 1.0
    rm = OptimConfig(lr=1e-5, warmup_fraction=0.03, min_warmup_steps=5)
    assert lr_multiplier(4, 100, rm) == pytest.approx(1.0)  # 3% of 100 < 5: at least 5 steps


def test_lr_scale_gives_the_named_parameters_their_own_learning_rate():
    """Adam's first step moves every weight with a gradient by about its LR: the output norm's
    gain (`norm.weight`, scaled 10x) moves ten times as far as the layers' norm gains, and the
    warm-up schedule scales both groups alike."""
    import torch

    from model.llama import Transformer

    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16)
    torch.manual_seed(0)
    model = Transformer(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ocfg = OptimConfig(lr=1e-3, warmup_steps=2, schedule="constant", lr_scale={"norm.weight": 10.0})
    opt, sched = build_optimizer(model, ocfg, total_steps=10, fused=False)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5e-3, 0.5e-3, 0.5e-2])  # warm-up step 1 of 2
    assert opt.param_groups[2]["params"] == [model.norm.weight] and opt.param_groups[2]["weight_decay"] == 0.0
    tokens = torch.randint(0, 64, (4, 16))
    torch.nn.functional.cross_entropy(model(tokens)[:, :-1].reshape(-1, 64), tokens[:, 1:].reshape(-1)).backward()
    opt.step()
    sched.step()
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()}
    assert moved["norm.weight"] == pytest.approx(0.5e-2, rel=0.05)
    assert moved["layers.0.ffn_norm.weight"] == pytest.approx(0.5e-3, rel=0.05)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-3, 1e-2])  # warm-up done: same ratio
    with pytest.raises(ValueError, match=r"optim.lr_scale: \['head.weight'\] match no parameter"):
        build_optimizer(model, OptimConfig(lr_scale={"head.weight": 2.0}), total_steps=10, fused=False)
    with pytest.raises(ValueError):
        OptimConfig(lr_scale={"norm.weight": 0.0})


def test_without_lr_scale_the_groups_are_decay_then_no_decay_as_checkpoints_expect():
    import torch

    from model.llama import Transformer

    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                                    max_seq_len=16))
    opt, _ = build_optimizer(model, OptimConfig(weight_decay=0.1), total_steps=10, fused=False)
    params = list(model.parameters())
    assert [(g["weight_decay"], g["lr"]) for g in opt.param_groups] == [(0.1, 3e-4 / 2000), (0.0, 3e-4 / 2000)]
    assert opt.param_groups[0]["params"] == [p for p in params if p.dim() >= 2]
    assert opt.param_groups[1]["params"] == [p for p in params if p.dim() < 2]
    assert isinstance(opt, torch.optim.AdamW)


def test_data_position_is_deterministic_and_sharded(tmp_path):
    f = write_tokens(tmp_path / "t.parquet", 64)
    src = [RowSource([f], ["tokens"], 7, global_batch=16, micro_batch=4, world=2) for _ in range(2)]
    assert src[0].accum == 2 and src[0].steps_per_epoch == 4
    rows = [np.concatenate([src[r].micro_batch_rows(s, r, m) for r in range(2) for m in range(2)]) for s in range(4)]
    assert sorted(np.concatenate(rows).tolist()) == list(range(64))  # an epoch sees every row once
    assert np.array_equal(src[0].micro_batch_rows(5, 1, 1), src[1].micro_batch_rows(5, 1, 1))
    assert not np.array_equal(src[0].micro_batch_rows(0, 0, 0), src[0].micro_batch_rows(4, 0, 0))  # reshuffled
    with pytest.raises(ValueError, match="not a multiple"):
        RowSource([f], ["tokens"], 0, global_batch=10, micro_batch=4, world=2)


def small_run(tmp_path, **train_kw):
    tcfg = TrainConfig(num_workers=2, cpus_per_worker=1, global_batch_size=16, micro_batch_size=4, max_steps=12,
                       zero_stage=3, precision="fp32", checkpoint_every=4, log_every=1, eval_every=12,
                       **train_kw)
    ocfg = OptimConfig(lr=3e-2, warmup_steps=2)  # the init is small (std 0.02): loss starts at ln(64)
    return tcfg, ocfg


@pytest.mark.slow
def test_zero3_two_workers_loss_falls_and_resumes_after_kill(tmp_path, ray_local, monkeypatch):
    obj = dataclasses.replace(objective(tmp_path), eval_at_start=True)
    tcfg, ocfg = small_run(tmp_path, max_failures=0)
    full = train(obj, tcfg, ocfg, work_dir=tmp_path / "a" / "work", out_dir=tmp_path / "a" / "out", seed=0)
    losses = [h["loss"] for h in full.history]
    assert len(losses) == 12 and losses[-1] < 0.5 * losses[0]
    assert full.final["eval_loss"] < 0.5 * full.history[0]["loss"]
    # eval_at_start: the untrained model's eval loss (about ln 64 on these rows), in the first row only
    assert full.history[0]["eval_loss_at_start"] > 3.0 > 2 * full.final["eval_loss"]
    assert not any("eval_loss_at_start" in h for h in full.history[1:])

    # consolidated fp32 weights load into a fresh model (safetensors, no pickle)
    from model.weights import load_state_dict
    fresh = build(CFG)
    fresh.load_state_dict(load_state_dict(full.weights))

    # the whole job dies at step 6 (after the step-4 checkpoint); a re-run resumes from it
    monkeypatch.setenv("LLAMA2_FAIL_AT_STEP", "6")
    work = tmp_path / "b" / "work"
    from ray.train import TrainingFailedError

    with pytest.raises(TrainingFailedError):
        train(obj, tcfg, ocfg, work_dir=work, out_dir=tmp_path / "b" / "out", seed=0)
    assert (work / "checkpoints" / "latest").read_text() == "step_00000004"
    resumed = train(obj, tcfg, ocfg, work_dir=work, out_dir=tmp_path / "b" / "out", seed=0)
    got = {h["step"]: h["loss"] for h in resumed.history}
    want = {h["step"]: h["loss"] for h in full.history}
    assert sorted(got) == list(range(1, 13))
    # the resumed run does not evaluate "at start" again; the first row keeps the fresh run's value
    assert resumed.history[0]["eval_loss_at_start"] == pytest.approx(full.history[0]["eval_loss_at_start"])
    assert not any("eval_loss_at_start" in h for h in resumed.history[1:])
    for step in range(5, 13):  # same data position and RNG: the same losses after the checkpoint
        assert got[step] == pytest.approx(want[step], rel=1e-4), step


@pytest.mark.slow
def test_failed_worker_group_is_restarted_from_checkpoint(tmp_path, ray_local, monkeypatch):
    obj = objective(tmp_path)
    tcfg, ocfg = small_run(tmp_path, max_failures=1)
    monkeypatch.setenv("LLAMA2_FAIL_AT_STEP", "6")
    work = tmp_path / "work"
    result = train(obj, tcfg, ocfg, work_dir=work, out_dir=tmp_path / "out", seed=0)
    assert (work / "failed_once").read_text() == "6"  # it did crash once
    assert [h["step"] for h in result.history] == list(range(1, 13))
    assert result.history[-1]["loss"] < result.history[0]["loss"]


NO_RAY_SCRIPT = r"""
import importlib.abc, os, sys
class Block(importlib.abc.MetaPathFinder):  # the GPU machine has neither (shared/STACK.md)
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("ray", "mlflow"):
            raise ImportError("not installed here: " + name)
sys.meta_path.insert(0, Block())
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT="29541", RANK="0",
                  WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")
from functools import partial
import numpy as np, torch
from model.config import ModelConfig
from steps.engine.config import OptimConfig, TrainConfig
from steps.engine.objective import Objective, collate_lm, lm_objective_loss
from steps.engine.worker import build_engine, train_step
from model.llama import Transformer
cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16)
def build(c):
    return Transformer(c)
obj = Objective(name="t", build_module=partial(build, cfg), loss=lm_objective_loss, train_files=[],
                columns=["tokens"], collate=collate_lm)
torch.manual_seed(0)
engine = build_engine(obj, TrainConfig(global_batch_size=4, micro_batch_size=4, precision="fp32"),
                      OptimConfig(lr=1e-2, warmup_steps=0, lr_scale={"norm.weight": 0.5}), total_steps=20,
                      world=1, accum=1)
rows = {"tokens": list(np.tile(np.arange(17) % 8, (4, 1)))}
def loss(sums):
    return sums["loss_sum"] / sums["weight"]
from deepspeed.utils import safe_get_full_fp32_param
named = dict(engine.module.named_parameters())
def master(name):  # the fp32 master copy ZeRO-3 partitions, gathered
    return safe_get_full_fp32_param(named[name]).clone()
before = {n: master(n) for n in ("norm.weight", "layers.0.ffn_norm.weight")}
losses = [loss(train_step(engine, [rows], obj))]
moved = {n: float((master(n) - w).abs().max()) for n, w in before.items()}
assert abs(moved["norm.weight"] / moved["layers.0.ffn_norm.weight"] - 0.5) < 0.05, moved  # lr_scale 0.5
losses += [loss(train_step(engine, [rows], obj)) for _ in range(14)]
print("LOSSES", losses[0], losses[-1])
lrs = [g["lr"] for g in engine.optimizer.param_groups]  # ZeRO-3 keeps lr_scale's own group, last
assert len(lrs) == 3 and lrs[0] == lrs[1] and abs(lrs[2] / lrs[0] - 0.5) < 1e-9, lrs
assert losses[-1] < 0.5 * losses[0], losses
"""


@pytest.mark.slow
def test_inner_step_runs_without_ray_or_mlflow():
    """The engine's step (build_engine + train_step) is what the GPU benchmarks call on a machine
    with neither Ray nor MLflow installed; it must not import them, and it must train."""
    import subprocess
    import sys
    from pathlib import Path

    res = subprocess.run([sys.executable, "-c", NO_RAY_SCRIPT], cwd=Path(__file__).resolve().parent.parent,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "LOSSES" in res.stdout
