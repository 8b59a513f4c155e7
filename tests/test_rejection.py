"""Rejection sampling's selection: best of K under the gated reward, pooling of earlier
winners rescored by the current reward models, prompts from the accepted batches, the greedy
answer as a candidate and SFT demonstrations replayed in the fine-tuning mix."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.chat import Dialogue, Turn
from steps.gated_reward import gated_reward
from steps.preference_schema import PAIR_SCHEMA
from steps.rejection import prompt_key, prompts_of, replay_demonstrations, reward_curve, select_winners


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


def test_the_greedy_answer_joins_the_k_samples_as_one_more_candidate(tmp_path):
    from model.chat import encode_prompt
    from model.generate import SamplingParams, TorchSampler
    from steps.rejection import load_sampling_model, sample_and_score
    from tests.conftest import train_tiny_tokenizer
    from tests.test_rejection_tune import WORDS, make_models

    tok = train_tiny_tokenizer(tmp_path, WORDS)
    m = make_models(tmp_path, tok, {"policy": 1, "rm_helpfulness": 2, "rm_safety": 3})
    rm_dirs = {"helpfulness": str(m["rm_helpfulness"]), "safety": str(m["rm_safety"])}
    dialogues = [Dialogue([Turn("user", q)]) for q in ("hello", "what is two plus three", "the capital")]
    params = SamplingParams(max_new_tokens=8, temperature=1.0, num_samples=3, seed=5)
    earlier = [["an earlier winner"], [], []]
    plain, plain_probs = sample_and_score(str(m["policy"]), rm_dirs, dialogues, earlier, params, 2)
    answers, probs = sample_and_score(str(m["policy"]), rm_dirs, dialogues, earlier, params, 2, include_greedy=True)

    model, tok = load_sampling_model(m["policy"])
    greedy = TorchSampler(model, tok.eos_id, tok.pad_id).generate(
        [encode_prompt(tok, d) for d in dialogues], SamplingParams(max_new_tokens=8, temperature=0.0))
    assert [a[3] for a in answers] == [tok.decode(g.tokens).strip() for g in greedy]
    assert [a[:3] for a in answers] == plain  # the K samples (the reward curve's) are unchanged
    # columns: K samples, the greedy answer, then earlier winners (-inf where a prompt has none)
    assert probs["helpfulness"].shape == (3, 5) and plain_probs["helpfulness"].shape == (3, 4)
    np.testing.assert_allclose(probs["safety"][:, :3], plain_probs["safety"][:, :3], rtol=1e-5)
    np.testing.assert_allclose(probs["safety"][0, 4], plain_probs["safety"][0, 3], rtol=1e-5)
    assert np.isfinite(probs["safety"][:, 3]).all() and np.isneginf(probs["safety"][1:, 4]).all()
    # the greedy answer wins where the gated reward says so, recorded as this iteration's
    reward = np.where(np.isfinite(probs["safety"]), probs["helpfulness"], -np.inf)
    reward[0, 3] = 2.0
    winners = select_winners(["p0", "p1", "p2"], answers, {"p0": [{"answer": "an earlier winner", "iteration": 1}]},
                             reward, iteration=2)
    assert winners[0]["answer"] == answers[0][3] and winners[0]["source"] == 2


def test_replayed_demonstrations_make_the_configured_share_of_the_mix(tmp_path):
    from pipelines.artifacts import Artifact
    from steps.sft_data import to_table

    demos = [Dialogue([Turn("user", f"q{i}"), Turn("assistant", f"gold {i}")]) for i in range(10)]
    (tmp_path / "sft").mkdir()
    pq.write_table(to_table(demos, "sft"), tmp_path / "sft" / "dialogues.parquet")
    sft = Artifact("sft", "fp", tmp_path / "sft", {})

    assert replay_demonstrations(sft, 0.0, 8, seed=1) == []
    half = replay_demonstrations(sft, 0.5, 8, seed=1)  # as many demonstrations as winners
    texts = [d.turns[-1].content for d in half]
    assert len(half) == 8 and len(set(texts)) == 8 and set(texts) <= {f"gold {i}" for i in range(10)}
    assert texts == [d.turns[-1].content for d in replay_demonstrations(sft, 0.5, 8, seed=1)]  # seeded
    assert texts != [d.turns[-1].content for d in replay_demonstrations(sft, 0.5, 8, seed=2)]
    many = replay_demonstrations(sft, 0.75, 8, seed=1)  # 24 of 32: every demonstration, repeated
    assert len(many) == 24 and {d.turns[-1].content for d in many} == {f"gold {i}" for i in range(10)}


def test_replaying_demonstrations_needs_the_sft_artifact():
    from pipelines.config import load_config
    from pipelines.full import pipeline

    cfg = load_config(None, ["rlhf.rejection.sft_mix=0.5"])
    specs = {s.name: s for s in pipeline(cfg)}
    assert specs["rs_v1"].inputs["sft"] == "sft" and specs["rs_v3"].inputs["sft"] == "sft"
    plain = {s.name: s for s in pipeline(load_config(None, ["rlhf.rejection.sft_mix=0"]))}
    assert "sft" not in plain["rs_v1"].inputs
    with pytest.raises(ValueError):
        load_config(None, ["rlhf.rejection.sft_mix=1.0"])  # all demonstrations: no rejection sampling left


def test_epoch_losses_average_the_first_and_the_last_pass():
    from steps.engine.launch import TrainResult

    rows = [{"step": s, "loss": v} for s, v in enumerate([1.0, 0.8, 1.2, 0.7, 0.5, 0.9], start=1)]
    res = TrainResult(Path("w"), rows, 0.0, 0.0)
    assert res.epoch_losses(2) == {"loss.first_epoch": pytest.approx(1.0), "loss.last_epoch": pytest.approx(0.7)}
    assert res.epoch_losses(3)["loss.last_epoch"] == pytest.approx(0.7)  # steps 5-6
    assert res.epoch_losses(1) == {} and TrainResult(Path("w"), [], 0.0, 0.0).epoch_losses(2) == {}
