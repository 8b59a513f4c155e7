"""Watching a landing location for weekly preference batches (`weekly.py --watch URI`).

The landing contract: one batch is one subdirectory (or object-store prefix) of the landing
location, `<URI>/<name>/`, holding JSONL/Parquet files of the batch contract; the vendor writes
`<name>/_SUCCESS` last, once every file is complete. Names sort in delivery order (e.g. the ISO
week, `2026-W49`); names starting with `_` or `.` are ignored.

Each check, under the weekly lock of the storage root, takes the first complete batch (in
name order) that has not run and starts one weekly run on it; the others wait for the next
check. Decisions are kept in `<storage root>/weekly/state.json`, keyed by the batch's content
digest (steps/preference_store.batch_digest), so
- a batch without `_SUCCESS` is left alone (reported as waiting);
- the same content never runs twice, under any name and whoever started it (a manual
  `weekly.py --batch` run records its outcome in the same file);
- a rejected batch is reported and skipped until its content (hence its digest) changes;
- a run that failed (exit 1) is tried again at the next check: its finished steps are cached;
- a batch that lands while a run holds the lock waits: that check reports "busy" and the next
  one picks it up.
The lock is an flock on `<storage root>/weekly/.lock`: one run at a time for the whole storage
root, and the kernel releases it when its holder dies, so a crashed watcher never blocks
the next one (the file names the last holder for diagnostics).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from steps.preference_store import batch_digest, held_flock

SUCCESS = "_SUCCESS"
# exit status of one check (`--once`); 0, 3, 2 and 1 mean what they mean for `weekly.py --batch`
EXIT_OK, EXIT_FAILED, EXIT_REJECTED, EXIT_QUARANTINED, EXIT_BUSY = 0, 1, 2, 3, 4


class Busy(RuntimeError):
    """Another weekly run (a watcher or `weekly.py --batch`) holds the storage root's lock."""


# ----------------------------------------------------------------------------- the state
class WeeklyState:
    """`<root>/weekly/`: the lock, and state.json with
    iterations: the weekly iterations in order, each with its batch and the model it starts from
    batches:    digest -> the last outcome for that content (done | rejected | failed | running)
    listings:   batch name -> (a key of its file names, sizes and mtimes, its digest): a batch
                whose files did not change is not hashed again at every check."""

    def __init__(self, root: str | os.PathLike):
        self.dir = Path(root) / "weekly"

    def read(self) -> dict[str, Any]:
        path = self.dir / "state.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        return {"iterations": [], "batches": {}, "listings": {}, **data}

    def write(self, data: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".state.json.{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, self.dir / "state.json")  # atomic: a crash leaves the old or the new state

    def record(self, digest: str, **fields: Any) -> None:
        data = self.read()
        rec = data["batches"].setdefault(digest, {"attempts": 0})
        if fields.get("status") == "running":
            rec["attempts"] = rec.get("attempts", 0) + 1
        rec.update(fields, at=_now())
        self.write(data)

    def report_path(self, digest: str) -> Path:
        return self.dir / "reports" / f"{digest[:16]}.txt"

    @contextmanager
    def lock(self, wait_s: float = 0.0) -> Iterator[None]:
        """Hold the storage root's weekly lock; Busy if another holder keeps it past `wait_s`."""
        lock = self.dir / ".lock"
        with held_flock(lock, wait_s, lambda holder: Busy(f"another weekly run holds {lock} ({holder})"),
                        poll_s=0.2):
            yield


# ----------------------------------------------------------------------------- the landing location
@dataclass(frozen=True)
class Landed:
    name: str
    uri: str
    complete: bool  # the vendor's _SUCCESS marker is there
    listing: str  # a key of the files' names, sizes and mtimes

    def key(self, digest: str) -> str:
        """What `--only` selects and what a per-batch submission id is derived from."""
        return f"{self.name}@{digest[:16]}"


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri and not uri.startswith("file://"):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(os.path.expanduser(uri.removeprefix("file://"))).resolve())


def scan(landing: str) -> list[Landed]:
    """The batches under the landing location, in name order."""
    fs, base = _fs(landing)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"landing location not found: {landing}")
    scheme = landing.split("://", 1)[0] + "://" if "://" in landing and not landing.startswith("file://") else ""
    out = []
    for info in sorted(fs.get_file_info(pafs.FileSelector(base)), key=lambda i: i.base_name):
        if info.type != pafs.FileType.Directory or info.base_name.startswith(("_", ".")):
            continue
        files = fs.get_file_info(pafs.FileSelector(info.path, recursive=True))
        names = {f.path[len(info.path):].lstrip("/") for f in files if f.type == pafs.FileType.File}
        listing = hashlib.sha256(json.dumps(sorted(
            (f.path, f.size, f.mtime_ns) for f in files if f.type == pafs.FileType.File)).encode()).hexdigest()
        out.append(Landed(info.base_name, scheme + info.path, SUCCESS in names, listing))
    return out


def digest_of(batch: Landed, data: dict[str, Any]) -> str:
    """The batch's content digest, reusing the last one while its listing is unchanged."""
    known = data["listings"].get(batch.uri)
    if known and known["listing"] == batch.listing:
        return known["digest"]
    digest = batch_digest(batch.uri)
    data["listings"][batch.uri] = {"listing": batch.listing, "digest": digest}
    return digest


def pending(landing: str, state: WeeklyState, save: bool = False) -> list[tuple[Landed, str, str]]:
    """(batch, digest, why) of each complete batch that has not run, in order, and a line for
    each batch that is left alone (why: `new`, `failed before`, `waiting ...`, `rejected ...`).
    `save` keeps the digests for the next check: only under the lock, since writing the state
    file unlocked could undo an outcome a running check records meanwhile."""
    data = state.read()
    out = []
    for b in scan(landing):
        if not b.complete:
            out.append((b, "", f"waiting for {SUCCESS}"))
            continue
        digest = digest_of(b, data)
        rec = data["batches"].get(digest)
        status = rec["status"] if rec else "new"
        if status == "done":
            continue
        if status == "rejected":
            out.append((b, digest, f"rejected before ({state.report_path(digest)}): not retried until it changes"))
            continue
        out.append((b, digest, {"new": "new", "failed": "failed before", "running": "interrupted before"}[status]))
    if save:
        state.write({**state.read(), "listings": data["listings"]})
    return out


# ----------------------------------------------------------------------------- one check
@dataclass(frozen=True)
class CheckResult:
    exit_code: int
    message: str
    batch: str | None = None


def check_once(landing: str, state: WeeklyState, start: Callable[[str, str], int], only: str | None = None,
               say: Callable[[str], None] = print) -> CheckResult:
    """One check: run the first complete batch that has not run (or only the one `only` names,
    `<name>@<digest16>`) with `start(uri, name) -> exit code` under the lock, and record the
    outcome. A run's exit code is the check's; nothing to do is 0, a held lock EXIT_BUSY."""
    try:
        with state.lock():
            todo = pending(landing, state, save=True)
            for b, digest, why in todo:
                if only is not None and (not digest or b.key(digest) != only):
                    continue
                if not digest or why.startswith("rejected"):
                    say(f"{b.name}: {why}")
                    continue
                say(f"{b.name}: {why} batch, sha256 {digest[:16]}: starting the weekly run")
                state.record(digest, name=b.name, source=b.uri, status="running")
                try:
                    rc = start(b.uri, b.name)
                except BaseException:
                    state.record(digest, status="failed", exit_code=EXIT_FAILED)
                    raise
                status = {EXIT_OK: "done", EXIT_QUARANTINED: "done", EXIT_REJECTED: "rejected"}.get(rc, "failed")
                state.record(digest, status=status, exit_code=rc)
                return CheckResult(rc, f"{b.name}: {status} (exit {rc})", b.name)
            return CheckResult(EXIT_OK, "no new complete batch" + (f" matching {only}" if only else ""))
    except Busy as e:
        return CheckResult(EXIT_BUSY, f"busy: {e}; a new batch waits for the next check")


def watch(landing: str, state: WeeklyState, start: Callable[[str, str], int], interval_s: float,
          say: Callable[[str], None] = print) -> None:
    """Check every `interval_s` seconds, forever; right after a run that ended (done or
    rejected), check again at once: a batch that landed meanwhile is next. A failed run is
    retried after the interval, not in a tight loop."""
    while True:
        result = check_once(landing, state, start, say=say)
        say(result.message)
        if result.batch is None or result.exit_code == EXIT_FAILED:
            time.sleep(interval_s)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
