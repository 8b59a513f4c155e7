"""Deterministic, resumable, streaming micro-batches for every worker.

Memory and time per step do not grow with the corpus: a rank reads only the Parquet row
groups its micro-batches touch (memory-mapped, only the needed columns, a small byte-bounded
cache), and the epoch order is a two-level shuffle that is random-access by position:

    1. the row groups of all files are permuted (seed, epoch);
    2. consecutive permuted row groups form windows of about `window_rows` rows, and the rows
       of each window are permuted (seed, epoch, window).

A corpus smaller than one window is fully shuffled (the tiny preset); a big one is shuffled
across row groups everywhere and across rows within each window, the usual compromise of
streaming loaders (the tokenizer writes small row groups so windows mix many documents).
Optimizer step s of rank r takes micro-batches (m * world + r) of step s's slice of the epoch
order, so the data position is the step counter alone: a resumed run (same seed, same world
size) continues with exactly the next batch. Ray Data's streaming split is not used because
its block-to-worker assignment is dynamic, which would break exact resumption.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DEFAULT_WINDOW_ROWS = 1 << 16
DEFAULT_CACHE_BYTES = 512 << 20


class RowSource:
    def __init__(self, files: list[str], columns: list[str], seed: int, global_batch: int, micro_batch: int,
                 world: int, window_rows: int = DEFAULT_WINDOW_ROWS, cache_bytes: int = DEFAULT_CACHE_BYTES):
        if not files:
            raise ValueError("training data: no Parquet files given")
        self.files, self.columns, self.seed = list(files), columns, seed
        self.global_batch, self.micro_batch, self.world = global_batch, micro_batch, world
        if global_batch % (micro_batch * world):
            raise ValueError(f"global_batch_size {global_batch} is not a multiple of micro_batch_size "
                             f"{micro_batch} x workers {world}")
        self.accum = global_batch // (micro_batch * world)
        self.window_rows, self.cache_bytes = window_rows, cache_bytes
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()  # block -> decoded row group
        self._cached_bytes = 0
        self._layout: tuple[int, list] | None = None  # (epoch, windows) of the epoch in use
        self._perm: tuple[tuple[int, int], np.ndarray] | None = None  # ((epoch, window), row order)

    # ------------------------------------------------------------------ layout (metadata only)
    @cached_property
    def blocks(self) -> list[tuple[int, int, int]]:
        """(file index, row group, rows) of every row group, in file order."""
        out = []
        for i, f in enumerate(self.files):
            meta = pq.ParquetFile(f).metadata
            out += [(i, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        return out

    @cached_property
    def num_rows(self) -> int:
        return sum(n for _, _, n in self.blocks)

    @property
    def steps_per_epoch(self) -> int:
        steps = self.num_rows // self.global_batch
        if steps == 0:
            raise ValueError(f"training data has {self.num_rows} rows, fewer than one global batch "
                             f"({self.global_batch}): lower the batch size or add data")
        return steps

    def _windows(self, epoch: int) -> list[tuple[list[int], np.ndarray]]:
        """The epoch's windows: (permuted block ids, cumulative rows within the window)."""
        if self._layout is None or self._layout[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))
            windows, current, rows = [], [], 0
            for b in order.tolist():
                current.append(b)
                rows += self.blocks[b][2]
                if rows >= self.window_rows:
                    windows.append(current)
                    current, rows = [], 0
            if current:
                windows.append(current)
            self._layout = (epoch, [(w, np.cumsum([self.blocks[b][2] for b in w])) for w in windows])
        return self._layout[1]

    def _window_order(self, epoch: int, w: int, n: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != (epoch, w):
            self._perm = ((epoch, w), np.random.default_rng([self.seed, epoch, w]).permutation(n))
        return self._perm[1]

    def _locate(self, epoch: int, positions: np.ndarray) -> list[tuple[int, int]]:
        """Epoch positions -> (block, row within the block)."""
        windows = self._windows(epoch)
        starts = np.cumsum([0] + [int(c[-1]) for _, c in windows])
        out = []
        for p in positions.tolist():
            w = bisect.bisect_right(starts, p) - 1
            blocks, cum = windows[w]
            r = int(self._window_order(epoch, w, int(cum[-1]))[p - starts[w]])
            k = int(np.searchsorted(cum, r, side="right"))
            out.append((blocks[k], r - (int(cum[k - 1]) if k else 0)))
        return out

    # ------------------------------------------------------------------ reading
    def _block(self, b: int) -> pa.Table:
        if b in self._cache:
            self._cache.move_to_end(b)
            return self._cache[b]
        f, g, _ = self.blocks[b]
        table = pq.ParquetFile(self.files[f], memory_map=True).read_row_group(g, columns=self.columns)
        self._cache[b] = table
        self._cached_bytes += table.nbytes
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.nbytes
        return table

    def _rows(self, locations: list[tuple[int, int]]) -> dict:
        """The rows at (block, row) locations, in that order, as numpy columns."""
        parts = [self._block(b).slice(r, 1) for b, r in locations]
        table = pa.concat_tables(parts)
        return {c: table.column(c).to_numpy(zero_copy_only=False) for c in self.columns}

    def micro_batch_positions(self, step: int, rank: int, micro: int) -> tuple[int, np.ndarray]:
        """(epoch, positions in the epoch order) of micro-batch `micro` of rank `rank` at `step`."""
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch + (micro * self.world + rank) * self.micro_batch
        return epoch, np.arange(start, start + self.micro_batch)

    def micro_batch_rows(self, step: int, rank: int, micro: int) -> np.ndarray:
        """Global row ids (file order) of a micro-batch: what tests compare across runs."""
        epoch, positions = self.micro_batch_positions(step, rank, micro)
        offsets = np.cumsum([0] + [n for _, _, n in self.blocks])
        return np.array([offsets[b] + r for b, r in self._locate(epoch, positions)])

    def micro_batches(self, step: int, rank: int) -> list[dict]:
        """The `accum` micro-batches (as numpy columns) rank `rank` trains on at `step`."""
        out = []
        for m in range(self.accum):
            epoch, positions = self.micro_batch_positions(step, rank, m)
            out.append(self._rows(self._locate(epoch, positions)))
        return out

    def eval_batches(self, rank: int, max_rows: int | None = None):
        """This rank's share of the first `max_rows` rows in file order, micro-batch by
        micro-batch, as (rows, real): every rank yields the SAME number of micro-batches (under
        ZeRO-3 each forward gathers parameters collectively, so a rank with one batch more
        would wait forever); a rank short of rows repeats a row with real=False, which the
        engine weighs zero."""
        n = self.num_rows if max_rows is None else min(self.num_rows, max_rows)
        per_rank = -(-n // self.world)  # ceil
        batches = -(-per_rank // self.micro_batch)
        offsets = np.cumsum([0] + [nb for _, _, nb in self.blocks])
        mine = np.arange(rank, n, self.world)
        for s in range(batches):
            ids = mine[s * self.micro_batch:(s + 1) * self.micro_batch]
            real = len(ids) > 0
            if not real:
                ids = np.array([0])
            blocks = np.searchsorted(offsets, ids, side="right") - 1
            yield self._rows([(int(b), int(i - offsets[b])) for b, i in zip(blocks, ids)]), real
