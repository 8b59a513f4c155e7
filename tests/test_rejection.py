"""Rejection sampling's selection: best of K under the gated reward, pooling of earlier
winners rescored by the current reward models, prompts from the accepted batches."""

import numpy as np
import pyarrow as pa

from steps.gated_reward import gated_reward
from steps.preference_schema import PAIR_SCHEMA
from steps.rejection import prompt_key, prompts_of, reward_curve, select_winners


def test_best_of_k_uses_the_gated_reward():
    # helpful prompt: answer 1 is more helpful but the safety RM finds it unsafe (Rs < 0.15)
    rh = np.array([[0.6, 0.95, 0.7]])
    rs = np.array([[0.9, 0.05, 0.8]])
    reward = gated_reward(rh, rs, np.array([[False]]), 0.15)
    winners = select_winners(["p"], [["a", "b", "c"]], {}, reward, iteration=1)
    assert winners[0]["answer"] == "c" and winners[0]["source"] == 1


def test_earlier_winners_compete_after_rescoring():
    answers = [["new1", "new2"], ["new3", "new4"]]
    earlier = {"p0": [{"answer": "old-v1", "iteration": 1}, {"answer": "old-v2", "iteration": 2}],
               "p1": [{"answer": "old-v1b", "iteration": 1}]}
    # columns: 2 new answers, then the prompt's earlier winners (rescored now); -inf = absent
    reward = np.array([[0.3, 0.4, 0.9, 0.2],
                       [0.8, 0.1, 0.5, -np.inf]])
    winners = select_winners(["p0", "p1"], answers, earlier, reward, iteration=3)
    assert [w["answer"] for w in winners] == ["old-v1", "new3"]
    assert [w["source"] for w in winners] == [1, 3]  # provenance: the iteration that produced it
    assert all(w["iteration"] == 3 for w in winners)  # both are V3's winners now


def test_prompts_come_from_the_train_split_and_safety_follows_the_axis():
    def row(pid, prompt, axis, split):
        return {"pair_id": pid, "prompt": [{"role": "user", "content": prompt}], "chosen": "a", "rejected": "b",
                "strength": "better", "axis": axis, "safety_label": "both_safe" if axis == "safety" else None,
                "source": "vendor", "annotator_id": None, "annotated_at": None, "model_chosen": None,
                "model_rejected": None, "batch": "0001-x", "split": split}

    table = pa.Table.from_pylist([row("1", "q1", "helpfulness", "train"), row("2", "q1", "safety", "train"),
                                  row("3", "q2", "helpfulness", "train"), row("4", "q3", "safety", "eval")],
                                 schema=PAIR_SCHEMA)
    got = {turns[0]["content"]: safety for _, turns, safety in prompts_of(table, 10, seed=0)}
    assert got == {"q1": True, "q2": False}  # q3 is held out
    assert len(prompts_of(table, 1, seed=0)) == 1
    assert prompt_key([{"role": "user", "content": "q1"}]) != prompt_key([{"role": "user", "content": "q2"}])


def test_reward_curve_max_grows_with_k_and_median_does_not():
    rng = np.random.default_rng(0)
    curve = reward_curve(rng.random((200, 8)))
    assert curve["max"] == sorted(curve["max"]) and curve["max"][-1] > 0.85
    assert abs(curve["median"][-1] - 0.5) < 0.05
