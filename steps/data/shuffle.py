"""Hash shuffles as plain Ray tasks over blocks (pyarrow Tables in the object store).

Why not Ray Data's groupby/join: in Ray 2.60 each of them starts a pool of aggregator actors
and `join` needs polars; on a 2-core node one dedup of 47 documents took 300 s. A map task
here splits its block into P partitions by key hash (P return values), and reduce task i
receives partition i of every block: the classic MapReduce shuffle. The driver holds only
ObjectRefs (M x P of them), never rows; reduce inputs are 1/P of the data.

Functions passed to tasks are module-level, so tasks pickle only a reference to them.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa

# Options of every task the data step launches; the step sets them once (configure) from its
# config and its StepResources, so readers, cleaners and shuffles land where the step does.
TASK_OPTIONS: dict = {"num_cpus": 1}


def configure(num_cpus: float, resources: dict[str, float] | None = None) -> None:
    """CPUs per task, plus the step's custom resources (`data_node` on a cluster: the marker of
    the nodes that run the data image). Without them a task could be scheduled on any node with
    a free CPU, e.g. a GPU training node whose image lacks the data stage's dependencies."""
    TASK_OPTIONS.clear()
    TASK_OPTIONS["num_cpus"] = num_cpus
    if resources:
        TASK_OPTIONS["resources"] = dict(resources)


def task_options(num_returns: int | str = 1) -> dict:
    return {"num_returns": num_returns, **TASK_OPTIONS}


def key_partition(col: pa.ChunkedArray | pa.Array, parts: int) -> np.ndarray:
    """Partition index per row: int keys modulo P, strings by crc32 (stable across processes)."""
    if pa.types.is_integer(col.type):
        return (col.to_numpy(zero_copy_only=False).astype(np.int64) % parts).astype(np.int64)
    return np.fromiter((zlib.crc32(s.encode()) % parts for s in col.to_pylist()), dtype=np.int64, count=len(col))


def split(table: pa.Table, key: str, parts: int) -> list[pa.Table]:
    if parts == 1:
        return [table]
    idx = key_partition(table.column(key), parts)
    order = np.argsort(idx, kind="stable")
    bounds = np.searchsorted(idx[order], np.arange(parts + 1))
    sorted_table = table.take(pa.array(order))
    return [sorted_table.slice(bounds[i], bounds[i + 1] - bounds[i]) for i in range(parts)]


def concat(tables: Sequence[pa.Table]) -> pa.Table:
    tables = [t for t in tables if t is not None and t.num_columns]
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})


def _map_split(fn: Callable, kwargs: dict, key: str, parts: int, *blocks):
    """Apply fn(*blocks, **kwargs) -> Table, then split the result by `key` into P parts."""
    out = split(fn(*blocks, **kwargs), key, parts)
    return out[0] if parts == 1 else tuple(out)


def _reduce(fn: Callable, kwargs: dict, counts: tuple, *parts):
    """fn(concat(main parts), concat(side-1 parts), ...): `counts` says how many refs each has."""
    tables, start = [], 0
    for n in counts:
        tables.append(concat(parts[start: start + n]))
        start += n
    return fn(*tables, **kwargs)


def remote(fn: Callable, num_returns: int = 1):
    import ray

    return ray.remote(fn).options(**task_options(num_returns))


def map_split(blocks: Sequence, fn: Callable, key: str, parts: int, **kwargs) -> list[list]:
    """Per block: fn(block) split by key. Returns [block][partition] refs."""
    task = remote(_map_split, num_returns=parts)
    out = []
    for b in blocks:
        refs = task.remote(fn, kwargs, key, parts, *(b if isinstance(b, tuple) else (b,)))
        out.append([refs] if parts == 1 else list(refs))
    return out


def reduce(split_refs: list[list], fn: Callable, side: Sequence[list[list]] = (), num_returns: int = 1,
           **kwargs) -> list:
    """Reduce task i gets partition i of every block of `split_refs` and of each side input
    (each also [block][partition]); returns one ref (or a list of num_returns) per partition."""
    parts = len(split_refs[0])
    task = remote(_reduce, num_returns=num_returns)
    out = []
    for i in range(parts):
        groups = [[b[i] for b in split_refs]] + [[b[i] for b in s] for s in side]
        out.append(task.remote(fn, kwargs, tuple(len(g) for g in groups), *[r for g in groups for r in g]))
    return out


def shuffle(blocks: Sequence, key: str, parts: int, fn: Callable, pre: Callable | None = None,
            pre_kwargs: dict | None = None, side: Sequence[Sequence] = (), num_returns: int = 1, **kwargs) -> list:
    """pre(block) -> rows, hash-partitioned by `key`; fn(rows of one partition) per partition."""
    return reduce(map_split(blocks, pre or identity, key, parts, **(pre_kwargs or {})), fn, side,
                  num_returns=num_returns, **kwargs)


def identity(table: pa.Table) -> pa.Table:
    return table


def split_by(table: pa.Table, key: str, parts: int):
    """For reduce functions that feed the next shuffle directly (num_returns = parts)."""
    out = split(table, key, parts)
    return out[0] if parts == 1 else tuple(out)


def as_split(refs: list) -> list[list]:
    """Reduce outputs -> [reducer][partition] (a single return comes back as a bare ref)."""
    return [r if isinstance(r, list) else [r] for r in refs]
