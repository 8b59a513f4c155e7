"""The landing-location watcher's decisions (pipelines/watch.py): which batch a check starts,
and that none starts twice. The unit under test is the decision logic with its real lock and
state file; only the callable that would start the weekly run is a recording double (the real
weekly run is tested end to end in tests/test_weekly.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipelines.watch import EXIT_BUSY, EXIT_OK, EXIT_REJECTED, WeeklyState, check_once, pending

ROOT = Path(__file__).resolve().parent.parent


def land(landing: Path, name: str, text: str = "a", complete: bool = True) -> Path:
    """A vendor's delivery: data files first, `_SUCCESS` last."""
    d = landing / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "part-0.jsonl").write_text(json.dumps({"pair_id": f"{name}-{text}"}) + "\n")
    if complete:
        (d / "_SUCCESS").write_text("")
    return d


class Starter:
    """Records what it was asked to start and answers with the given exit codes."""

    def __init__(self, *codes: int, during=None):
        self.codes, self.calls, self.during = list(codes), [], during

    def __call__(self, uri: str, name: str) -> int:
        self.calls.append(name)
        if self.during:
            self.during()
        return self.codes.pop(0) if self.codes else EXIT_OK


def test_only_a_complete_batch_starts_and_only_once(tmp_path):
    landing, state = tmp_path / "landing", WeeklyState(tmp_path / "out")
    land(landing, "2026-W48", complete=False)  # the vendor is still writing it
    land(landing, "2026-W49")
    start, said = Starter(), []
    r = check_once(str(landing), state, start, say=said.append)
    assert start.calls == ["2026-W49"] and r.exit_code == EXIT_OK and r.batch == "2026-W49"
    assert any("2026-W48: waiting for _SUCCESS" in s for s in said)
    assert check_once(str(landing), state, start).batch is None  # done: never again
    land(landing, "2026-W50")  # its own content (the pair ids carry the name)
    (landing / "2026-W48" / "_SUCCESS").write_text("")  # the earlier one completes: first in name order
    assert check_once(str(landing), state, start).batch == "2026-W48"
    assert check_once(str(landing), state, start).batch == "2026-W50"
    assert start.calls == ["2026-W49", "2026-W48", "2026-W50"]
    # the same content delivered again under another name is the same batch
    (landing / "copy").mkdir()
    for f in (landing / "2026-W49").iterdir():
        (landing / "copy" / f.name).write_bytes(f.read_bytes())
    assert check_once(str(landing), state, start).batch is None and len(start.calls) == 3
    rec = state.read()["batches"]
    assert sorted(r["status"] for r in rec.values()) == ["done"] * 3


def test_a_rejected_batch_is_reported_and_not_retried_until_it_changes(tmp_path):
    landing, state = tmp_path / "landing", WeeklyState(tmp_path / "out")
    d = land(landing, "2026-W49", text="broken")
    start = Starter(EXIT_REJECTED, EXIT_OK)
    assert check_once(str(landing), state, start).exit_code == EXIT_REJECTED
    said = []
    assert check_once(str(landing), state, start, say=said.append).exit_code == EXIT_OK
    assert start.calls == ["2026-W49"] and any("rejected before" in s and "not retried" in s for s in said)
    (d / "part-0.jsonl").write_text(json.dumps({"pair_id": "fixed"}) + "\n")  # the vendor fixes it in place
    assert check_once(str(landing), state, start).batch == "2026-W49"
    assert start.calls == ["2026-W49", "2026-W49"]


def test_a_failed_run_is_retried_at_the_next_check(tmp_path):
    landing, state = tmp_path / "landing", WeeklyState(tmp_path / "out")
    land(landing, "2026-W49")
    start = Starter(1, EXIT_OK)
    assert check_once(str(landing), state, start).exit_code == 1
    assert check_once(str(landing), state, start).exit_code == EXIT_OK
    assert start.calls == ["2026-W49", "2026-W49"]
    assert [r["attempts"] for r in state.read()["batches"].values()] == [2]


def test_a_batch_landing_during_a_run_waits_and_is_picked_up_next(tmp_path):
    landing, state = tmp_path / "landing", WeeklyState(tmp_path / "out")
    land(landing, "2026-W49")
    seen = []

    def meanwhile():
        land(landing, "2026-W50")
        seen.append(check_once(str(landing), state, Starter()))  # another watcher checks now

    start = Starter(during=meanwhile)
    assert check_once(str(landing), state, start).batch == "2026-W49"
    assert seen[0].exit_code == EXIT_BUSY and "waits for the next check" in seen[0].message
    assert check_once(str(landing), state, start).batch == "2026-W50"
    assert start.calls == ["2026-W49", "2026-W50"]


def test_only_selects_one_batch_by_the_key_pending_prints(tmp_path):
    landing, state = tmp_path / "landing", WeeklyState(tmp_path / "out")
    land(landing, "2026-W48")
    land(landing, "2026-W49", text="b")
    keys = [b.key(d) for b, d, _ in pending(str(landing), state)]
    assert [k.split("@")[0] for k in keys] == ["2026-W48", "2026-W49"]
    start = Starter()
    assert check_once(str(landing), state, start, only=keys[1]).batch == "2026-W49"
    assert check_once(str(landing), state, start, only=keys[1]).batch is None  # done
    assert check_once(str(landing), state, start, only="2026-W48@0000000000000000").batch is None  # changed since
    assert start.calls == ["2026-W49"]


# two processes at the same moment: each runs one check whose start appends to a shared file
# and takes a while, so whichever loses the race finds the lock held or the batch done
RACER = """
import sys, time
from pipelines.watch import WeeklyState, check_once
landing, out, log, at = sys.argv[1:5]
def start(uri, name):
    with open(log, "a") as f:
        f.write(name + "\\n")
    time.sleep(1.5)
    return 0
time.sleep(max(0.0, float(at) - time.time()))
r = check_once(landing, WeeklyState(out), start, say=lambda s: None)
print(r.exit_code, r.batch)
"""


def test_two_watchers_at_the_same_moment_run_a_batch_once(tmp_path):
    landing, out, log = tmp_path / "landing", tmp_path / "out", tmp_path / "started.txt"
    land(landing, "2026-W49")
    at = str(time.time() + 3)  # both start their check at this moment (after Python's start-up)
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(landing), str(out), str(log), at], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted(p.communicate(timeout=60)[0].split() for p in procs)
    assert log.read_text().splitlines() == ["2026-W49"], results
    assert ["0", "2026-W49"] in results  # one ran it; the other found it busy (4) or done (0, None)
    assert results[0] in (["0", "None"], [str(EXIT_BUSY), "None"], ["0", "2026-W49"])


HOLDER = """
import sys, time
from pipelines.watch import WeeklyState
with WeeklyState(sys.argv[1]).lock():
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_crashed_lock_holder_does_not_block_the_next_check(tmp_path):
    landing, state = tmp_path / "landing", WeeklyState(tmp_path / "out")
    land(landing, "2026-W49")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "out")], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = Starter()
        r = check_once(str(landing), state, start)
        assert r.exit_code == EXIT_BUSY and f"pid={holder.pid}" in r.message and start.calls == []
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a crash: no clean-up runs
        holder.wait(timeout=30)
    assert check_once(str(landing), state, start).batch == "2026-W49"


def test_watch_cli_pending_and_an_unreachable_landing_location(tmp_path):
    landing, out = tmp_path / "landing", tmp_path / "out"
    landing.mkdir()

    def weekly(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "pipelines/weekly.py", "--watch", str(landing), *args,
                               "--output-dir", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)

    land(landing, "2026-W49", complete=False)
    p = weekly("--pending")
    assert p.returncode == 0 and p.stdout.strip() == "", p.stderr  # incomplete: nothing to run
    p = subprocess.run([sys.executable, "pipelines/weekly.py", "--watch", str(tmp_path / "nowhere"), "--once",
                        "--output-dir", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "landing location not found" in p.stderr


def test_a_watcher_and_a_manual_run_at_the_same_moment_run_it_once(tmp_path):
    from steps.preference_store import batch_digest

    landing, state = tmp_path / "landing", WeeklyState(tmp_path / "out")
    d = land(landing, "2026-W49")
    start = Starter()
    # `weekly.py --batch` holds the same lock for its whole run and records the outcome by digest
    # (pipelines/weekly.py run_weekly); meanwhile the watcher's check finds the lock held
    with state.lock():
        assert check_once(str(landing), state, start).exit_code == EXIT_BUSY
        state.record(batch_digest(str(d)), name="2026-W49", source=str(d), status="done", exit_code=0)
    assert check_once(str(landing), state, start).batch is None and start.calls == []
