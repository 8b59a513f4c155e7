"""Shared fixtures: one local Ray for the whole session (starting Ray costs seconds)."""

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from pipelines.config import load_config
    from pipelines.dag import ensure_ray

    ensure_ray(load_config(None))
    yield ray
    ray.shutdown()


def train_tiny_tokenizer(directory, words: str, vocab_size: int = 320):
    """A SentencePiece model trained in well under a second on seeded random sentences."""
    import random

    from model.tokenizer import Tokenizer

    rng = random.Random(0)
    vocab = words.split()
    return Tokenizer.train((" ".join(rng.choice(vocab) for _ in range(10)) for _ in range(3000)),
                           directory / "tok", vocab_size)


# ---------------------------------------------------------------- the shared end-to-end run
# One run of the tiny pipeline per test session, used by every test marked e2e in any module
# (tests/test_e2e.py and the PPO, weekly, fault and MLflow UI tests): `from tests.conftest import latest`.
REPO = Path(__file__).resolve().parent.parent


def run_cli(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pipelines/full.py", "--output-dir", str(out), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=3600)


# The shared run's first invocation is SIGKILLed once this training step has written its first
# checkpoint: data, tokenizer and pretrain are done by then, and SFT (320 steps, a checkpoint every
# 100) loses about its launch (~30 s) and the few steps after the checkpoint.
KILL_AT_CHECKPOINT_OF = "sft"


@dataclass
class KilledRun:
    """The invocation of full.py that was SIGKILLed in the middle of the DAG."""

    step: str  # the training step in flight when it was killed
    checkpoint: str  # its checkpoint (`step_00000100`) named in `latest` at the kill
    completed: list[str]  # steps whose artifacts were published before the kill
    seconds: float  # from start to kill
    processes: list[str]  # what was running under the driver at the kill (pid and title)
    survivors: list[str]  # those still alive 30 s after the kill (then killed here)
    output: str  # what the driver printed (stdout and stderr)


def _published_steps(out: Path) -> list[str]:
    return sorted(p.parent.parent.name for p in out.glob("*/*/manifest.json"))  # <out>/<step>/<fp>/


def _describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid} {' '.join(p.cmdline())[:120]}"
    except psutil.Error:
        return f"{p.pid} (gone)"


def run_cli_killed(out: Path, step: str, log_dir: Path, *extra: str, timeout: float = 3600) -> KilledRun:
    """Run full.py and SIGKILL its whole process group, as a crashed job or a lost head node would
    be, once `step` has a checkpoint in its work dir (`<out>/<step>/.work/<fp>/checkpoints/latest`,
    pipelines/artifacts.py). Every process under the driver at that moment (its local Ray: GCS,
    raylet, step tasks, Ray Train workers) must be gone within 30 s; any that is not is recorded
    and killed, so nothing of this run blocks the next."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "killed-run.log"
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "pipelines/full.py", "--output-dir", str(out), *extra], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            latest = [p for p in out.glob(f"{step}/.work/*/checkpoints/latest") if p.read_text().strip()]
            if latest or proc.poll() is not None or time.time() - start > timeout:
                break
            time.sleep(0.5)
        if not latest:
            raise AssertionError(f"{step} wrote no checkpoint before the run ended (exit {proc.poll()}) or "
                                 f"{timeout:.0f} s passed:\n{log_path.read_text()[-4000:]}")
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        processes = [_describe(p) for p in tree]
        completed, checkpoint = _published_steps(out), latest[0].read_text().strip()
        os.killpg(proc.pid, signal.SIGKILL)  # the driver's group: itself and what did not leave it
        seconds = time.time() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Ray's daemons may live in their own sessions (out of reach of killpg): they must notice
    # that their driver died and exit on their own
    _, alive = psutil.wait_procs(tree, timeout=30)
    survivors = [_describe(p) for p in alive]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=10)
    return KilledRun(step, checkpoint, completed, seconds, processes, survivors, log_path.read_text())


class TinyRun(tuple):
    """(out_dir, first, second), unpacked as before: `first` is the invocation that completed the
    DAG after `killed` (a KilledRun) had been SIGKILLed in its middle, `second` the all-cache-hits one."""

    killed: KilledRun

    def __new__(cls, out: Path, first, second, killed: KilledRun):
        self = super().__new__(cls, (out, first, second))
        self.killed = killed
        return self

    @property
    def out(self) -> Path:
        return self[0]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-pipeline")
    killed = run_cli_killed(out, KILL_AT_CHECKPOINT_OF, tmp_path_factory.mktemp("tiny-pipeline-logs"))
    first = run_cli(out)  # resumes: cache hits up to the killed step, which continues from its checkpoint
    assert first.returncode == 0, first.stderr[-4000:]
    second = run_cli(out)
    assert second.returncode == 0, second.stderr[-4000:]
    return TinyRun(out, first, second, killed)


def latest(out: Path, step: str):
    from pipelines.artifacts import Artifact, ArtifactStore

    store = ArtifactStore(out)
    arts = [Artifact.load(p) for p in (out / step).iterdir() if (p / "manifest.json").exists()]
    assert arts, f"no {step} artifact under {out}"
    assert all(store.verify(a) == [] for a in arts)
    return max(arts, key=lambda a: a.path.stat().st_mtime)




# ------------------------------------------------------------------ the weekly rerun (V6), shared
def vendor_batch(batch_dir: Path, name: str, n: int = 300, seed: int = 0) -> list[dict]:
    """A vendor's delivery on the demo world's train prompts, labelled by the simulated vendor's
    own function (steps/annotate.label: the judge's score gap, 10% label noise): for each prompt
    the reference answer against a worse one (world.preference_pair). Pair ids carry the batch
    name, so none was ever ingested; `_SUCCESS` is written last."""
    from steps.annotate import label, write_batch
    from steps.world import World

    world, rng = World(seed), random.Random(f"weekly-{name}")
    items = rng.sample(world.items("train"), n)
    first, second = [], []
    for it in items:
        chosen, worse, _ = world.preference_pair(it, rng)
        first.append((chosen, "reference"))
        second.append((worse, "degraded"))
    rows, _ = label(items, first, second, 0.1, rng, f"vendor-{name}")
    write_batch(batch_dir, rows, datetime(2026, 11, 30, tzinfo=UTC))
    return rows


def weekly(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pipelines/weekly.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=1800)


def artifacts(out: Path) -> dict[str, set[str]]:
    return {d.name: {p.name for p in d.iterdir() if (p / "manifest.json").exists()}
            for d in out.iterdir() if d.is_dir() and any(d.glob("*/manifest.json"))}


@dataclass
class WeeklyRun:
    """The shared run's week after: a second vendor batch landed and `weekly.py --watch --once` ran."""

    out: Path
    landing: Path
    rows: list[dict]  # the batch's pairs
    earlier_pair_ids: set[str]  # pairs ingested before it (V1..V5)
    before: dict[str, set[str]]  # artifacts before the weekly run
    process: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def tiny_week6(tiny_run, tmp_path_factory) -> WeeklyRun:
    """V6 on top of the shared tiny run, once per session: the weekly test asserts on it and the
    MLflow UI test then compares V1..V6 (pytest-timeout counts this set-up in the first test
    that asks for it: ~5 min on 2 cores)."""
    out = tiny_run.out
    landing = tmp_path_factory.mktemp("landing")
    rows = vendor_batch(landing / "2026-W49", "2026-W49")
    earlier = set(pq.read_table(latest(out, "prefs_v5").file("pairs.parquet"), columns=["pair_id"])
                  .column("pair_id").to_pylist())
    before = artifacts(out)
    p = weekly("--watch", str(landing), "--once", "--output-dir", str(out))
    return WeeklyRun(out, landing, rows, earlier, before, p)
