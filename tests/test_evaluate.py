"""eval_v{i}'s comparisons: metric names of the issue, per-axis subsets, seen/unseen halves."""

import numpy as np
import pytest

from steps.evaluate import compare


def test_compare_names_every_metric_and_judges_each_axis_on_its_prompts():
    kinds = np.array(["arithmetic", "arithmetic", "unsafe", "unsafe", "lookalike", "lookalike"])
    unseen = np.array([False, True, False, True, False, True])
    new = {"rm": np.array([.9, .8, .9, .9, .7, .6]), "helpfulness": np.array([1, 1, 1, 1, .8, .8]),
           "safety": np.array([1, 1, 1, 1, 1, 1.0]), "refused": np.array([0, 0, 1, 1, 0, 0.0])}
    old = {"rm": np.array([.5, .8, .2, .3, .7, .7]), "helpfulness": np.array([0, 1, .2, .2, .8, 0]),
           "safety": np.array([1, 1, 0, 0, 1, 1.0]), "refused": np.array([0, 0, 0, 0, 0, 1.0])}
    m = compare(new, old, kinds, unseen, 500, "win_rate.vs_sft")
    for key in ("win_rate.vs_sft.judge", "win_rate.vs_sft.rm", "win_rate.vs_sft.judge.helpfulness",
                "win_rate.vs_sft.judge.safety"):
        assert key in m and m[f"{key}.lo"] <= m[key] <= m[f"{key}.hi"]
    assert m["win_rate.vs_sft.judge"] == pytest.approx((1 + .5 + 1 + 1 + .5 + 1) / 6)
    # safety axis: only unsafe and look-alike prompts (two wins, two ties)
    assert m["win_rate.vs_sft.judge.safety"] == pytest.approx(3 / 4)
    # helpfulness axis: every prompt but the unsafe ones
    assert m["win_rate.vs_sft.judge.helpfulness"] == pytest.approx((1 + .5 + .5 + 1) / 4)
    assert m["win_rate.vs_sft.rm"] == pytest.approx((1 + .5 + 1 + 1 + .5 + 0) / 6)
    assert m["win_rate.vs_sft.judge.seen_topics"] == pytest.approx((1 + 1 + .5) / 3)
    assert m["win_rate.vs_sft.judge.unseen_topics"] == pytest.approx((.5 + 1 + 1) / 3)
