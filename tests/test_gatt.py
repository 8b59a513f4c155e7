"""Ghost Attention's data: varied instructions as in the paper, sometimes shortened on later
turns, and each turn's answer chosen by the reward models (best of K, gated reward)."""

import random

import numpy as np
import pytest

from model.chat import Dialogue, Turn
from steps.gatt import GAttConfig
from steps.gatt_data import TEMPLATES, best_of_k_answerer, gatt_dialogues, make_instruction, sampling_messages

CONSTRAINTS = {"hobby": ["tennis", "chess"], "language": ["French", "Spanish"], "persona": ["Napoleon"]}


def test_instructions_combine_constraints_of_distinct_categories():
    rng = random.Random(0)
    drawn = [make_instruction(rng, [], CONSTRAINTS, 2) for _ in range(300)]
    assert len({d.text for d in drawn}) > 15  # varied
    for d in drawn:
        parts = d.text.split(". ")
        assert len(parts) in (1, 2)  # no fixed instruction: at least one constraint
        assert sum(p.startswith("Always answer in") for p in parts) <= 1  # one language at most
    counts = {len(d.text.split(". ")) for d in drawn}
    assert counts == {1, 2}
    short = [d for d in drawn if d.text == "Act as Napoleon."]
    assert short and short[0].short == "Figure: Napoleon."
    # a fixed instruction leads, keeps its wording when shortened, and may come alone
    fixed = [make_instruction(rng, ["Answer in French."], {"hobby": ["chess"]}, 1) for _ in range(100)]
    assert {d.text for d in fixed} == {"Answer in French.", "Answer in French. You enjoy chess."}
    assert {d.short for d in fixed} == {"Answer in French.", "Answer in French. Hobby: chess."}


def test_later_turns_sometimes_carry_the_shortened_instruction():
    rng = random.Random(1)
    ins = make_instruction(rng, [], {"persona": ["Napoleon"]}, 1)
    sampled = [sampling_messages(ins, ["q1", "q2", "q3"], rng, 0.5) for _ in range(200)]
    assert all(s[0] == "Act as Napoleon. q1" for s in sampled)  # the first turn: always the full wording
    later = [m for s in sampled for m in s[1:]]
    assert set(later) == {"Act as Napoleon. q2", "Figure: Napoleon. q2", "Act as Napoleon. q3", "Figure: Napoleon. q3"}
    assert 0.35 < np.mean([m.startswith("Figure") for m in later]) < 0.65
    assert all(m.startswith("Act as") for s in [sampling_messages(ins, ["a", "b"], rng, 0.0)] for m in s)


def test_training_dialogues_keep_the_full_instruction_and_the_plain_messages():
    asked = []

    def answer(dialogues):
        asked.append([d.turns[-1].content for d in dialogues])
        return [("Figure-like answer", True)] * len(dialogues)

    [d] = gatt_dialogues([("Act as Napoleon.", ["q1", "q2"], ["Act as Napoleon. q1", "Figure: Napoleon. q2"])], answer)
    assert asked == [["Act as Napoleon. q1"], ["Figure: Napoleon. q2"]]  # sampled under the given wordings
    assert d.system == "Act as Napoleon." and [t.content for t in d.turns[::2]] == ["q1", "q2"]
    assert [t.train for t in d.turns[1::2]] == [False, True]


def test_config_rejects_unknown_categories_and_no_instruction():
    with pytest.raises(ValueError, match="unknown categories"):
        GAttConfig(constraints={"sport": ["tennis"]})
    with pytest.raises(ValueError, match="both empty"):
        GAttConfig(instructions=[], constraints={k: [] for k in TEMPLATES})


def test_each_turn_keeps_the_answer_the_reward_models_rank_best(tmp_path):
    from model.generate import SamplingParams
    from steps.gated_reward import gated_reward
    from steps.rejection import RewardScorer, load_sampling_model
    from tests.conftest import train_tiny_tokenizer
    from tests.test_rejection_tune import WORDS, make_models

    tok = train_tiny_tokenizer(tmp_path, WORDS)
    m = make_models(tmp_path, tok, {"policy": 1, "rm_helpfulness": 2, "rm_safety": 3})
    model, tok = load_sampling_model(m["policy"])
    rm_dirs = {"helpfulness": str(m["rm_helpfulness"]), "safety": str(m["rm_safety"])}
    params = SamplingParams(max_new_tokens=6, temperature=1.5, num_samples=4, seed=3)
    answer, log = best_of_k_answerer(model, tok, params, rm_dirs, 0.15, batch_size=2)
    dialogues = [Dialogue([Turn("user", q)]) for q in ("hello", "two plus three", "the capital", "seven")]
    chosen = answer(dialogues)

    # the same K candidates, scored here from scratch: the chosen one has the highest gated reward
    # among the finished ones (or among all, where none finished)
    from model.chat import encode_prompt
    from model.generate import TorchSampler

    samples = TorchSampler(model, tok.eos_id, tok.pad_id).generate([encode_prompt(tok, d) for d in dialogues], params)
    texts = [[tok.decode(s.tokens).strip() for s in samples[i * 4:(i + 1) * 4]] for i in range(4)]
    done = np.array([[s.finished for s in samples[i * 4:(i + 1) * 4]] for i in range(4)])
    probs = {a: RewardScorer(tmp_path / f"rm_{a}", tok).probs(dialogues, texts, 4) for a in rm_dirs}
    reward = gated_reward(probs["helpfulness"], probs["safety"], np.zeros((4, 1), bool), 0.15)
    for i, (text, finished) in enumerate(chosen):
        pool = np.flatnonzero(done[i]) if done[i].any() else np.arange(4)
        assert text == texts[i][pool[reward[i, pool].argmax()]] and finished == bool(done[i].any())
    assert len({tuple(t) for t in texts}) > 1 and np.mean(log["chosen"]) >= np.mean(log["first"])
    # the next call (the next turn) draws fresh streams
    again = answer(dialogues)
    assert log["first"][:4] != log["first"][4:] or [a for a, _ in again] != [a for a, _ in chosen]
