"""The data stage's driver does not grow with the corpus: the same stage over 25 MB and over
500 MB of generated text; the driver's peak resident memory may differ by < 150 MB.

The corpora are seeded random text (a 5,000-word vocabulary, 20 KB documents in
2 MB files, with 2% exact and 2% near-duplicate documents so every dedup path has work). Quality rules
are off to keep the run to a few minutes on 2 cores; everything that moves documents (read,
line-free cleaning, signatures, shuffles, components, removal, mixture, write) runs."""

import shutil
import threading
import time

import numpy as np
import psutil
import pytest

from steps.data.config import DataConfig

VOCAB = np.array([f"w{i}" for i in range(5000)])
DOC_WORDS = 3000  # about 20 KB of text


def write_corpus(directory, megabytes: int, seed: int) -> int:
    """Files of ~2 MB, one document per line; returns the number of text bytes written."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    total, f, prev = 0, 0, None
    while total < megabytes * 2**20:
        lines = []
        for _ in range(100):
            if prev is not None and rng.random() < 0.02:
                doc = prev  # exact copy
            elif prev is not None and rng.random() < 0.02:
                words = prev.split()
                for i in rng.integers(0, len(words), size=len(words) // 100):
                    words[i] = VOCAB[rng.integers(0, len(VOCAB))]
                doc = " ".join(words)  # near copy: 1% of words changed
            else:
                doc = " ".join(VOCAB[rng.integers(0, len(VOCAB), size=DOC_WORDS)])
            lines.append(doc)
            prev = doc
        text = "\n".join(lines) + "\n"
        (directory / f"part-{f:04d}.txt").write_text(text)
        total += len(text)
        f += 1
    return total


class PeakRSS:
    """Peak resident memory of this process (the driver) while the block runs."""

    def __enter__(self):
        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def run_stage(corpus, out):
    from steps.data import process

    cfg = DataConfig(sources=[{"name": "gen", "kind": "text", "paths": [str(corpus / "*.txt")],
                               "line_documents": True, "epochs": 1.0, "quality_filter": False}],
                     pii=False, dedup={"num_perm": 10, "bands": 10, "threshold": 0.8})
    with PeakRSS() as rss:
        metrics, _, _ = process(cfg, out, seed=0)
    return metrics, rss.peak


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_driver_memory_is_flat_from_25_to_500_mb(ray_local, tmp_path):
    small_bytes = write_corpus(tmp_path / "small", 24, seed=1)
    large_bytes = write_corpus(tmp_path / "large", 500, seed=2)
    assert large_bytes >= 500 * 2**20 and large_bytes >= 20 * small_bytes
    run_stage(tmp_path / "small", tmp_path / "warm")  # imports and Ray's first tasks out of the way
    small, small_peak = run_stage(tmp_path / "small", tmp_path / "out-small")
    shutil.rmtree(tmp_path / "warm")
    large, large_peak = run_stage(tmp_path / "large", tmp_path / "out-large")
    growth = (large_peak - small_peak) / 2**20
    print(f"driver peak RSS: {small_peak / 2**20:.0f} MB ({small['docs_in']} docs) -> "
          f"{large_peak / 2**20:.0f} MB ({large['docs_in']} docs): +{growth:.0f} MB")
    assert large["docs_in"] >= 19 * small["docs_in"]
    assert large["exact_duplicates"] > 0 and large["near_duplicates"] > 0
    assert large["docs_out"] == large["docs_in"] - large["duplicates_removed"]
    assert growth < 150
