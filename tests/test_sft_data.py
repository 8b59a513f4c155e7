"""SFT data: public-format readers, packing with masks token by token, GAtt construction (the
demo world and its judge: tests/test_world.py)."""

import json

import pytest

from model.chat import Dialogue, Turn, encode_answer, encode_dialogue
from steps.gatt import gatt_dialogues, roll_out
from steps.sft_data import BadDialogueError, from_table, pack, read_dialogues, to_table
from tests.conftest import train_tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("sp"), "what is the capital of answer river two plus three five hello sure arr fr")


def test_public_formats(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "Add", "input": "2 and 3", "output": "5"}]))
    (tmp_path / "s.jsonl").write_text(json.dumps({"conversations": [
        {"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}))
    (tmp_path / "m.json").write_text(json.dumps([{"messages": [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}]))
    a, = read_dialogues(tmp_path / "a.json")
    assert [t.content for t in a.turns] == ["Add\n\n2 and 3", "5"]
    s, = read_dialogues(tmp_path / "s.jsonl")
    assert s.system == "be brief" and [t.role for t in s.turns] == ["user", "assistant"]
    m, = read_dialogues(tmp_path / "m.json")
    assert len(m.turns) == 4
    round_trip = from_table(to_table([a, s, m], "x"))
    assert [d.system for d in round_trip] == [None, "be brief", None] and len(round_trip[2].turns) == 4


def test_real_alpaca_demo_data():
    from scripts.fetch_demo_data import ensure

    dialogues = read_dialogues(ensure(verbose=False) / "sft" / "alpaca_en_demo.json")
    assert len(dialogues) == 999 and all(len(d.turns) == 2 for d in dialogues)


def test_bad_rows_name_file_row_and_field(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "ok", "output": "fine"}, {"instruction": "x"}]))
    with pytest.raises(BadDialogueError, match=r"bad\.json: row 1: field 'output'"):
        read_dialogues(tmp_path / "bad.json")
    (tmp_path / "order.jsonl").write_text(json.dumps({"messages": [{"role": "assistant", "content": "a"}]}))
    with pytest.raises(BadDialogueError, match="row 0: turn 0"):
        read_dialogues(tmp_path / "order.jsonl")


def test_packing_masks_token_by_token(tok):
    d1 = Dialogue([Turn("user", "two plus three"), Turn("assistant", "five"),
                   Turn("user", "hello"), Turn("assistant", "sure")], system="be brief")
    d2 = Dialogue([Turn("user", "capital"), Turn("assistant", "river")])
    rows, stats = pack(tok, [d1, d2], seq_len=64)
    assert stats["rows"] == 1 and stats["truncated"] == 0
    tokens, targets = rows["tokens"][0], rows["targets"][0]
    seg, pos = rows["segment_ids"][0], rows["positions"][0]
    ids1, mask1 = encode_dialogue(tok, d1)
    ids2, mask2 = encode_dialogue(tok, d2)
    n1, n2 = len(ids1), len(ids2)
    assert tokens[:n1].tolist() == ids1 and tokens[n1:n1 + n2].tolist() == ids2
    assert seg[:n1].tolist() == [0] * n1 and seg[n1:n1 + n2].tolist() == [1] * n2 and set(seg[n1 + n2:]) == {2}
    assert pos[:n1].tolist() == list(range(n1)) and pos[n1:n1 + n2].tolist() == list(range(n2))
    for i in range(n1 - 1):  # token i is trained to predict token i+1 exactly when i+1 is an answer token
        assert targets[i] == (ids1[i + 1] if mask1[i + 1] else -100)
    assert targets[n1 - 1] == -100  # never across the example boundary
    trained = [tok.decode([t]) for t in targets[:n1] if t != -100]
    assert "".join(trained).replace(" ", "") == "fivesure" and (targets[:n1] == tok.eos_id).sum() == 2
    assert (targets[n1 + n2:] == -100).all()


def test_long_examples_are_truncated_and_counted(tok):
    long = Dialogue([Turn("user", "hello " * 100), Turn("assistant", "five")])
    rows, stats = pack(tok, [long], seq_len=32)
    assert stats["truncated"] == 1 and len(rows["tokens"][0]) == 32


def test_gatt_construction():
    asked = []

    def answer(dialogues):  # a batch of prompts per turn, one per live conversation
        asked.append([[t.content for t in d.turns] for d in dialogues])
        return [(f"FR: answer {len(d.turns) // 2}", not d.turns[-1].content.endswith("long")) for d in dialogues]

    built = gatt_dialogues([("Answer in French.", ["q1", "q2", "q3"]), ("Act as a pirate.", ["p1", "p2"]),
                            ("Answer in French.", ["r1", "too long", "r3"])], answer)
    assert [len(batch) for batch in asked] == [3, 3, 1]  # the unfinished conversation stops sampling
    assert asked[2][0] == ["Answer in French. q1", "FR: answer 0", "Answer in French. q2", "FR: answer 1",
                           "Answer in French. q3"]  # the instruction went with every user turn while sampling
    d, short, cut = built
    assert cut is None  # an answer that hit max_new_tokens is no training target
    assert d.system == "Answer in French." and [t.content for t in d.turns[::2]] == ["q1", "q2", "q3"]
    assert [t.content for t in d.turns[1::2]] == ["FR: answer 0", "FR: answer 1", "FR: answer 2"]
    assert [t.train for t in d.turns[1::2]] == [False, False, True]  # only the last answer is trained
    assert short.system == "Act as a pirate." and [t.train for t in short.turns[1::2]] == [False, True]


def test_roll_out_for_evaluation_goes_on_past_a_cut_off_answer():
    def answer(dialogues):
        return [(f"a{len(d.turns) // 2}", len(d.turns) > 1) for d in dialogues]  # first answer cut off

    [(d, finished)] = roll_out([("Answer in French.", ["q1", "q2"])], answer, stop_unfinished=False)
    assert d.system == "Answer in French." and [t.content for t in d.turns] == ["q1", "a0", "q2", "a1"]
    assert not finished
    [(d, _)] = roll_out([("Answer in French.", ["q1", "q2"])], answer)
    assert [t.content for t in d.turns] == ["q1", "a0"]


def test_gatt_flags_reach_the_loss_mask(tok):
    [d] = gatt_dialogues([("Answer in French.", ["two plus three", "hello"])],
                         lambda ds: [("fr five", True)] * len(ds))
    ids, mask = encode_dialogue(tok, d)
    trained = tok.decode([i for i, m in zip(ids, mask) if m and i != tok.eos_id])
    assert trained.strip() == "fr five" and sum(mask) == len(encode_answer(tok, "fr five"))  # text + </s>


def test_judge_model_groups_each_items_samples_and_is_seeded(tok):
    """K sampled answers per item come back together: an item's score is the mean of its own
    K answers' judge scores, and the same seed gives the same answers."""
    import numpy as np
    import torch

    from model.config import ModelConfig
    from model.llama import Transformer
    from steps.sft import judge_model
    from steps.world import World, judge

    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=tok.vocab_size, multiple_of=16,
                                    max_seq_len=256)).eval()
    items = World(0).items("test")[:5]
    greedy, grows = judge_model(model, tok, items, 8)
    assert len(grows) == len(items)
    scores, rows = judge_model(model, tok, items, 8, temperature=1.0, num_samples=3, seed=7)
    assert len(rows) == 3 * len(items) and [r["prompt"] for r in rows[:3]] == [items[0].dialogue.turns[-1].content] * 3
    per_item = [np.mean([judge(it, r["response"])["helpfulness"] for r in rows[3 * n:3 * n + 3]])
                for n, it in enumerate(items)]
    assert scores["helpfulness"] == pytest.approx(float(np.mean(per_item)))
    assert judge_model(model, tok, items, 8, temperature=1.0, num_samples=3, seed=7)[1] == rows
    assert len({r["response"] for r in rows}) > len(items)  # sampled, not K copies of one answer
    # the contract the grouping rests on: the sampler returns each prompt's K samples together,
    # in prompt order, and a prompt's samples follow its index in the whole list (first_index),
    # not its place in a chunk
    from model.chat import encode_prompt
    from model.generate import SamplingParams, TorchSampler

    params = SamplingParams(max_new_tokens=8, temperature=1.0, num_samples=3, seed=7)
    sampler = TorchSampler(model, tok.eos_id, tok.pad_id)
    prompts = [encode_prompt(tok, it.dialogue) for it in items]
    whole = sampler.generate(prompts, params)
    assert [s.prompt_index for s in whole] == [n for n in range(len(items)) for _ in range(3)]
    assert [tok.decode(s.tokens).strip() for s in whole] == [r["response"] for r in rows]
    chunked = sampler.generate(prompts[:2], params) + sampler.generate(prompts[2:], params, first_index=2)
    assert [s.tokens for s in chunked] == [s.tokens for s in whole]
    assert [s.tokens for s in sampler.generate(prompts[2:], params)] != [s.tokens for s in whole[6:]]
