"""Connected components of the duplicate graph, distributed, with nothing per node on the driver.

The alternating large-star / small-star algorithm (Kiveris et al., "Connected Components in
MapReduce and Beyond", SoCC 2014): min-label propagation in O(log^2 n) rounds, each round
two hash shuffles of the edge list (shuffle.py):

    large-star  for each node u: m = min(u, neighbours); every neighbour v > u is relinked to m
    small-star  for each node u: m = min(u, neighbours < u); u and every neighbour < u link to m

A round in which no group changes anything leaves every component a star around its
smallest node (the document first in pipeline order, the one kept). Each reduce task returns
its count of changed groups; the driver sums P integers per round. Nodes are order keys.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from steps.data import shuffle as sh

EDGE_SCHEMA = pa.schema([("u", pa.string()), ("v", pa.string())])
ROOT_SCHEMA = pa.schema([("node", pa.string()), ("root", pa.string())])


def _groups(table: pa.Table):
    """(u, sorted unique neighbours) per node of an edge table."""
    if not table.num_rows:
        return
    u = np.asarray(table.column("u").to_pylist(), dtype=object)
    v = np.asarray(table.column("v").to_pylist(), dtype=object)
    order = np.lexsort((v.astype(str), u.astype(str)))
    u, v = u[order], v[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    ends = np.r_[starts[1:], len(u)]
    for s, e in zip(starts, ends):
        yield u[s], sorted(set(v[s:e]) - {u[s]})


def _edges(us: list, vs: list) -> pa.Table:
    return pa.table({"u": pa.array(us, pa.string()), "v": pa.array(vs, pa.string())}, schema=EDGE_SCHEMA)


def large_star(table: pa.Table, parts: int):
    """Input: edges in both directions, grouped by u. Output: split by the larger endpoint."""
    us, vs, changed = [], [], 0
    for u, nbrs in _groups(table):
        if not nbrs:
            continue
        m = min(u, nbrs[0])
        larger = [v for v in nbrs if v > u]
        changed += bool(larger) and m != u
        us += larger
        vs += [m] * len(larger)
    return (*_as_tuple(sh.split_by(_edges(us, vs), "u", parts)), changed)


def small_star(table: pa.Table, parts: int):
    """Input: edges (larger u, smaller v), grouped by u. Output: both directions, split by u."""
    us, vs, changed = [], [], 0
    for u, nbrs in _groups(table):
        smaller = [v for v in nbrs if v < u]
        if not smaller:
            continue
        m = smaller[0]
        changed += len(smaller) > 1
        out = [v for v in [*smaller, u] if v != m]
        us += out + [m] * len(out)
        vs += [m] * len(out) + out
    return (*_as_tuple(sh.split_by(_edges(us, vs), "u", parts)), changed)


def roots(table: pa.Table, parts: int):
    """Converged stars (both directions): every non-root node's only neighbour is its root."""
    nodes, rs = [], []
    for u, nbrs in _groups(table):
        if nbrs and nbrs[0] < u:
            nodes.append(u)
            rs.append(nbrs[0])
    t = pa.table({"node": pa.array(nodes, pa.string()), "root": pa.array(rs, pa.string())}, schema=ROOT_SCHEMA)
    return sh.split_by(t, "node", parts)


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def both_directions(table: pa.Table) -> pa.Table:
    if not table.num_rows:
        return _edges([], [])
    u, v = table.column("u"), table.column("v")
    return pa.concat_tables([pa.table({"u": u, "v": v}, schema=EDGE_SCHEMA),
                             pa.table({"u": v, "v": u}, schema=EDGE_SCHEMA)])


def connected_components(edge_blocks: list, parts: int, max_rounds: int = 64) -> list:
    """edge_blocks: refs of tables with string columns u, v. Returns P refs of (node, root)
    tables, split by node, for every node that is not the smallest of its component."""
    import ray

    cur = sh.map_split(edge_blocks, both_directions, "u", parts)  # [block][part]
    for _ in range(max_rounds):
        large = sh.reduce(cur, large_star, num_returns=parts + 1, parts=parts)
        small = sh.reduce([r[:parts] for r in large], small_star, num_returns=parts + 1, parts=parts)
        changed = sum(ray.get([r[parts] for r in large] + [r[parts] for r in small]))
        cur = [r[:parts] for r in small]
        if not changed:
            break
    else:
        raise RuntimeError(f"connected components did not converge in {max_rounds} rounds")
    out = sh.reduce(cur, roots, num_returns=parts, parts=parts)
    return sh.as_split(out)  # [reducer][part], ready for sh.reduce
