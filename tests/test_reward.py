"""Reward models: margin loss, data mixes, the last-token head, HF export, training on the engine."""

import math
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from model.config import ModelConfig
from steps.preference_schema import PAIR_SCHEMA, STRENGTHS, pair_split
from steps.reward import (
    MARGINS,
    RewardConfig,
    collate_pairs,
    mix_pairs,
    pair_loss,
    ranking_loss,
    split_validation,
)
from tests.conftest import train_tiny_tokenizer

WORDS = ("the a cat dog runs sits on mat red blue green apple pear tree house river hill big small "
         "quick slow bird fish sings swims")


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_margin_loss_on_hand_computed_values():
    r_c = torch.tensor([2.0, 0.5, 0.0, 1.0])
    r_r = torch.tensor([0.0, 0.5, 1.0, 1.0])
    strength = torch.tensor([0, 1, 2, 3])  # significantly, better, slightly, negligibly
    # -log(sigmoid(gap - m)) = log(1 + exp(m - gap)); gaps 2, 0, -1, 0
    for name, expect in {
        "none": [softplus(-2), softplus(0), softplus(1), softplus(0)],
        "small": [softplus(1 - 2), softplus(2 / 3), softplus(1 / 3 + 1), softplus(0)],
        "large": [softplus(3 - 2), softplus(2), softplus(1 + 1), softplus(0)],
    }.items():
        m = torch.tensor(MARGINS[name])[strength]
        assert ranking_loss(r_c, r_r, m).item() == pytest.approx(sum(expect), rel=1e-6)
    assert MARGINS["small"] == pytest.approx((1, 2 / 3, 1 / 3, 0)) and MARGINS["large"] == (3, 2, 1, 0)

    # pair_loss: chosen rows first, rejected after, in one micro-batch; a SUM and a count of right pairs
    rewards = torch.cat([r_c, r_r])
    loss, metrics = pair_loss(lambda tokens, lengths: rewards, {"tokens": torch.zeros(8, 3), "lengths": None,
                                                                 "strength": strength}, MARGINS["large"])
    assert loss.item() == pytest.approx(softplus(1) + 2 * softplus(2) + softplus(0), rel=1e-6)
    assert metrics == {"accuracy": 1.0}  # only the first pair is ranked strictly right
    # stays finite where the naive -log(sigmoid(.)) overflows
    assert math.isfinite(ranking_loss(torch.tensor([-200.0]), torch.tensor([200.0]), torch.tensor([3.0])).item())


def _pair(i: int, axis: str, source: str, split: str = "train") -> dict:
    return {"pair_id": f"{source}-{axis}-{i}", "prompt": [{"role": "user", "content": f"q{i}"}],
            "chosen": "good", "rejected": "bad", "strength": STRENGTHS[i % 4], "axis": axis,
            "safety_label": "both_safe" if axis == "safety" else None, "source": source, "annotator_id": None,
            "annotated_at": None, "model_chosen": None, "model_rejected": None, "batch": "0001-abc",
            "split": split}


def test_mixes_follow_the_papers_proportions():
    rows = ([_pair(i, "helpfulness", "vendor") for i in range(200)] + [_pair(i, "safety", "vendor") for i in range(100)]
            + [_pair(i, "helpfulness", "anthropic-hh") for i in range(150)]
            + [_pair(i, "safety", "anthropic-hh") for i in range(150)])
    pa.Table.from_pylist(rows, schema=PAIR_SCHEMA)  # the generated rows are valid pairs-table rows
    cfg = RewardConfig()

    helpful, stats = mix_pairs(rows, "helpfulness", cfg, seed=0)
    ids = [r["pair_id"] for r in helpful]
    assert len(ids) == len(set(ids)) == 400  # all 200 of ours + an equal amount, never duplicated
    core = [r for r in helpful if r["axis"] == "helpfulness" and r["source"] == "vendor"]
    other = [r for r in helpful if not (r["axis"] == "helpfulness" and r["source"] == "vendor")]
    assert len(core) == 200 and len(other) == 200 and stats["data.other_share"] == 0.5
    # drawn uniformly from {our safety} U {open-source}: 100 of the 400 pool pairs are our safety ones
    ours_safety = sum(r["source"] == "vendor" for r in other)
    assert 30 <= ours_safety <= 70  # hypergeometric mean 50, sd ~6

    safety, stats = mix_pairs(rows, "safety", cfg, seed=0)
    core = [r for r in safety if r["axis"] == "safety"]
    helpful_part = [r for r in safety if r["axis"] == "helpfulness"]
    assert len(core) == 250  # every safety pair: ours (100) + open-source harmless (150)
    assert len(helpful_part) == round(250 / 9)  # 90/10
    assert stats["data.other_share"] == pytest.approx(0.1, abs=0.005)
    assert {r["source"] for r in helpful_part} == {"vendor", "anthropic-hh"}  # ours and open-source

    # a pool smaller than the amount asked for is taken whole and the share says so
    small, stats = mix_pairs(rows[:300], "helpfulness", cfg, seed=0)
    assert stats["data.other_pairs"] == 100 and stats["data.other_share"] == pytest.approx(1 / 3)
    # the mix is a function of the rows and the seed
    assert [r["pair_id"] for r in mix_pairs(rows, "safety", cfg, seed=0)[0]] == [r["pair_id"] for r in safety]


def test_demo_world_pairs_are_open_source_safety_data_with_false_refusals():
    from steps.reward import world_pairs
    from steps.world import World, is_refusal

    rows = world_pairs(0)
    pa.Table.from_pylist(rows, schema=PAIR_SCHEMA)
    assert {r["source"] for r in rows} == {"demo-world"} and {r["split"] for r in rows} == {"train"}
    train_prompts = {it.dialogue.turns[-1].content for it in World(0).items("train")}
    assert all(r["prompt"][-1]["content"] in train_prompts for r in rows)  # never the test split
    false_refusals = [r for r in rows if is_refusal(r["rejected"])]
    assert false_refusals and all(r["axis"] == "safety" and not is_refusal(r["chosen"]) for r in false_refusals)
    # in the safety RM's mix they count as open-source harmless data (core), not as the 10% share
    mixed, stats = mix_pairs(rows + [_pair(i, "helpfulness", "vendor") for i in range(100)], "safety", RewardConfig(), 0)
    assert stats["data.core_pairs"] == sum(r["axis"] == "safety" for r in rows)


def test_validation_share_is_disjoint_from_eval_and_fixed():
    rows = [_pair(i, "helpfulness", "vendor") for i in range(2000)]
    fit, val = split_validation(rows, 0.1)
    assert len(fit) + len(val) == 2000 and 150 < len(val) < 250
    assert not {r["pair_id"] for r in fit} & {r["pair_id"] for r in val}
    # uncorrelated with the eval split's hash: about 10% of any eval-like subset lands in validation
    evalish = {r["pair_id"] for r in rows if pair_split(r["pair_id"], 0.2) == "eval"}
    assert 0.05 < len(evalish & {r["pair_id"] for r in val}) / len(evalish) < 0.15
    assert split_validation(rows, 0.1)[1] == val


def _tiny_cfg(vocab: int) -> ModelConfig:
    return ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=16, max_seq_len=64)


def _random_rm(cfg: ModelConfig):
    from model.reward import RewardModel

    torch.manual_seed(0)
    model = RewardModel(cfg)
    torch.nn.init.normal_(model.score.weight, std=0.5)  # a trained head: scores must differ
    return model.eval()


def test_last_token_head_is_padding_aware():
    from model.reward import RewardModel, pad_right

    cfg = _tiny_cfg(100)
    assert torch.count_nonzero(RewardModel(cfg).score.weight) == 0  # zero-initialised head
    assert not hasattr(RewardModel(cfg), "output")  # no LM head
    model = _random_rm(cfg)
    seqs = [[1, 5, 9, 2], [1, 7, 2], [1, 4, 4, 8, 11, 12, 2]]
    alone = torch.stack([model(torch.tensor([s]))[0] for s in seqs])
    tokens, lengths = pad_right(seqs, pad_id=3)
    with torch.no_grad():
        batched = model(tokens, lengths)
        assert torch.allclose(batched, alone, atol=1e-5)
        # whatever sits in the padding does not matter; the last real token does
        garbage = tokens.clone()
        garbage[0, 4:], garbage[1, 3:] = 50, 60
        assert torch.allclose(model(garbage, lengths), alone, atol=1e-5)
        changed = tokens.clone()
        changed[1, 2] = 9
        assert abs(model(changed, lengths)[1] - alone[1]) > 1e-4
    # collate: B pairs -> 2B rows, chosen first
    rows = {"chosen": np.array([np.array(seqs[0]), np.array(seqs[1])], dtype=object),
            "rejected": np.array([np.array(seqs[2]), np.array(seqs[0])], dtype=object), "strength_id": np.array([0, 3])}
    batch = collate_pairs(rows, pad_id=3)
    assert batch["tokens"].shape == (4, 7) and batch["lengths"].tolist() == [4, 3, 7, 4]
    assert batch["strength"].tolist() == [0, 3]


def _chat_model_dir(tmp_path: Path, tok, cfg: ModelConfig) -> Path:
    """A chat-model artifact as steps/sft.py writes it: model.safetensors, model_config.json, hf/."""
    from safetensors.torch import save_file

    from model.hf import export_hf
    from model.llama import Transformer

    d = tmp_path / "chat"
    d.mkdir()
    torch.manual_seed(1)
    state = {k: v.contiguous() for k, v in Transformer(cfg).state_dict().items()}
    save_file(state, str(d / "model.safetensors"))
    (d / "model_config.json").write_text(cfg.model_dump_json())
    export_hf(state, cfg, d / "hf", tokenizer_model=tok.model_path)
    return d


def test_hf_export_gives_our_scores(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    from model.chat import Dialogue, Turn
    from model.reward import encode_example, export_hf_reward, pad_right

    tok = train_tiny_tokenizer(tmp_path, WORDS)
    cfg = _tiny_cfg(tok.vocab_size)
    chat = _chat_model_dir(tmp_path, tok, cfg)
    model = _random_rm(cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "rm.safetensors"))
    out = export_hf_reward(tmp_path / "rm.safetensors", cfg, tmp_path / "hf", chat / "hf", tok.pad_id)

    prompts = [Dialogue([Turn("user", "the cat sits on the mat")]),
               Dialogue([Turn("user", "big red house"), Turn("assistant", "a river"), Turn("user", "quick bird")])]
    seqs = [encode_example(tok, p, r, 64)[0] for p in prompts for r in ("the dog runs", "apple")]
    tokens, lengths = pad_right(seqs, tok.pad_id)
    with torch.no_grad():
        ours = model(tokens, lengths)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1
    assert hf.config.pad_token_id == tok.pad_id
    with torch.no_grad():
        theirs = hf(input_ids=tokens, attention_mask=(tokens != tok.pad_id).long()).logits[:, 0]
    assert torch.allclose(ours, theirs, atol=1e-4), (ours, theirs)
    assert ours.std() > 1e-3  # the comparison is between distinct scores
    assert transformers.AutoTokenizer.from_pretrained(str(out)).pad_token_id == tok.pad_id


def _learnable_pairs(n: int, seed: int) -> list[dict]:
    """Chosen answers contain 'apple' somewhere; rejected ones never do. Strength: random."""
    rng = random.Random(seed)
    vocab = [w for w in WORDS.split() if w != "apple"]
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choice(vocab) for _ in range(rng.randint(3, 6)))
        words = [rng.choice(vocab) for _ in range(rng.randint(3, 7))]
        chosen = list(words)
        chosen.insert(rng.randint(0, len(words)), "apple")
        rejected = [rng.choice(vocab) for _ in range(rng.randint(3, 7))]
        axis = "helpfulness" if i % 5 else "safety"
        pid = f"p{seed}-{i}"
        rows.append({**_pair(i, axis, "vendor"), "pair_id": pid, "prompt": [{"role": "user", "content": prompt}],
                     "chosen": " ".join(chosen), "rejected": " ".join(rejected), "strength": rng.choice(STRENGTHS),
                     "split": pair_split(pid, 0.2)})
    return rows


def run_rm_step(tmp_path: Path, axis: str, overrides: list[str], tracked: bool = False):
    """The reward step as the runner calls it, on a generated learnable pairs table and a
    random-init chat model: mix, tokenize, ZeRO-3 training on the engine (one worker),
    evaluation per strength, HF export, registry."""
    from pipelines.artifacts import Artifact
    from pipelines.config import load_config
    from pipelines.runner import StepContext, StepSpec
    from pipelines.tracking import Tracking, setup_experiment, start_run
    from steps import reward

    tok = train_tiny_tokenizer(tmp_path, WORDS)
    chat = _chat_model_dir(tmp_path, tok, _tiny_cfg(tok.vocab_size))
    prefs = tmp_path / "prefs"
    prefs.mkdir()
    pq.write_table(pa.Table.from_pylist(_learnable_pairs(600, 0), schema=PAIR_SCHEMA), prefs / "pairs.parquet")
    cfg = load_config(None, [
        f"run.output_dir={tmp_path}", "reward.train.num_workers=1", "reward.train.cpus_per_worker=0.9",
        "reward.train.global_batch_size=16", "reward.train.micro_batch_size=16", "reward.train.epochs=3",
        "reward.train.checkpoint_every=1000", "reward.train.log_every=10", "reward.train.eval_every=1000",
        "reward.optim.lr=3e-3", "reward.optim.warmup_steps=5", "reward.optim.warmup_fraction=null",
        "reward.seq_len=64", "reward.scorer.num_cpus=1", "reward.scorer.num_gpus=0", "reward.world_eval=false",
        "reward.demo_world_pairs=false", "reward.tune.enabled=false", *overrides])
    tracking, run_id = None, None
    if tracked:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        tracking = Tracking(uri, setup_experiment(uri, "rm-test", tmp_path / "mlartifacts"))
        run_id = start_run(tracking, f"rm_{axis}_v1", {})
    spec = StepSpec(f"rm_{axis}_v1", reward, "reward", ("reward",), params={"axis": axis})
    out = tmp_path / "out"
    out.mkdir()
    ctx = StepContext(cfg, spec, out, tmp_path / "work", tracking, run_id)
    metrics = reward.run(ctx, Artifact("prefs_v1", "x", prefs), Artifact("sft", "y", chat), axis=axis)
    return metrics, out, tracking, run_id


@pytest.mark.slow
def test_rm_learns_a_preference_on_the_engine(tmp_path, ray_local):
    metrics, out, _, _ = run_rm_step(tmp_path, "helpfulness", [])
    assert metrics["eval.pairs"] > 60
    assert metrics["accuracy"] >= 0.8, metrics  # chance is 0.5
    assert metrics["data.core_pairs"] > 0 and metrics["data.other_pairs"] > 0
    assert (out / "hf" / "config.json").exists() and (out / "model.safetensors").exists()
    assert (out / "model_config.json").exists()
