"""Run a function on N gloo ranks as plain processes (torch.distributed, DeepSpeed on CPU),
without Ray: the engine's properties at 2 ranks in seconds rather than a Ray Train launch."""

from __future__ import annotations

import os
import socket

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    fn(rank, *args)


def run_ranks(fn, world: int, *args, timeout: float = 300) -> None:
    """fn(rank, *args) on `world` processes; raises if any fails or the group hangs (deadlock)."""
    ctx = mp.start_processes(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=False,
                             start_method="spawn")
    import time

    deadline = time.time() + timeout
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{world} ranks did not finish within {timeout}s (a collective deadlock?)")
