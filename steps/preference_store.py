"""Reading, validating and ingesting preference batches: the append-only store.

    <run.output_dir>/<preference.store>/
        .lock                       held (flock) by the one ingest that may change the store
        index.json                  the accepted batches, in order: the store's commit point
        batches/<version>/          one accepted batch, version "<seq:04d>-<sha256[:12]>"
            pairs.parquet           its accepted pairs (PAIR_SCHEMA)
            quarantine.jsonl        rows not ingested, each with its problems (quarantine mode)
            report.txt, record.json the ingest report and the batch's index entry

An ingest reads and validates the whole batch before it writes anything. Under the lock it
then re-reads the index, answers "already ingested" for a known digest, checks pair ids
against every accepted batch, writes the batch directory under a temporary name, renames it
into place and finally replaces index.json (atomic rename). A crash at any point leaves the
index as it was; a directory it does not list is an orphan of a crashed ingest and is removed
by the next one. The lock is an flock on .lock, which the kernel drops when its holder dies,
so a crashed holder never blocks the store; the file names the last holder for diagnostics.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from steps.preference_adapters import AdapterError, adapt
from steps.preference_schema import PAIR_SCHEMA, BatchRow, Problem, check_row, pair_split

if TYPE_CHECKING:
    from steps.preferences import PreferenceConfig

IGNORED_PREFIXES = ("_", ".")  # _SUCCESS, _metadata, .crc files and the like are not data
EXIT_OK, EXIT_REJECTED, EXIT_QUARANTINED = 0, 2, 3


class StoreBusy(RuntimeError):
    """The store's lock stayed held past preference.lock_timeout_s."""


# ----------------------------------------------------------------------------- reading a batch
@contextmanager
def held_flock(path: Path, wait_s: float, busy: Callable[[str], Exception], poll_s: float = 0.05) -> Iterator[None]:
    """An exclusive flock on `path`, waiting up to `wait_s` seconds. The OS releases it when its
    holder's descriptor closes, also when the holder crashes, so a dead holder never blocks the
    next one. The holder writes who it is into the file; `busy(holder)` is raised when another
    holder keeps it past `wait_s`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                    raise busy(holder or "unknown holder") from None
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()} since={_now()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


@dataclass
class CheckedBatch:
    """A batch read and validated, nothing written yet."""

    uri: str
    digest: str  # sha256 over the data files' relative names and bytes
    files: dict[str, int] = field(default_factory=dict)  # shown path -> rows read
    valid: list[tuple[str, int, BatchRow]] = field(default_factory=list)
    invalid: list[dict[str, Any]] = field(default_factory=list)  # {file, row, problems, raw}
    file_problems: list[Problem] = field(default_factory=list)  # a file (or the batch) unusable as a whole

    @property
    def rows(self) -> int:
        return len(self.valid) + len(self.invalid)

    def problems(self) -> list[str]:
        return [str(p) for p in self.file_problems] + [p for bad in self.invalid for p in bad["problems"]]

    def drop(self, problems: dict[tuple[str, int], Problem]) -> None:
        """Move valid rows to the invalid ones (a check across rows failed for them), in one pass."""
        keep = []
        for f, r, parsed in self.valid:
            problem = problems.get((f, r))
            if problem is None:
                keep.append((f, r, parsed))
            else:
                self.invalid.append({"file": f, "row": r, "problems": [str(problem)],
                                     "raw": parsed.model_dump(mode="json", exclude_none=True)})
        self.valid = keep


def _open(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:  # s3://, gs://, hdfs://, abfs://, file://: whatever pyarrow.fs resolves
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(os.path.expanduser(uri.removeprefix("file://"))).resolve())


def list_batch(uri: str) -> tuple[pafs.FileSystem, str, list[str], str]:
    """(filesystem, base, the batch's data files relative to base, sorted, the prefix problems show);
    a single file is a batch of one."""
    fs, base = _open(uri)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"preference batch not found: {uri}")
    if info.type == pafs.FileType.File:
        return fs, base.rsplit("/", 1)[0], [info.base_name], ""
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    rels = [i.path[len(base):].lstrip("/") for i in infos if i.type == pafs.FileType.File]
    rels = sorted(r for r in rels if not any(p.startswith(IGNORED_PREFIXES) for p in r.split("/")))
    return fs, base, rels, base.rstrip("/").rsplit("/", 1)[-1] + "/"


def _files(uri: str, digest: Any) -> Iterator[tuple[str, str, bytes]]:
    """(relative path, path as problems show it, bytes) of each data file; feeds `digest` the
    relative names and bytes, so the digest is the same wherever the batch lies."""
    fs, base, rels, label = list_batch(uri)
    for rel in rels:
        with fs.open_input_stream(f"{base}/{rel}", compression=None) as f:  # raw bytes: no guessing by suffix
            data = f.read()
        digest.update(f"{rel}\0{len(data)}\0".encode())
        digest.update(data)
        yield rel, label + rel, data


def batch_digest(uri: str) -> str:
    """The batch's content digest, as read_batch computes it, without validating anything."""
    digest = hashlib.sha256()
    for _ in _files(uri, digest):
        pass
    return digest.hexdigest()


def read_batch(uri: str, fmt: str, max_text_chars: int) -> CheckedBatch:
    """Read every file of the batch and validate every row (no store access)."""
    digest = hashlib.sha256()
    checked = CheckedBatch(uri, "")
    for rel, shown, data in _files(uri, digest):
        checked.files[shown] = 0
        for row, value in _decode(shown, rel, data, fmt, checked):
            checked.files[shown] += 1
            if isinstance(value, Problem):
                checked.invalid.append({"file": shown, "row": row, "problems": [str(value)], "raw": None})
                continue
            try:
                obj = adapt(fmt, value, rel)
            except AdapterError as e:
                checked.invalid.append({"file": shown, "row": row, "raw": value,
                                        "problems": [str(Problem(shown, row, e.field, str(e)))]})
                continue
            parsed, problems = check_row(obj, shown, row, max_text_chars)
            if parsed is None:
                checked.invalid.append({"file": shown, "row": row, "problems": [str(p) for p in problems],
                                        "raw": obj})
            else:
                checked.valid.append((shown, row, parsed))
    checked.digest = digest.hexdigest()
    if not checked.files:
        checked.file_problems.append(Problem(uri, None, "-", "empty batch: no data files"))
    elif checked.rows == 0 and not checked.file_problems:
        checked.file_problems.append(Problem(uri, None, "-", f"empty batch: no rows in {len(checked.files)} file(s)"))
    _check_duplicates(checked)
    return checked


def _decode(shown: str, rel: str, data: bytes, fmt: str, checked: CheckedBatch) -> Iterator[tuple[int, Any]]:
    """(row number, decoded object or Problem) for each row of one file."""
    name = rel.lower()
    if name.endswith(".gz"):  # HH-RLHF ships train.jsonl.gz
        try:
            data, name = gzip.decompress(data), name.removesuffix(".gz")
        except (OSError, EOFError) as e:
            checked.file_problems.append(Problem(shown, None, "-", f"unreadable gzip file: {e}"))
            return
    if name.endswith(".jsonl"):
        yield from _jsonl_rows(shown, data)
    elif name.endswith(".parquet"):
        yield from _parquet_rows(shown, data, checked)
    elif name.endswith(".json") and fmt != "contract":  # public datasets often ship one JSON array
        try:
            items = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            checked.file_problems.append(Problem(shown, None, "-", f"unreadable JSON file: {e}"))
            return
        if not isinstance(items, list):
            checked.file_problems.append(Problem(shown, None, "-", "a .json file must hold a list of rows"))
            return
        yield from enumerate(items, start=1)
    else:
        checked.file_problems.append(Problem(
            shown, None, "-", "not a .jsonl(.gz) or .parquet file (names starting with '_' or '.' are ignored)"))


def _jsonl_rows(shown: str, data: bytes) -> Iterator[tuple[int, Any]]:
    for n, line in enumerate(data.split(b"\n"), start=1):
        if n == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark some editors write
        if not line.strip():
            continue  # blank lines (and the final newline) carry no row
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield n, Problem(shown, n, "-", f"invalid UTF-8 at byte {e.start} of the line")
            continue
        try:
            yield n, json.loads(text)
        except json.JSONDecodeError as e:
            yield n, Problem(shown, n, "-", f"broken JSON line: {e.msg} at column {e.colno}")


def _parquet_rows(shown: str, data: bytes, checked: CheckedBatch) -> Iterator[tuple[int, Any]]:
    try:
        table = pq.read_table(pa.BufferReader(data))
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError, ...) for a bad file
        checked.file_problems.append(Problem(shown, None, "-", f"unreadable Parquet file: {e}"))
        return
    try:
        yield from enumerate(table.to_pylist(), start=1)
    except UnicodeDecodeError:  # locate the rows with invalid UTF-8 strings one by one
        for i in range(table.num_rows):
            one = table.slice(i, 1)
            try:
                yield i + 1, one.to_pylist()[0]
            except UnicodeDecodeError as e:
                bad = [c for c in one.column_names if not _decodes(one.column(c))]
                yield i + 1, Problem(shown, i + 1, ",".join(bad) or "-", f"invalid UTF-8 ({e.reason})")


def _decodes(column: pa.ChunkedArray) -> bool:
    try:
        column.to_pylist()
        return True
    except UnicodeDecodeError:
        return False


def _check_duplicates(checked: CheckedBatch) -> None:
    """A pair_id used twice within the batch. Exact copies of a row (real public data has them)
    keep their first copy; rows that share an id but differ cannot be told apart, so none is
    trusted and all are invalid."""
    seen: dict[str, list[tuple[str, int, BatchRow]]] = defaultdict(list)
    for f, r, parsed in checked.valid:
        seen[parsed.pair_id].append((f, r, parsed))
    problems = {}
    for pair_id, rows in seen.items():
        if len(rows) == 1:
            continue
        places = ", ".join(f"{f}:{r}" for f, r, _ in rows)
        (f0, r0, first), rest = rows[0], rows[1:]
        if all(parsed == first for _, _, parsed in rest):
            for f, r, _ in rest:
                problems[f, r] = Problem(f, r, "pair_id",
                                         f"{pair_id!r}: an exact copy of {f0}:{r0} (that one is kept)")
        else:
            for f, r, _ in rows:
                problems[f, r] = Problem(f, r, "pair_id",
                                         f"{pair_id!r} is used by {len(rows)} different rows ({places})")
    checked.drop(problems)


# ----------------------------------------------------------------------------- the store
@dataclass
class IngestResult:
    status: str  # "ingested" | "quarantined" (some rows) | "already" (no-op) | "rejected"
    version: str | None
    digest: str
    accepted: int
    quarantined: int
    report: str
    record_dir: Path | None = None

    @property
    def exit_code(self) -> int:
        return {"ingested": EXIT_OK, "already": EXIT_OK, "quarantined": EXIT_QUARANTINED}.get(self.status,
                                                                                            EXIT_REJECTED)


def store_root(output_dir: str, store: str) -> Path:
    if "://" in output_dir and not output_dir.startswith("file://"):
        raise ValueError(f"storage root {output_dir!r}: mount object stores on a shared path and point "
                         "run.output_dir at the mount (the store needs a file lock)")
    return Path(os.path.expanduser(output_dir.removeprefix("file://"))).resolve() / store


class PreferenceStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    # -- reading
    def batches(self) -> list[dict[str, Any]]:
        path = self.root / "index.json"
        return json.loads(path.read_text())["batches"] if path.exists() else []

    def find(self, digest: str) -> dict[str, Any] | None:
        return next((b for b in self.batches() if b["digest"] == digest), None)

    def batch_dir(self, version: str) -> Path:
        return self.root / "batches" / version

    def pairs(self, versions: list[str]) -> pa.Table:
        tables = [pq.read_table(self.batch_dir(v) / "pairs.parquet", schema=PAIR_SCHEMA) for v in versions]
        return pa.concat_tables(tables) if tables else PAIR_SCHEMA.empty_table()

    @contextmanager
    def lock(self, timeout_s: float) -> Iterator[None]:
        with held_flock(self.root / ".lock", timeout_s, lambda holder: StoreBusy(
                f"preference store {self.root} is locked by another ingest ({holder}) for over {timeout_s:.0f}s")):
            yield

    # -- writing
    def ingest(self, uri: str, cfg: PreferenceConfig, fmt: str = "contract") -> IngestResult:
        """Validate and ingest one batch (see the module docstring for the guarantees)."""
        known = self.find(batch_digest(uri))  # hashing is cheap; validating a known batch again is not
        if known is not None:
            return self._already(uri, known)
        checked = read_batch(uri, fmt, cfg.max_text_chars)  # the slow part, outside the lock
        with self.lock(cfg.lock_timeout_s):
            index = self.batches()
            self._remove_orphans(index)
            known = next((b for b in index if b["digest"] == checked.digest), None)
            if known is not None:  # another ingest took the same batch meanwhile
                return self._already(uri, known)
            self._check_against_store(checked, index)
            verdict = _verdict(checked, cfg)
            if verdict:
                return IngestResult("rejected", None, checked.digest, 0, checked.rows,
                                    _report(checked, f"REJECTED ({verdict}); the store is unchanged"))
            return self._write(checked, cfg, fmt, index)

    def _already(self, uri: str, known: dict[str, Any]) -> IngestResult:
        report = "\n".join([
            f"batch:   {uri}", f"sha256:  {known['digest']}",
            f"rows:    {known['rows']} in {len(known['files'])} file(s), {known['accepted']} accepted, "
            f"{known['quarantined']} quarantined",
            f"result:  already ingested as {known['version']} on {known['ingested_at']}: nothing to do "
            f"(its report: {self.batch_dir(known['version']) / 'report.txt'})"])
        return IngestResult("already", known["version"], known["digest"], 0, 0, report)

    def _check_against_store(self, checked: CheckedBatch, index: list[dict[str, Any]]) -> None:
        earlier: dict[str, str] = {}
        for b in index:
            ids = pq.read_table(self.batch_dir(b["version"]) / "pairs.parquet", columns=["pair_id"])
            earlier.update(dict.fromkeys(ids.column("pair_id").to_pylist(), b["version"]))
        checked.drop({(f, r): Problem(f, r, "pair_id", f"{parsed.pair_id!r} was already accepted in batch "
                                      f"{earlier[parsed.pair_id]} (pair ids are unique forever)")
                      for f, r, parsed in checked.valid if parsed.pair_id in earlier})

    def _write(self, checked: CheckedBatch, cfg: PreferenceConfig, fmt: str,
               index: list[dict[str, Any]]) -> IngestResult:
        seq = len(index) + 1
        version = f"{seq:04d}-{checked.digest[:12]}"
        records = [{**parsed.model_dump(exclude={"prompt"}), "prompt": parsed.turns(), "batch": version,
                    "split": pair_split(parsed.pair_id, cfg.eval_fraction)} for _, _, parsed in checked.valid]
        status = "quarantined" if checked.invalid else "ingested"
        final = self.batch_dir(version)
        entry = {"version": version, "seq": seq, "digest": checked.digest, "source_uri": checked.uri,
                 "format": fmt, "rows": checked.rows, "accepted": len(records),
                 "quarantined": len(checked.invalid), "files": checked.files, "ingested_at": _now(),
                 "eval_fraction": cfg.eval_fraction, "path": f"batches/{version}"}  # relative to the store
        tail = f" -> {final / 'quarantine.jsonl'}" if checked.invalid else ""
        report = _report(checked, f"ingested as {version}: {len(records)} pairs, {len(checked.invalid)} "
                                  f"quarantined{tail}")
        tmp = self.root / "batches" / f".tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(records, schema=PAIR_SCHEMA), tmp / "pairs.parquet")
        if checked.invalid:
            with open(tmp / "quarantine.jsonl", "w", encoding="utf-8") as f:
                for bad in checked.invalid:
                    f.write(json.dumps(bad, ensure_ascii=False, default=str) + "\n")
        (tmp / "report.txt").write_text(report + "\n", encoding="utf-8")
        (tmp / "record.json").write_text(json.dumps(entry, indent=2), encoding="utf-8")
        os.rename(tmp, final)
        _atomic_write(self.root / "index.json", json.dumps({"batches": [*index, entry]}, indent=2))
        return IngestResult(status, version, checked.digest, len(records), len(checked.invalid), report,
                            final)

    def _remove_orphans(self, index: list[dict[str, Any]]) -> None:
        listed = {b["version"] for b in index}
        batches = self.root / "batches"
        for p in batches.iterdir() if batches.exists() else []:
            if p.name not in listed:  # written by an ingest that crashed before its index commit
                shutil.rmtree(p, ignore_errors=True)


def _verdict(checked: CheckedBatch, cfg: PreferenceConfig) -> str | None:
    """Why the batch as a whole is rejected, or None when its valid rows may go in."""
    if checked.file_problems:
        empty = any(p.message.startswith("empty batch") for p in checked.file_problems)
        return "empty batch" if empty else "a file of the batch is unusable as a whole"
    if not checked.valid:
        return f"none of its {checked.rows} rows is valid"
    if checked.invalid and cfg.on_error == "fail":
        return f"{len(checked.invalid)} of {checked.rows} rows invalid and preference.on_error is 'fail'"
    share = len(checked.invalid) / checked.rows
    if share > cfg.max_invalid_fraction:
        return (f"{len(checked.invalid)} of {checked.rows} rows invalid, over "
                f"preference.max_invalid_fraction = {cfg.max_invalid_fraction}")
    return None


def _report(checked: CheckedBatch, outcome: str) -> str:
    problems = checked.problems()
    lines = [f"batch:   {checked.uri}", f"sha256:  {checked.digest}",
             f"rows:    {checked.rows} in {len(checked.files)} file(s), {len(checked.valid)} valid",
             f"result:  {outcome}"]
    if problems:
        lines.append(f"problems ({len(problems)}):")
        lines += [f"  {p}" for p in problems]
    return "\n".join(lines)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
