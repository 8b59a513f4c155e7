"""Mixture arithmetic: epochs from weights, deterministic up/down-sampling."""

import pytest

from pipelines.config import load_config
from steps.data.config import SourceConfig
from steps.data.mixture import apply_batch, copies, plan_mixture


def test_llama1_table_weights_give_its_epochs():
    # RECIPE 1: a source of share s sampled for e epochs holds s * T / e tokens. Given such
    # source sizes, the 7B preset's weights must reproduce the table's epochs exactly.
    cfg = load_config("7b")
    table = {"commoncrawl": (0.67, 1.10), "c4": (0.15, 1.06), "github": (0.045, 0.64), "wikipedia": (0.045, 2.45),
             "books": (0.045, 2.23), "arxiv": (0.025, 1.06), "stackexchange": (0.02, 1.03)}
    total = cfg.data.total_tokens
    stats = {k: (1000, int(share * total / epochs)) for k, (share, epochs) in table.items()}
    plans = plan_mixture(stats, cfg.data.sources, total)
    for name, (share, epochs) in table.items():
        assert plans[name].epochs == pytest.approx(epochs, rel=1e-6), name
        assert plans[name].share == pytest.approx(share, rel=1e-6), name
    assert sum(p.expected_tokens_out for p in plans.values()) == pytest.approx(total, rel=1e-6)


def test_epochs_give_whole_copies_plus_a_seeded_fraction():
    ids = [f"doc{i}" for i in range(4000)]
    n = [copies(i, 2.45, seed=0) for i in ids]
    assert set(n) == {2, 3}
    assert sum(n) / len(ids) == pytest.approx(2.45, abs=0.03)
    assert n == [copies(i, 2.45, seed=0) for i in ids]  # deterministic
    assert n != [copies(i, 2.45, seed=1) for i in ids]  # the seed matters
    down = [copies(i, 0.3, seed=0) for i in ids]
    assert set(down) == {0, 1} and sum(down) / len(ids) == pytest.approx(0.3, abs=0.03)


def test_apply_batch_repeats_rows_with_copy_index():
    batch = {"id": ["a", "b"], "source": ["wiki", "web"], "text": ["x", "y"], "metadata": ["{}", "{}"]}
    out = apply_batch(batch, {"wiki": 2.0, "web": 1.0}, seed=0)
    assert out["id"] == ["a", "a", "b"] and out["copy"] == [0, 1, 0]


def test_epochs_sources_keep_their_epochs():
    srcs = [SourceConfig(name="a", kind="text", paths=["x"], epochs=2.45),
            SourceConfig(name="b", kind="text", paths=["y"], epochs=1.0)]
    plans = plan_mixture({"a": (10, 100), "b": (10, 300)}, srcs)
    assert plans["a"].epochs == 2.45 and plans["a"].expected_tokens_out == pytest.approx(245)
    assert plans["a"].share == pytest.approx(245 / 545)
