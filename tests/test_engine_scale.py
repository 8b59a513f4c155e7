"""Properties of the training engine that only matter at scale, checked at small scale
(issue "Correct at scale"): collectives on the engine's device, equal forward passes per rank
in evaluation, loss weighted by loss units across micro-batches, a loader whose memory does
not grow with the corpus, fp32 gradient reduction and optimizer offload, checkpoints that never
unpickle code, and a final export whose host memory stays at about one parameter + one shard.
Multi-rank cases run on plain gloo processes (tests/engine_harness.py), not Ray."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from model.config import ModelConfig
from steps.engine.config import OptimConfig, TrainConfig
from steps.engine.objective import Objective, collate_lm, lm_objective_loss
from tests.engine_harness import run_ranks

REPO = Path(__file__).resolve().parent.parent
CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=32)


def build(cfg):
    from model.llama import Transformer

    return Transformer(cfg)


def write_tokens(path: Path, n_rows: int, seq: int = 17, seed: int = 0, row_group: int | None = None) -> str:
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, 64, n_rows)
    rows = np.stack([(s + np.arange(seq)) % 64 for s in starts]).astype(np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), seq).cast(
        pa.list_(pa.int32()))})
    pq.write_table(table, path, row_group_size=row_group or n_rows)
    return str(path)


# ----------------------------------------------------------------------------- item 2: device
def test_collectives_use_the_engine_device(monkeypatch):
    """Every reduction goes through all_reduce_sum with the engine's device (NCCL accepts CUDA
    tensors only); a CPU tensor handed to it would crash the first logging step on GPU."""
    import torch.distributed as dist

    from steps.engine import worker

    seen = []

    class Stop(Exception):
        pass

    def fake_all_reduce(t, *a, **k):
        seen.append(t.device)
        raise Stop

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    obj = Objective("t", partial(build, CFG), lm_objective_loss, [], ["tokens"], collate_lm)
    with pytest.raises(Stop):
        worker.reduce_metrics({"loss_sum": 1.0, "weight": 2.0}, obj, torch.device("meta"))
    assert seen == [torch.device("meta")]
    # and no module of the engine calls a collective on a tensor of its own making elsewhere
    for f in (REPO / "steps" / "engine").glob("*.py"):
        text = f.read_text()
        assert text.count("dist.all_reduce(") == (1 if f.name == "worker.py" else 0), f


# ----------------------------------------------------------------------------- item 3: uneven eval
def _uneven_eval_rank(rank: int, tmp: str) -> None:
    from steps.engine.worker import train_loop

    tmp = Path(tmp)
    obj = Objective("uneven", partial(build, CFG), lm_objective_loss, [str(tmp / "train.parquet")], ["tokens"],
                    collate_lm, eval_files=[str(tmp / "val.parquet")])
    tcfg = TrainConfig(num_workers=2, global_batch_size=4, micro_batch_size=1, max_steps=2, zero_stage=3,
                       precision="fp32", checkpoint_every=100, log_every=1, eval_every=2)
    train_loop({"objective": obj, "train_cfg": tcfg, "optim_cfg": OptimConfig(lr=1e-3, warmup_steps=0),
                "work_dir": str(tmp / "work"), "out_dir": str(tmp / "out"), "seed": 0})


@pytest.mark.slow
def test_uneven_evaluation_does_not_deadlock_zero3_and_weighs_every_row_once(tmp_path):
    """3 eval rows on 2 ranks with micro-batch 1: rank 0 has 2 micro-batches, rank 1 one. Under
    ZeRO-3 each forward gathers parameters collectively, so without padding this hangs."""
    write_tokens(tmp_path / "train.parquet", 32)
    write_tokens(tmp_path / "val.parquet", 3, seed=1)
    run_ranks(_uneven_eval_rank, 2, str(tmp_path), timeout=240)
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    from model.weights import load_state_dict

    model = build(CFG)
    model.load_state_dict(load_state_dict(tmp_path / "out"))
    tokens = torch.from_numpy(np.stack(pq.read_table(tmp_path / "val.parquet")["tokens"].to_numpy(
        zero_copy_only=False)).astype(np.int64))
    with torch.no_grad():
        loss_sum, n = model(tokens[:, :-1], targets=tokens[:, 1:])
    assert history[-1]["eval_loss"] == pytest.approx(float(loss_sum) / n, rel=1e-5)


# ----------------------------------------------------------------------------- item 8: loss units
def collate_masked(rows):
    """LM rows whose first `prompt` targets carry no loss (as prompt tokens in SFT)."""
    batch = collate_lm(rows)
    prompt = torch.from_numpy(np.asarray(rows["prompt"], dtype=np.int64))
    batch["targets"] = batch["targets"].masked_fill(torch.arange(16)[None] < prompt[:, None], -100)
    return batch


def _grad_rank(rank: int, tmp: str) -> None:
    import deepspeed

    from steps.engine.worker import build_engine, train_step

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    obj = Objective("w", partial(build, CFG), lm_objective_loss, [], ["tokens", "prompt"], collate_masked)
    engine = build_engine(obj, TrainConfig(global_batch_size=2, micro_batch_size=1, zero_stage=0, precision="fp32"),
                          OptimConfig(lr=1e-3, warmup_steps=0, grad_clip=0.0), total_steps=1, world=1, accum=2)
    reference = build(CFG)
    reference.load_state_dict(engine.module.state_dict())
    seq = (np.arange(17) % 64).astype(np.int32)
    batches = [{"tokens": [seq], "prompt": [0]}, {"tokens": [seq[::-1].copy()], "prompt": [14]}]  # 16 vs 2 units
    grads = {}
    engine.optimizer.step = lambda *a, **k: grads.update(
        {n: p.grad.clone() for n, p in engine.module.named_parameters()})
    sums = train_step(engine, batches, obj)
    total, units = 0.0, 0.0
    for rows in batches:
        b = collate_masked(rows)
        ls, _ = lm_objective_loss(reference, b)
        total, units = total + ls, units + obj.weight(b)
    (total / units).backward()
    err = max(float((grads[n] - p.grad).abs().max()) for n, p in reference.named_parameters())
    Path(tmp, "result.json").write_text(json.dumps({"err": err, "units": sums["weight"],
                                                   "loss": sums["loss_sum"] / sums["weight"],
                                                   "ref_loss": float(total / units)}))


@pytest.mark.slow
def test_loss_is_weighted_by_loss_tokens_across_micro_batches(tmp_path):
    """A micro-batch with 2 answer tokens weighs 2/18 of the step, not half of it."""
    run_ranks(_grad_rank, 1, str(tmp_path), timeout=180)
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["units"] == 18
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6)
    assert r["err"] < 1e-6, r


# ----------------------------------------------------------------------------- item 4: streaming
LOADER_SCRIPT = r"""
import json, sys, psutil
from steps.engine.data import RowSource
files = sys.argv[1:]
proc = psutil.Process()
src = RowSource(files, ["tokens"], 0, global_batch=64, micro_batch=8, world=2, window_rows=65536)
before = proc.memory_info().rss
peak = before
for step in range(0, 400, 2):
    for rank in (0, 1):
        src.micro_batches(step, rank)
    peak = max(peak, proc.memory_info().rss)
for rows, real in src.eval_batches(0, 2048):
    pass
peak = max(peak, proc.memory_info().rss)
print(json.dumps({"growth_mb": (peak - before) / 2**20, "rows": src.num_rows}))
"""


def write_corpus(directory: Path, megabytes: int, seq: int = 129) -> list[str]:
    """Token shards of about `megabytes` MB (int32, row groups of 4096 sequences)."""
    rng = np.random.default_rng(0)
    rows_per_file = 65536
    n_rows = megabytes * 2**20 // (4 * seq)
    files = []
    for i in range(0, n_rows, rows_per_file):
        n = min(rows_per_file, n_rows - i)
        tokens = rng.integers(0, 32000, (n, seq), dtype=np.int32)
        table = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens.ravel()), seq).cast(
            pa.list_(pa.int32()))})
        files.append(str(directory / f"part-{i // rows_per_file:05d}.parquet"))
        directory.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, files[-1], row_group_size=4096, compression="none")
    return files


@pytest.mark.slow
def test_loader_memory_stays_flat_as_the_corpus_grows(tmp_path):
    def growth(files):
        res = subprocess.run([sys.executable, "-c", LOADER_SCRIPT, *files], cwd=REPO, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        return json.loads(res.stdout.strip().splitlines()[-1])

    small = growth(write_corpus(tmp_path / "small", 20))
    big = growth(write_corpus(tmp_path / "big", 400))
    assert big["rows"] > 15 * small["rows"]
    assert big["growth_mb"] - small["growth_mb"] < 100, (small, big)


# ----------------------------------------------------------------------------- items 7, 10
BF16_SCRIPT = r"""
import os
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"], RANK="0",
                  WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed, numpy as np, torch
deepspeed.init_distributed(dist_backend="gloo")
from functools import partial
from model.config import ModelConfig
from model.llama import Transformer
from steps.engine.config import OptimConfig, TrainConfig
from steps.engine.objective import Objective, collate_lm, lm_objective_loss
from steps.engine.worker import build_engine, train_step
cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16)
obj = Objective("t", partial(Transformer, cfg), lm_objective_loss, [], ["tokens"], collate_lm)
torch.manual_seed(0)
tc = TrainConfig(global_batch_size=4, micro_batch_size=4, precision="bf16", zero_stage=3, offload_optimizer=True)
engine = build_engine(obj, tc, OptimConfig(lr=1e-2, warmup_steps=0), total_steps=20, world=1, accum=1)
assert engine.communication_data_type == torch.float32, engine.communication_data_type
assert engine.zero_offload_optimizer(), "optimizer states are not offloaded"
rows = {"tokens": list(np.tile(np.arange(17) % 8, (4, 1)))}
losses = [(lambda s: s["loss_sum"] / s["weight"])(train_step(engine, [rows], obj)) for _ in range(12)]
assert losses[-1] < 0.7 * losses[0], losses
print("OK", losses[0], losses[-1])
"""


@pytest.mark.slow
def test_bf16_reduces_gradients_in_fp32_and_offloaded_optimizer_trains():
    from tests.engine_harness import _free_port

    res = subprocess.run([sys.executable, "-c", BF16_SCRIPT], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PORT": str(_free_port())})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK" in res.stdout


def test_deepspeed_config_reduces_in_fp32_for_bf16():
    from steps.engine.worker import deepspeed_config

    ds = deepspeed_config(TrainConfig(precision="bf16"), OptimConfig(), world=64, accum=4)
    assert ds["communication_data_type"] == "fp32" and ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert "communication_data_type" not in deepspeed_config(TrainConfig(precision="fp32"), OptimConfig(), 1, 1)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_files_are_loaded_without_unpickling_code(tmp_path):
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    from steps.engine.checkpoint import use_safe_loading

    class FakeEngine:
        checkpoint_engine = TorchCheckpointEngine()

    engine = FakeEngine()
    use_safe_loading(engine)
    good = tmp_path / "good.pt"
    torch.save({"module": {"w": torch.ones(2)}, "step": 3}, good)
    assert engine.checkpoint_engine.load(str(good))["step"] == 3
    evil = tmp_path / "evil.pt"
    torch.save({"module": {}, "x": _Evil()}, evil)
    with pytest.raises(pickle.UnpicklingError):
        engine.checkpoint_engine.load(str(evil))


def test_rng_state_round_trips_through_json():
    import random

    from steps.engine.checkpoint import rng_state, set_rng_state

    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = json.loads(json.dumps(rng_state()))
    want = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


# ----------------------------------------------------------------------------- item 5: export
BIG = ModelConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=512, multiple_of=256, max_seq_len=64)


def _export_rank(rank: int, tmp: str) -> None:
    import threading
    import time

    import deepspeed
    import psutil

    from steps.engine.checkpoint import export_weights
    from steps.engine.worker import build_engine

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    obj = Objective("e", partial(build, BIG), lm_objective_loss, [], ["tokens"], collate_lm)
    engine = build_engine(obj, TrainConfig(global_batch_size=2, micro_batch_size=1, zero_stage=3, precision="fp32"),
                          OptimConfig(), total_steps=1, world=2, accum=1)
    norms = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            norms[name] = float(p.data.double().norm())
    proc, peak, stop = psutil.Process(), [0], threading.Event()
    base = proc.memory_info().rss

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss - base)
            time.sleep(0.002)

    t = threading.Thread(target=sample)
    t.start()
    export_weights(engine, Path(tmp) / "weights", max_shard_bytes=8 << 20)
    stop.set()
    t.join()
    if rank == 0:
        Path(tmp, "export.json").write_text(json.dumps({"peak_mb": peak[0] / 2**20, "norms": norms}))


@pytest.mark.slow
def test_export_streams_parameters_into_shards_with_bounded_host_memory(tmp_path):
    from model.weights import WeightsReader

    run_ranks(_export_rank, 2, str(tmp_path), timeout=300)
    r = json.loads((tmp_path / "export.json").read_text())
    files = sorted(p.name for p in (tmp_path / "weights").glob("*.safetensors"))
    assert len(files) >= 10 and (tmp_path / "weights" / "model.safetensors.index.json").exists()
    with WeightsReader(tmp_path / "weights") as reader:
        assert set(reader.keys()) == set(r["norms"])
        for name, norm in r["norms"].items():
            assert float(reader[name].double().norm()) == pytest.approx(norm, rel=1e-6), name
        model_mb = sum(reader[n].numel() for n in reader.keys()) * 4 / 2**20
    # the model is ~110 MB; the export holds about one parameter (3 MB) and one 8 MB shard
    assert model_mb > 100 and r["peak_mb"] < 45, r["peak_mb"]


def test_an_evaluation_set_with_nothing_to_evaluate_is_an_error_before_training(tmp_path):
    """GAtt once logged eval_loss = NaN from a fully masked evaluation set: now it is refused."""
    from steps.engine.worker import check_eval_set

    write_tokens(tmp_path / "val.parquet", 4)
    masked = Objective("gatt", partial(build, CFG), lm_objective_loss, [], ["tokens", "prompt"], collate_masked,
                       eval_files=[str(tmp_path / "val.parquet")])
    table = pq.read_table(tmp_path / "val.parquet").append_column("prompt", pa.array([16] * 4))
    pq.write_table(table, tmp_path / "val.parquet")
    with pytest.raises(ValueError, match="no loss units"):
        check_eval_set(masked, TrainConfig(micro_batch_size=2))
    check_eval_set(Objective("lm", partial(build, CFG), lm_objective_loss, [], ["tokens"], collate_lm,
                             eval_files=[str(tmp_path / "val.parquet")]), TrainConfig(micro_batch_size=2))


def _resume_rank(rank: int, tmp: str, max_steps: int) -> None:
    from steps.engine.worker import train_loop

    tmp = Path(tmp)
    obj = Objective("resume", partial(build, CFG), lm_objective_loss, [str(tmp / "train.parquet")], ["tokens"],
                    collate_lm)
    tcfg = TrainConfig(num_workers=1, global_batch_size=4, micro_batch_size=4, max_steps=max_steps, zero_stage=3,
                       precision="fp32", checkpoint_every=2, log_every=1)
    train_loop({"objective": obj, "train_cfg": tcfg, "optim_cfg": OptimConfig(lr=1e-3, warmup_steps=0),
                "work_dir": str(tmp / "work"), "out_dir": str(tmp / "out"), "seed": 0})


@pytest.mark.slow
def test_a_truncated_checkpoint_is_detected_and_never_loaded(tmp_path):
    write_tokens(tmp_path / "train.parquet", 32)
    run_ranks(_resume_rank, 1, str(tmp_path), 3, timeout=180)  # checkpoint at step 2, then step 3
    tag = tmp_path / "work" / "checkpoints" / "step_00000002"
    client = json.loads((tag / "client_rank0.json").read_text())
    assert client["files"] and all(len(v) == 64 for v in client["files"].values())
    optim = next(tag.glob("*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[:-100])  # truncated, as by a full disk
    with pytest.raises(Exception, match=rf"{optim.name} is truncated or altered"):
        run_ranks(_resume_rank, 1, str(tmp_path), 4, timeout=180)
