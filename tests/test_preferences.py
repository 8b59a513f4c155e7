"""Preference batches: each validation rule on its own malformed batch (and the store left
byte-for-byte unchanged), quarantine vs fail, re-ingestion, concurrent ingests, the lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from steps.preference_schema import PAIR_SCHEMA, pair_split
from steps.preference_store import PreferenceStore, StoreBusy
from steps.preferences import PreferenceConfig

ROOT = Path(__file__).resolve().parent.parent
FAIL = PreferenceConfig(on_error="fail", max_text_chars=200, eval_fraction=0.25)
QUARANTINE = PreferenceConfig(on_error="quarantine", max_text_chars=200, max_invalid_fraction=0.5,
                              eval_fraction=0.25)


def row(i: int, **over) -> dict:
    r = {"pair_id": f"p{i}", "prompt": f"question {i}?", "chosen": f"a good answer {i}", "rejected": f"a bad one {i}",
         "strength": "better", "axis": "helpfulness", "source": "vendor"}
    r.update(over)
    return {k: v for k, v in r.items() if v is not ...}  # `...` deletes a field


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def batch(tmp: Path, name: str, rows: list, start: int = 0) -> Path:
    """A vendor batch directory: part-0.jsonl with `rows`, plus the _SUCCESS marker vendors write."""
    write_jsonl(tmp / name / "part-0.jsonl", rows)
    (tmp / name / "_SUCCESS").touch()
    return tmp / name


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file of the store except the lock file (whose holder note changes on every ingest)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture
def store(tmp_path) -> PreferenceStore:
    """A store that already holds one accepted batch (pairs p100..p102)."""
    s = PreferenceStore(tmp_path / "store")
    res = s.ingest(str(batch(tmp_path, "first", [row(i) for i in range(100, 103)])), FAIL)
    assert res.status == "ingested" and res.version.startswith("0001-")
    return s


# name -> (rows or a callable writing the batch, the problem expected in the report)
CASES = {
    "missing field": ([row(1), row(2, strength=...)], "bad/part-0.jsonl:2: strength: missing"),
    "wrong type": ([row(1, chosen=7)], "bad/part-0.jsonl:1: chosen: expected a string, got an integer"),
    "unknown enum value": ([row(1), row(2, strength="much_better")],
                           "bad/part-0.jsonl:2: strength: 'much_better' is not one of 'significantly_better', "),
    "unknown axis": ([row(1, axis="honesty")], "bad/part-0.jsonl:1: axis: 'honesty' is not one of"),
    "empty text": ([row(1, rejected="")], "bad/part-0.jsonl:1: rejected: empty or whitespace-only text"),
    "whitespace-only text": ([row(1, chosen=" \n\t ")], "bad/part-0.jsonl:1: chosen: empty or whitespace-only"),
    "empty pair_id": ([row(1, pair_id="  ")], "bad/part-0.jsonl:1: pair_id: empty or whitespace-only text"),
    "chosen equals rejected": ([row(1, chosen="same", rejected="same")], "bad/part-0.jsonl:1: rejected: identical"),
    "missing safety label": ([row(1, axis="safety")], "bad/part-0.jsonl:1: safety_label: required when axis is"),
    "forbidden safety label": ([row(1, safety_label="both_safe")],
                               "bad/part-0.jsonl:1: safety_label: only allowed when axis is 'safety'"),
    "chosen unsafe, rejected safe": ([row(1, axis="safety", safety_label="chosen_unsafe_rejected_safe")],
                                     "bad/part-0.jsonl:1: safety_label: 'chosen_unsafe_rejected_safe' is not allowed"),
    "duplicate pair_id in batch": ([row(1), row(2, pair_id="p1")],
                                   "bad/part-0.jsonl:1: pair_id: 'p1' is used by 2 different rows"),
    "duplicate pair_id of an earlier batch": ([row(1), row(2, pair_id="p101")],
                                              "bad/part-0.jsonl:2: pair_id: 'p101' was already accepted in batch 0001-"),
    "text over the length limit": ([row(1, chosen="x" * 201)],
                                   "bad/part-0.jsonl:1: chosen: 201 characters, over the limit of 200"),
    "prompt turn over the limit": ([row(1, prompt=[{"role": "user", "content": "y" * 300}])],
                                   "bad/part-0.jsonl:1: prompt[0].content: 300 characters, over the limit"),
    "prompt not ending with a user turn": (
        [row(1, prompt=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])],
        "bad/part-0.jsonl:1: prompt[1].role: the last turn must be the user's"),
    "prompt of the wrong type": ([row(1, prompt={"text": "hi"})], "bad/part-0.jsonl:1: prompt: must be a string or"),
    "unknown field": ([row(1, rating=5)], "bad/part-0.jsonl:1: rating: unknown field"),
    "broken JSON line": ([row(1), '{"pair_id": "p2", "prompt": '], "bad/part-0.jsonl:2: -: broken JSON line"),
    "a row that is not an object": ([row(1), "[1, 2]"], "bad/part-0.jsonl:2: -: a row must be an object"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_rule_rejects_its_batch_and_leaves_the_store_unchanged(tmp_path, store, case):
    rows, expected = CASES[case]
    before = snapshot(store.root)
    res = store.ingest(str(batch(tmp_path, "bad", rows)), FAIL)
    assert res.status == "rejected" and res.exit_code == 2
    assert expected in res.report, res.report
    assert snapshot(store.root) == before


def test_invalid_utf8_is_reported_with_its_line(tmp_path, store):
    before = snapshot(store.root)
    path = write_jsonl(tmp_path / "bad" / "part-0.jsonl", [row(1)])
    path.write_bytes(path.read_bytes() + json.dumps(row(2)).encode().replace(b"a good", b"a \xff good") + b"\n")
    res = store.ingest(str(tmp_path / "bad"), FAIL)
    assert res.status == "rejected" and "bad/part-0.jsonl:2: -: invalid UTF-8 at byte" in res.report
    # a JSON escape of a lone surrogate is valid JSON but no valid UTF-8 text either
    write_jsonl(path, [row(1), '{"pair_id": "p2", "prompt": "q", "chosen": "\\ud800", "rejected": "r", '
                               '"strength": "better", "axis": "helpfulness", "source": "v"}'])
    res = store.ingest(str(tmp_path / "bad"), FAIL)
    assert res.status == "rejected" and "bad/part-0.jsonl:2: chosen: invalid UTF-8" in res.report
    # Parquet strings are UTF-8 by definition, but a writer can store raw bytes in a string column
    table = pa.Table.from_pylist([row(1), row(2)])
    raw = pa.array([b"fine", b"a \xff byte"], pa.binary()).view(pa.string())  # no validation on view
    path.unlink()
    pq.write_table(table.set_column(table.schema.get_field_index("rejected"), "rejected", raw),
                   tmp_path / "bad" / "part-0.parquet")
    res = store.ingest(str(tmp_path / "bad"), FAIL)
    assert res.status == "rejected" and "bad/part-0.parquet:2: rejected: invalid UTF-8" in res.report
    assert snapshot(store.root) == before


def test_unreadable_parquet_and_unknown_files_reject_the_batch_even_in_quarantine_mode(tmp_path, store):
    before = snapshot(store.root)
    bad = batch(tmp_path, "bad", [row(1), row(2)])
    (bad / "part-1.parquet").write_bytes(b"PAR1 this is not really parquet")
    res = store.ingest(str(bad), QUARANTINE)
    assert res.status == "rejected" and "bad/part-1.parquet:-: -: unreadable Parquet file" in res.report
    (bad / "part-1.parquet").unlink()
    (bad / "notes.txt").write_text("hello")
    res = store.ingest(str(bad), QUARANTINE)
    assert res.status == "rejected" and "bad/notes.txt:-: -: not a .jsonl(.gz) or .parquet file" in res.report
    assert snapshot(store.root) == before


def test_empty_batches_are_rejected(tmp_path, store):
    before = snapshot(store.root)
    (tmp_path / "nofiles").mkdir()
    (tmp_path / "nofiles" / "_SUCCESS").touch()
    assert "empty batch: no data files" in store.ingest(str(tmp_path / "nofiles"), QUARANTINE).report
    res = store.ingest(str(batch(tmp_path, "norows", [])), QUARANTINE)
    assert res.status == "rejected" and "empty batch: no rows in 1 file(s)" in res.report
    assert snapshot(store.root) == before
    with pytest.raises(FileNotFoundError):
        store.ingest(str(tmp_path / "missing"), QUARANTINE)


def test_quarantine_ingests_valid_rows_and_keeps_the_invalid_ones_with_reasons(tmp_path, store):
    rows = [row(1), row(2, strength="much_better"), row(3), row(4, axis="safety")]
    res = store.ingest(str(batch(tmp_path, "mixed", rows)), QUARANTINE)
    assert (res.status, res.exit_code, res.accepted, res.quarantined) == ("quarantined", 3, 2, 2)
    assert res.version.startswith("0002-")
    pairs = store.pairs([res.version])
    assert sorted(pairs.column("pair_id").to_pylist()) == ["p1", "p3"]
    bad = [json.loads(x) for x in (res.record_dir / "quarantine.jsonl").read_text().splitlines()]
    assert [(b["row"], b["raw"]["pair_id"]) for b in bad] == [(2, "p2"), (4, "p4")]
    assert "strength: 'much_better'" in bad[0]["problems"][0] and "safety_label: required" in bad[1]["problems"][0]
    assert (res.record_dir / "report.txt").read_text().strip() == res.report
    # the same batch under on_error=fail into a fresh store: rejected whole
    other = PreferenceStore(tmp_path / "other")
    assert other.ingest(str(tmp_path / "mixed"), FAIL).status == "rejected" and not other.batches()


def test_a_mostly_broken_batch_is_rejected_even_in_quarantine_mode(tmp_path, store):
    rows = [row(1), row(2, strength="x"), row(3, strength="y")]
    res = store.ingest(str(batch(tmp_path, "broken", rows)), QUARANTINE)  # 2/3 invalid > 0.5
    assert res.status == "rejected" and "over preference.max_invalid_fraction" in res.report
    assert len(store.batches()) == 1


def test_accepted_pairs_follow_the_shared_schema(tmp_path, store):
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    (tmp_path / "pq").mkdir()  # vendors may deliver Parquet too; a column has one type per file
    pq.write_table(pa.Table.from_pylist([row(1, prompt=turns)]), tmp_path / "pq" / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist([row(2, axis="safety", safety_label="both_unsafe", annotator_id="a7",
                                             model_chosen="v1")]), tmp_path / "pq" / "part-1.parquet")
    res = store.ingest(str(tmp_path / "pq"), FAIL)
    assert res.status == "ingested"
    pairs = store.pairs([res.version])
    assert pairs.schema.equals(PAIR_SCHEMA)
    got = {r["pair_id"]: r for r in pairs.to_pylist()}
    assert got["p1"]["prompt"] == turns and got["p1"]["safety_label"] is None
    assert got["p2"]["prompt"] == [{"role": "user", "content": "question 2?"}]  # a string is one user turn
    assert (got["p2"]["safety_label"], got["p2"]["annotator_id"], got["p2"]["model_chosen"]) == ("both_unsafe", "a7", "v1")
    assert all(r["batch"] == res.version and r["split"] == pair_split(r["pair_id"], 0.25) for r in got.values())


def test_reingesting_a_batch_is_a_no_op_that_says_so(tmp_path, store):
    first = store.batches()[0]
    before = snapshot(store.root)
    copy = batch(tmp_path, "elsewhere", [row(i) for i in range(100, 103)])  # same files, another place
    for uri in (str(copy), copy.as_uri()):  # a path, and a URI read through pyarrow.fs (as s3://... would be)
        res = store.ingest(uri, FAIL)
        assert (res.status, res.exit_code, res.version) == ("already", 0, first["version"])
        assert "already ingested as 0001-" in res.report and "nothing to do" in res.report
    assert snapshot(store.root) == before


def test_pair_split_is_fixed_by_the_id_and_near_the_fraction():
    ids = [f"pair-{i}" for i in range(4000)]
    assert [pair_split(i, 0.1) for i in ids] == [pair_split(i, 0.1) for i in ids]
    assert 0.08 < sum(pair_split(i, 0.1) == "eval" for i in ids) / len(ids) < 0.12


def test_an_orphan_of_a_crashed_ingest_is_cleaned_and_never_listed(tmp_path, store):
    orphan = store.root / "batches" / "0002-deadbeef0000"  # renamed into place, index never written
    orphan.mkdir()
    (orphan / "pairs.parquet").write_bytes(b"partial")
    res = store.ingest(str(batch(tmp_path, "next", [row(1)])), FAIL)
    assert res.version.startswith("0002-") and not orphan.exists()
    assert [b["version"] for b in store.batches()] == ["0001-" + store.batches()[0]["digest"][:12], res.version]


# ----------------------------------------------------------------------------- concurrency and the lock
WORKER = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from steps.preference_store import PreferenceStore
from steps.preferences import PreferenceConfig
me, others, store, uri = sys.argv[1], sys.argv[2:-2], sys.argv[-2], sys.argv[-1]
Path(me).touch()
while not all(Path(o).exists() for o in others):  # start together: everyone imported and ready
    time.sleep(0.005)
res = PreferenceStore(Path(store)).ingest(uri, PreferenceConfig(on_error="fail"))
print(json.dumps({{"status": res.status, "version": res.version}}))
"""


def test_concurrent_ingests_in_separate_processes_neither_corrupt_nor_duplicate(tmp_path):
    a = batch(tmp_path, "a", [row(i) for i in range(0, 300)])
    b = batch(tmp_path, "b", [row(i) for i in range(300, 600)])
    root = tmp_path / "store"
    script = WORKER.format(root=str(ROOT))
    uris = [a, b, a]  # two different batches and the first one again, all at the same moment
    ready = [tmp_path / f"ready-{i}" for i in range(len(uris))]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), *map(str, ready), str(root), str(u)],
                              stdout=subprocess.PIPE, text=True) for r, u in zip(ready, uris)]
    results = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    statuses = sorted(r["status"] for r in results)
    assert statuses == ["already", "ingested", "ingested"]
    assert results[0]["version"] == results[2]["version"]  # both of a's ingests name the same version
    store = PreferenceStore(root)
    index = store.batches()
    assert [b["seq"] for b in index] == [1, 2]
    ids = store.pairs([b["version"] for b in index]).column("pair_id").to_pylist()
    assert sorted(ids) == sorted(f"p{i}" for i in range(600))  # every pair exactly once


HOLDER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from steps.preference_store import PreferenceStore
with PreferenceStore(Path(sys.argv[1])).lock(5):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_held_lock_blocks_and_a_crashed_holder_does_not(tmp_path):
    store = PreferenceStore(tmp_path / "store")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT)), str(store.root)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        quick = PreferenceConfig(lock_timeout_s=0.3)
        start = time.monotonic()
        with pytest.raises(StoreBusy, match=f"pid={holder.pid}"):
            store.ingest(str(batch(tmp_path, "x", [row(1)])), quick)
        assert time.monotonic() - start >= 0.3 and not store.batches()
        os.kill(holder.pid, signal.SIGKILL)  # the holder dies without releasing anything
        holder.wait(timeout=10)
        assert (store.root / ".lock").exists()  # the lock file survives its holder...
        assert store.ingest(str(tmp_path / "x"), quick).status == "ingested"  # ...and does not block
    finally:
        if holder.poll() is None:
            holder.kill()
