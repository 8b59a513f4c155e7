"""Shared fixtures: one local Ray for the whole session (starting Ray costs seconds)."""

import os
import subprocess
import sys
from pathlib import Path

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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-pipeline")
    first = run_cli(out)
    assert first.returncode == 0, first.stderr[-4000:]
    second = run_cli(out)
    assert second.returncode == 0, second.stderr[-4000:]
    return out, first, second


def latest(out: Path, step: str):
    from pipelines.artifacts import Artifact, ArtifactStore

    store = ArtifactStore(out)
    arts = [Artifact.load(p) for p in (out / step).iterdir() if (p / "manifest.json").exists()]
    assert arts, f"no {step} artifact under {out}"
    assert all(store.verify(a) == [] for a in arts)
    return max(arts, key=lambda a: a.path.stat().st_mtime)


