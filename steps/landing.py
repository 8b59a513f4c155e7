"""`landing_v{i}`: a weekly vendor batch, copied from its landing location into the store.

The weekly run (pipelines/weekly.py) gives iteration i (V6, V7, ...) a batch that a vendor
delivered to a landing location (a directory or any URI pyarrow.fs reads). This step copies
that batch's data files, byte for byte, into `batch/` of its artifact (then `_SUCCESS`, as the
simulated vendor's `annotate_v{i}` writes it), so `prefs_v{i}` reads it exactly as it reads
an annotate artifact, and later weeks re-run the DAG without the landing location: a vendor
may clean it up once the batch is ingested. The artifact's fingerprint is the batch's content
digest (recorded when the weekly run chose the batch); a batch whose content changed since is
refused rather than silently trained on under the old digest.
"""

from __future__ import annotations

from typing import Any

from steps.preference_store import batch_digest, list_batch

VERSION = "1"


def run(ctx: Any, iteration: int, source: str, digest: str) -> dict[str, Any]:
    fs, base, rels, _ = list_batch(source)
    out = ctx.out_dir / "batch"
    total = 0
    for rel in rels:  # the data files only: _SUCCESS and dot files are no part of the digest
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(f"{base}/{rel}", compression=None) as f:
            data = f.read()
        target.write_bytes(data)
        total += len(data)
    got = batch_digest(str(out))
    if got != digest:
        raise ValueError(f"landing_v{iteration}: the batch at {source} changed after the weekly run chose it "
                         f"(sha256 {got[:16]}..., recorded {digest[:16]}...); deliver a changed batch as a new "
                         f"batch (a new subdirectory with its own _SUCCESS)")
    (out / "_SUCCESS").write_text("")  # written last, as a vendor does
    ctx.set_tags({"batch.source": source, "batch.sha256": digest})
    return {"files": len(rels), "bytes": total}
