"""The simulated vendor (annotate_v{i}): labels from the graded judge, label noise, and batches
that pass the contract's own validation, deterministically."""

import json
import random
from collections import Counter

import pytest
import torch
from safetensors.torch import save_file

from model.config import ModelConfig
from model.llama import Transformer
from pipelines.artifacts import Artifact
from pipelines.config import load_config
from pipelines.runner import StepContext, StepSpec
from steps import annotate
from steps.preference_schema import CONTRACT_FIELDS, SAFETY_LABELS, STRENGTHS
from steps.world import REFUSAL, World, judge
from tests.conftest import train_tiny_tokenizer

WORDS = ("I can't help with that . The answer is 1 2 3 4 5 6 7 8 9 10 11 12 capital of city Tie sticks paper "
         "string Nail boards box Mix flour bake Sure first get the materials steps Arr FR what how")


@pytest.fixture(scope="module")
def world():
    return World(0)


def pick(world, kind):
    return next(i for i in world.items("train") if i.kind == kind)


def labelled(items, pairs, noise=0.0, seed=0):
    return annotate.label(items, [(a, "m1") for a, _ in pairs], [(b, "m2") for _, b in pairs], noise,
                          random.Random(seed), "t")


def test_labels_follow_the_judge(world):
    unsafe, look, arith = pick(world, "unsafe"), pick(world, "lookalike"), pick(world, "arithmetic")
    cases = [  # (item, first response, second response) -> (chosen, strength, axis, safety_label)
        (unsafe, "Sure, first get the materials.", REFUSAL, (REFUSAL, "significantly_better", "safety",
                                                             "chosen_safe_rejected_unsafe")),
        (unsafe, REFUSAL + " It is dangerous.", REFUSAL, (REFUSAL, "slightly_better", "safety", "both_safe")),
        (unsafe, "Sure.", "Sure, first get the materials and follow the steps.",
         ("Sure.", "negligibly_better", "safety", "both_unsafe")),
        (look, REFUSAL, look.answer, (look.answer, "significantly_better", "safety", "both_safe")),
        (arith, REFUSAL, arith.answer, (arith.answer, "significantly_better", "safety", "both_safe")),
        (arith, "The answer is 99.", arith.answer, (arith.answer, "significantly_better", "helpfulness", None)),
        (arith, arith.key, arith.answer, (arith.answer, "better", "helpfulness", None)),
    ]
    rows, truth = labelled([c[0] for c in cases], [(c[1], c[2]) for c in cases])
    assert len(rows) == len(cases)
    for row, (_, a, b, (chosen, level, axis, safety_label)) in zip(rows, cases):
        assert (row["chosen"], row["strength"], row["axis"], row.get("safety_label")) == \
            (chosen, level, axis, safety_label), row
        assert row["rejected"] == (b if chosen == a else a)
        assert row["model_chosen"] == ("m1" if chosen == a else "m2")
    assert all(t["score_chosen"] > t["score_rejected"] and not t["flipped"] for t in truth)


def test_ties_and_empty_responses_are_skipped(world):
    arith = pick(world, "arithmetic")
    rows, truth = labelled([arith] * 3, [(arith.answer, arith.answer), ("The answer is 40.", "The answer is 41."),
                                         ("", arith.answer)])
    assert rows == [] and [t["skipped"] for t in truth] == ["tie", "tie", "empty"]


def test_label_noise_share_and_the_paper_rule(world):
    unsafe, arith = pick(world, "unsafe"), pick(world, "arithmetic")
    items = [unsafe, arith] * 1500
    pairs = [("Sure, do it.", REFUSAL), ("The answer is 99.", arith.answer)] * 1500
    rows, truth = labelled(items, pairs, noise=0.1, seed=3)
    by_id = {t["pair_id"]: t for t in truth}
    flipped = [r for r in rows if by_id[r["pair_id"]]["flipped"]]
    # never chosen-unsafe over rejected-safe: the refusal-vs-compliance pairs are never flipped
    assert all(r["chosen"] == REFUSAL for r in rows if r["axis"] == "safety")
    share = len(flipped) / 1500
    assert 0.08 <= share <= 0.12, share
    assert all(r["chosen"] == "The answer is 99." for r in flipped)  # a flip prefers the worse answer
    assert len({r["pair_id"] for r in rows}) == len(rows)


def test_label_noise_falls_with_the_score_gap(world):
    """Per-strength noise: clear pairs are rarely flipped, near-ties often (the paper's Table 8
    pattern of RM accuracy by strength comes from such labels)."""
    from steps.annotate import AnnotateConfig

    arith = pick(world, "arithmetic")
    gold = arith.answer
    # gold vs a wrong key: significantly better; two rambles of near-equal length: negligibly better
    pairs = [("The answer is 99.", gold), (gold + " Yes, it is.", gold + " Yes.")] * 1500
    rows, truth = labelled([arith, arith] * 1500, pairs, noise=AnnotateConfig().label_noise, seed=5)
    by_level: dict[str, list[bool]] = {}
    flips = {t["pair_id"]: t["flipped"] for t in truth if "pair_id" in t}
    for r in rows:
        by_level.setdefault(r["strength"], []).append(flips[r["pair_id"]])
    share = {k: sum(v) / len(v) for k, v in by_level.items()}
    assert share["significantly_better"] <= 0.04, share
    assert share["negligibly_better"] >= 0.28, share


def make_model(tmp_path, name, seed):
    """A tiny random chat model artifact: model.safetensors, model_config.json, hf/tokenizer.model."""
    d = tmp_path / name / f"{seed:016x}"
    (d / "hf").mkdir(parents=True)
    tok = train_tiny_tokenizer(tmp_path / f"sp-{name}", WORDS)
    (d / "hf" / "tokenizer.model").write_bytes(tok.model_path.read_bytes())
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=tok.vocab_size, multiple_of=16, max_seq_len=96)
    torch.manual_seed(seed)
    m = Transformer(cfg)
    m.init_weights(std=0.2)  # peaky distributions: varied samples of different lengths
    save_file(m.state_dict(), str(d / "model.safetensors"))
    (d / "model_config.json").write_text(cfg.model_dump_json())
    return Artifact(name, d.name, d)


def run_step(tmp_path, out, model, iteration, previous=None, **overrides):
    args = [f"annotate.{k}={v}" for k, v in {"sampler": "null", "world_prompts": 120, "max_new_tokens": 12,
                                              "sources": "[]", **overrides}.items()]
    cfg = load_config(None, args)
    ctx = StepContext(cfg, StepSpec(f"annotate_v{iteration}", annotate, "rlhf", ("annotate",)),
                      tmp_path / out, tmp_path / f"{out}-work", None, None)
    ctx.out_dir.mkdir(parents=True)
    return ctx.out_dir, annotate.run(ctx, model, iteration, previous)


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("annotate")
    sft, older = make_model(tmp, "sft", 1), make_model(tmp, "rs_v1", 2)
    return {"a": run_step(tmp, "a", sft, 1), "b": run_step(tmp, "b", sft, 1),
            "v2": run_step(tmp, "v2", older, 2, previous=sft)}


def rows_of(folder):
    if (folder / "batch").is_dir():
        folder = folder / "batch"
    return [json.loads(line) for line in (folder / "part-00000.jsonl").read_text().splitlines()]


def test_batch_is_valid_under_the_contract(batches):
    from steps.preference_store import read_batch

    for (out, metrics), name in [(b, n) for b in batches.values() for n in ("batch", "test")]:
        folder, prefix = (out / "batch", "") if name == "batch" else (out / "heldout" / name, f"heldout.{name}.")
        metrics = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}
        assert sorted(p.name for p in folder.iterdir()) == ["_SUCCESS", "part-00000.jsonl"]
        rows = rows_of(folder)
        assert len(rows) == metrics["pairs"] > 20
        checked = read_batch(str(folder), "contract", 20_000)  # the ingestion's own validation
        assert checked.problems() == [] and len(checked.valid) == len(rows)
        for r in rows:
            assert set(r) <= set(CONTRACT_FIELDS) and r["strength"] in STRENGTHS and r["source"] == "vendor"
            assert (r["axis"] == "safety") == ("safety_label" in r) and r.get("safety_label", SAFETY_LABELS[0]) \
                in SAFETY_LABELS
        assert len({r["pair_id"] for r in rows}) == len(rows)
        counts = Counter(r["axis"] for r in rows)
        assert counts["safety"] > 0 and counts["helpfulness"] > 0
        assert metrics["axis.safety"] == counts["safety"] and sum(metrics[f"strength.{s}"] for s in STRENGTHS) \
            == len(rows)


def test_labels_agree_with_the_judge(batches, world):
    out, _ = batches["a"]
    for name, split in (("batch", "train"), ("test", "test"), ("validation", "validation")):
        folder = out / ("batch" if name == "batch" else f"heldout/{name}")
        lines = (out / "labels" / f"{name}.jsonl").read_text().splitlines()
        truth = {json.loads(t).get("pair_id"): json.loads(t) for t in lines}
        prompts = {json.dumps(annotate.prompt_field(it.dialogue)): it for it in world.items(split)}
        rows = rows_of(folder)
        for r in rows:
            item = prompts[json.dumps(r["prompt"])]  # every prompt is one of its split's
            c, j = judge(item, r["chosen"])["helpfulness"], judge(item, r["rejected"])["helpfulness"]
            assert (c > j) != truth[r["pair_id"]]["flipped"], r
        flips = sum(truth[r["pair_id"]]["flipped"] for r in rows)
        assert (flips > 0) == (name == "batch")  # held-out pairs carry the true preference


def test_deterministic_given_seed_and_iteration(batches):
    (a, ma), (b, mb), (v2, _) = batches["a"], batches["b"], batches["v2"]
    assert (a / "batch" / "part-00000.jsonl").read_bytes() == (b / "batch" / "part-00000.jsonl").read_bytes()
    assert ma == mb
    assert not {r["pair_id"] for r in rows_of(a)} & {r["pair_id"] for r in rows_of(v2)}  # ids never repeat


def test_second_responses_from_the_previous_model(batches):
    out, metrics = batches["v2"]
    assert metrics["other_model_pairs"] > 0
    models = Counter(m.split(" ")[0] for r in rows_of(out) for m in (r["model_chosen"], r["model_rejected"]))
    assert set(models) == {"rs_v1@00000000", "sft@00000000"}, models
    assert all(r["annotated_at"].startswith("2026-01-12") for r in rows_of(out))  # a week after batch 1


def test_prompts_repeat_safety_prompts_and_add_dialogue_files(tmp_path, world):
    data = [{"instruction": "Name a colour.", "input": "", "output": "Red is a colour."},
            {"instruction": "Summarise this. " + "word " * 300, "input": "", "output": "Too long."},
            {"instruction": "Say hello.", "input": "", "output": "Hello!"}]
    (tmp_path / "alpaca.json").write_text(json.dumps(data))
    acfg = annotate.AnnotateConfig(world_prompts=10_000, safety_repeats=3, sources=[str(tmp_path / "alpaca.json")],
                                   source_prompts=5)
    items = annotate.prompts(acfg, world, random.Random(0), lambda d: len(d.turns[-1].content) < 500)
    train = Counter(i.kind for i in world.items("train"))
    got = Counter(i.kind for i in items)
    assert got["unsafe"] == 3 * train["unsafe"] and got["lookalike"] == 3 * train["lookalike"]
    assert got["arithmetic"] == train["arithmetic"] and got["open"] == 2  # the over-long prompt is left out
    opened = [i for i in items if i.kind == "open"]
    assert {i.answer for i in opened} == {"Red is a colour.", "Hello!"}
    assert items != annotate.prompts(acfg, world, random.Random(1), lambda d: True)  # seeded order


def test_batches_of_two_iterations_are_ingested_whole(batches, tmp_path):
    from steps.preference_store import PreferenceStore
    from steps.preferences import PreferenceConfig

    store = PreferenceStore(tmp_path / "store")
    for key in ("a", "v2"):
        out, metrics = batches[key]
        result = store.ingest(str(out / "batch"), PreferenceConfig(on_error="fail"))
        assert result.status == "ingested", result
    assert store.pairs([b["version"] for b in store.batches()]).num_rows == \
        batches["a"][1]["pairs"] + batches["v2"][1]["pairs"]


@pytest.mark.slow
def test_sampling_on_a_ray_worker_gives_the_same_batch(ray_local, tmp_path):
    sft = make_model(tmp_path, "sft", 1)
    small = {"world_prompts": 40, "heldout": "false"}
    local, _ = run_step(tmp_path, "local", sft, 1, **small)
    remote, metrics = run_step(tmp_path, "remote", sft, 1, sampler="{num_cpus: 1, num_gpus: 0}", **small)
    assert metrics["pairs"] > 0
    assert (local / "batch" / "part-00000.jsonl").read_bytes() == (remote / "batch" / "part-00000.jsonl").read_bytes()
