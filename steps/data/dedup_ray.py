"""Exact + MinHash dedup over blocks on Ray: maps and hash shuffles (shuffle.py); the driver
holds ObjectRefs and a few counts, never rows.

    signatures   per block: exact key, shingle set (bytes), LSH band keys per document
    exact        shuffle by exact key: all but the first (pipeline order) of a group go
    buckets      band keys shuffled by key; in a bucket, exact copies collapse to their first,
                 then candidate pairs (dedup.bucket_pairs), shuffled by the first document
    verify       (dedup.verify; off: every collision is an edge) joined with the first's shingles (same partitioning), shuffled by the second,
                 joined with its shingles: exact Jaccard >= threshold makes an edge
    components   components.py, over the edges
    records      per removed document: the kept one and the best Jaccard (exact: 1.0)

`order` is the pipeline order key "<source index>/<id>": the id comes back from it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from steps.data import dedup as dd
from steps.data import shuffle as sh
from steps.data.components import connected_components
from steps.data.config import DedupConfig

RECORD_SCHEMA = pa.schema([("order", pa.string()), ("removed_id", pa.string()), ("kept_id", pa.string()),
                           ("kind", pa.string()), ("similarity", pa.float64())])


def signatures(block: pa.Table, cfg: DedupConfig) -> pa.Table:
    perms = dd.permutations(cfg.num_perm)
    exact, shingles, bands = [], [], []
    for text in block.column("text").to_pylist():
        words = dd.normalize(text).split()
        exact.append(dd.exact_key(text) if words else -1)
        s = dd.shingles_of_words(words, cfg.ngram) if cfg.minhash else np.zeros(0, np.uint32)
        shingles.append(s.tobytes())
        bands.append(dd.band_keys(dd.signature(s, perms), cfg.bands) if len(s) else np.zeros(0, np.int64))
    return pa.table({"order": block.column("order"), "exact": pa.array(exact, pa.int64()),
                     "shingles": pa.array(shingles, pa.binary()),
                     "bands": pa.array(bands, pa.list_(pa.int64()))})


def _exact_rows(sigs: pa.Table) -> pa.Table:
    return sigs.select(["order", "exact"]).filter(pc.greater_equal(sigs.column("exact"), 0))


def _exact_reduce(rows: pa.Table, parts: int):
    nodes, roots = [], []
    if rows.num_rows:
        rows = rows.sort_by([("exact", "ascending"), ("order", "ascending")])
        ex, od = rows.column("exact").to_numpy(), rows.column("order").to_pylist()
        first = od[0]
        for i in range(1, len(od)):
            if ex[i] == ex[i - 1]:
                nodes.append(od[i])
                roots.append(first)
            else:
                first = od[i]
    return sh.split_by(_records(nodes, roots, np.ones(len(nodes)), "exact"), "order", parts)


def _records(nodes: list, roots: list, sims, kind: str) -> pa.Table:
    return pa.table({"order": pa.array(nodes, pa.string()),
                     "removed_id": pa.array([o.split("/", 1)[1] for o in nodes], pa.string()),
                     "kept_id": pa.array([o.split("/", 1)[1] for o in roots], pa.string()),
                     "kind": pa.array([kind] * len(nodes), pa.string()),
                     "similarity": pa.array(sims, pa.float64())}, schema=RECORD_SCHEMA)


def _band_rows(sigs: pa.Table) -> pa.Table:
    bands = sigs.column("bands").combine_chunks()
    idx = pc.list_parent_indices(bands)
    return pa.table({"key": pc.list_flatten(bands), "order": sigs.column("order").take(idx),
                     "exact": sigs.column("exact").take(idx)})


def _bucket_reduce(rows: pa.Table, parts: int, max_all_pairs: int, collapse_exact: bool):
    us, vs = [], []
    if rows.num_rows:
        rows = rows.sort_by([("key", "ascending"), ("order", "ascending")])
        keys = rows.column("key").to_numpy()
        orders, exact = rows.column("order").to_pylist(), rows.column("exact").to_numpy()
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        for s, e in zip(starts, np.r_[starts[1:], len(keys)]):
            if e - s < 2:
                continue
            seen, members = set(), []
            for i in range(s, e):  # exact copies share every band: the exact pass removes all but the first
                if not collapse_exact or exact[i] < 0 or exact[i] not in seen:
                    seen.add(exact[i])
                    members.append(orders[i])
            for a, b in dd.bucket_pairs(members, max_all_pairs):
                us.append(a)
                vs.append(b)
    return sh.split_by(pa.table({"u": pa.array(us, pa.string()), "v": pa.array(vs, pa.string())}), "u", parts)


def _shingle_rows(sigs: pa.Table) -> pa.Table:
    return sigs.select(["order", "shingles"])


def _attach(pairs: pa.Table, shingles: pa.Table, side: str) -> pa.Table:
    """Pairs joined with the shingles of their `side` ("u" or "v") column."""
    if not pairs.num_rows:
        return pairs
    lookup = dict(zip(shingles.column("order").to_pylist(), shingles.column("shingles").to_pylist())) \
        if shingles.num_rows else {}
    return pairs.append_column(f"s{side}", pa.array([lookup[o] for o in pairs.column(side).to_pylist()],
                                                    pa.binary()))


def _verify_first(pairs: pa.Table, shingles: pa.Table, parts: int):
    if pairs.num_rows:  # a pair shares many bands: once is enough
        pairs = pairs.group_by(["u", "v"]).aggregate([])
    n = pairs.num_rows
    attached = _attach(pairs, shingles, "u") if n else pa.table({"u": pa.array([], pa.string()), "v": pa.array(
        [], pa.string()), "su": pa.array([], pa.binary())})
    return (*_tuple(sh.split_by(attached, "v", parts)), n)


def _verify_second(pairs: pa.Table, shingles: pa.Table, threshold: float) -> pa.Table:
    us, vs, js = [], [], []
    if pairs.num_rows:
        pairs = _attach(pairs, shingles, "v")
        for u, v, a, b in zip(*(pairs.column(c).to_pylist() for c in ("u", "v", "su", "sv"))):
            j = dd.jaccard(np.frombuffer(a, np.uint32), np.frombuffer(b, np.uint32))
            if j >= threshold:
                us.append(u)
                vs.append(v)
                js.append(j)
    return pa.table({"u": pa.array(us, pa.string()), "v": pa.array(vs, pa.string()), "j": pa.array(js, pa.float64())})


def _unverified_edges(pairs: pa.Table) -> pa.Table:
    if pairs.num_rows:
        pairs = pairs.group_by(["u", "v"]).aggregate([])
    return pa.table({"u": pairs.column("u"), "v": pairs.column("v"),
                     "j": pa.array(np.full(pairs.num_rows, dd.UNVERIFIED), pa.float64())})


def _best_rows(edges: pa.Table) -> pa.Table:
    return pa.table({"node": pa.concat_arrays([edges.column("u").combine_chunks(), edges.column("v").combine_chunks()]),
                     "j": pa.concat_arrays([edges.column("j").combine_chunks()] * 2)})


def _near_records(best: pa.Table, roots: pa.Table) -> pa.Table:
    if not roots.num_rows:
        return _records([], [], [], "near")
    # one aggregation for both columns: Arrow's hash group_by may order its groups differently
    # from call to call, so two calls could pair one call's nodes with the other's maxima
    top_table = best.group_by("node").aggregate([("j", "max")])
    top = dict(zip(top_table.column("node").to_pylist(), top_table.column("j_max").to_pylist()))
    nodes, rs = roots.column("node").to_pylist(), roots.column("root").to_pylist()
    return _records(nodes, rs, [top[n] for n in nodes], "near")


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def dedup_blocks(blocks: list, cfg: DedupConfig, parts: int) -> tuple[list, dict]:
    """Dedup of document blocks (refs of tables with columns order, text, ...).

    Returns (refs of removal-record tables {order, removed_id, kept_id, kind, similarity},
    stats {candidate_pairs, verified_pairs}); the caller drops the `order`s listed."""
    import ray

    stats = {"candidate_pairs": 0, "verified_pairs": 0}
    if not (cfg.exact or cfg.minhash) or not blocks:
        return [], stats
    sig_task = sh.remote(signatures)
    sigs = [sig_task.remote(b, cfg) for b in blocks]
    records = []
    if cfg.exact:
        records += sh.reduce(sh.map_split(sigs, _exact_rows, "exact", parts), _exact_reduce,
                             num_returns=1, parts=1)
    if cfg.minhash:
        max_all_pairs = cfg.max_bucket_all_pairs if cfg.verify else 1  # unverified: a star per bucket
        pairs = sh.as_split(sh.reduce(sh.map_split(sigs, _band_rows, "key", parts), _bucket_reduce,
                                      num_returns=parts, parts=parts, max_all_pairs=max_all_pairs,
                                      collapse_exact=cfg.exact))
        if cfg.verify:
            shingles = sh.map_split(sigs, _shingle_rows, "order", parts)
            first = sh.reduce(pairs, _verify_first, side=[shingles], num_returns=parts + 1, parts=parts)
            stats["candidate_pairs"] = int(sum(ray.get([r[parts] for r in first])))
            edges = sh.reduce([r[:parts] for r in first], _verify_second, side=[shingles], threshold=cfg.threshold)
        else:  # every collision is an edge (datatrove's and NeMo Curator's rule)
            edges = sh.reduce(pairs, _unverified_edges)
        stats["verified_pairs"] = int(sum(ray.get([sh.remote(_num_rows).remote(e) for e in edges])))
        if not cfg.verify:
            stats["candidate_pairs"] = stats["verified_pairs"]
        if stats["verified_pairs"]:
            roots = connected_components(edges, parts, cfg.max_component_rounds)
            best = sh.map_split(edges, _best_rows, "node", parts)
            records += sh.reduce(best, _near_records, side=[roots])
    return records, stats


def _num_rows(table: pa.Table) -> int:
    return table.num_rows
