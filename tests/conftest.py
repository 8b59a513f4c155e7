"""Shared fixtures: one local Ray for the whole session (starting Ray costs seconds)."""

import os

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
