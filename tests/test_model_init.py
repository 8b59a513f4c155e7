"""Initialisation holds where it matters: in a model built by the engine under ZeRO-3 on 2 ranks.

zero.Init partitions each parameter as soon as the module that owns it is constructed, so an
init applied to the finished model is a no-op there; the std of every parameter family is
measured on the gathered (full) parameters."""

import json
import math
import os
import socket
from functools import partial

import pytest
import torch

from model.config import ModelConfig
from model.llama import INIT_STD, Transformer

# big enough that each family's std is measured to well under 1% (>= 32k elements each)
CFG = ModelConfig(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=1024, multiple_of=64, max_seq_len=64)
FAMILIES = {  # name suffix -> intended std (None: RMSNorm gains, exactly 1)
    "tok_embeddings.weight": INIT_STD, "output.weight": INIT_STD,
    "wq.weight": INIT_STD, "wk.weight": INIT_STD, "wv.weight": INIT_STD, "w1.weight": INIT_STD,
    "w3.weight": INIT_STD, "wo.weight": INIT_STD / math.sqrt(2 * CFG.n_layers),
    "w2.weight": INIT_STD / math.sqrt(2 * CFG.n_layers), "norm.weight": None,
}


def family_stats(named_tensors) -> dict[str, dict]:
    values: dict[str, list[torch.Tensor]] = {k: [] for k in FAMILIES}
    for name, t in named_tensors:
        values[next(k for k in FAMILIES if name.endswith(k))].append(t.detach().float().flatten())
    out = {}
    for k, ts in values.items():
        x = torch.cat(ts)
        out[k] = {"n": x.numel(), "mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()),
                  "max": float(x.max()), "sum": float(x.double().sum())}
    return out


def check(stats: dict[str, dict]) -> None:
    for k, want in FAMILIES.items():
        s = stats[k]
        if want is None:
            assert s["min"] == s["max"] == 1.0, (k, s)
        else:
            assert s["n"] >= 30_000, k
            assert abs(s["mean"]) < 0.05 * want, (k, s)
            assert s["std"] == pytest.approx(want, rel=0.03), (k, s["std"], want)


def test_construction_initialises_every_family_without_zero():
    torch.manual_seed(0)
    check(family_stats(Transformer(CFG).named_parameters()))


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    import deepspeed

    from steps.engine.config import OptimConfig, TrainConfig
    from steps.engine.objective import Objective, collate_lm, lm_objective_loss
    from steps.engine.worker import build_engine
    from steps.pretrain import build_model

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)  # as the engine's train_loop does
    obj = Objective(name="init", build_module=partial(build_model, CFG), loss=lm_objective_loss, train_files=[],
                    columns=["tokens"], collate=collate_lm)
    tcfg = TrainConfig(num_workers=world, global_batch_size=2 * world, micro_batch_size=2, zero_stage=3,
                       precision="fp32")
    engine = build_engine(obj, tcfg, OptimConfig(lr=1e-3, warmup_steps=0), total_steps=10, world=world, accum=1)
    named = list(engine.module.named_parameters())
    assert all(p.numel() == 0 or p.ds_numel > p.numel() for _, p in named)  # really partitioned
    gathered = []
    for name, p in named:  # one parameter at a time: never the whole model in memory
        with deepspeed.zero.GatheredParameters([p]):
            gathered.append((name, p.detach().clone()))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(family_stats(gathered), f)
    torch.distributed.barrier()


@pytest.mark.slow
def test_engine_built_zero3_model_has_intended_init_on_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    stats = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert stats[0] == stats[1]  # both ranks hold the same model
    check(stats[0])
