"""Deterministic, resumable micro-batches for every worker.

The global order of rows in an epoch is a seeded permutation; optimizer step s of rank r
takes micro-batches (m * world + r) of that step's slice of the permutation. The data
position is therefore the step counter alone: a resumed run (same seed, same world size)
continues with exactly the next batch, with no state beyond the step to save. Rows are
read from Parquet with memory mapping (only the needed columns; the OS pages in what is
used), which scales to corpora larger than RAM. Ray Data's streaming split is not used here
because its block-to-worker assignment is dynamic, which would break exact resumption.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


class RowSource:
    def __init__(self, files: list[str], columns: list[str], seed: int, global_batch: int, micro_batch: int,
                 world: int):
        if not files:
            raise ValueError("training data: no Parquet files given")
        self.files, self.columns, self.seed = files, columns, seed
        self.global_batch, self.micro_batch, self.world = global_batch, micro_batch, world
        if global_batch % (micro_batch * world):
            raise ValueError(f"global_batch_size {global_batch} is not a multiple of micro_batch_size "
                             f"{micro_batch} x workers {world}")
        self.accum = global_batch // (micro_batch * world)

    @cached_property
    def table(self) -> pa.Table:
        return pa.concat_tables([pq.read_table(f, columns=self.columns, memory_map=True) for f in self.files])

    @property
    def num_rows(self) -> int:
        return sum(pq.ParquetFile(f).metadata.num_rows for f in self.files)

    @property
    def steps_per_epoch(self) -> int:
        steps = self.num_rows // self.global_batch
        if steps == 0:
            raise ValueError(f"training data has {self.num_rows} rows, fewer than one global batch "
                             f"({self.global_batch}): lower the batch size or add data")
        return steps

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def micro_batch_rows(self, step: int, rank: int, micro: int) -> np.ndarray:
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch + (micro * self.world + rank) * self.micro_batch
        return self._order(epoch)[start:start + self.micro_batch]

    def micro_batches(self, step: int, rank: int) -> list[dict]:
        """The `accum` micro-batches (as numpy columns) rank `rank` trains on at `step`."""
        out = []
        for m in range(self.accum):
            rows = self.table.take(self.micro_batch_rows(step, rank, m))
            out.append({c: rows.column(c).to_numpy(zero_copy_only=False) for c in self.columns})
        return out

    def eval_batches(self, rank: int, max_rows: int | None = None):
        """This rank's share of the rows in file order, micro-batch by micro-batch."""
        n = self.num_rows if max_rows is None else min(self.num_rows, max_rows)
        idx = np.arange(rank, n, self.world)
        for s in range(0, len(idx), self.micro_batch):
            rows = self.table.take(idx[s:s + self.micro_batch])
            yield {c: rows.column(c).to_numpy(zero_copy_only=False) for c in self.columns}
