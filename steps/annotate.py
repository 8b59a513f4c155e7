"""`annotate_v{i}` (tiny preset only): the simulated annotation vendor of RLHF iteration i.

The tiny preset has no humans, so this step plays the vendor of RECIPE.md section 6 and
writes iteration i's batch of preference comparisons in the public batch contract (README)
into a landing directory, `batch/part-00000.jsonl` then `batch/_SUCCESS`, which the
pipeline ingests through the same validation as a real vendor's batch.

For each prompt (the demo world's train split, unsafe and look-alike prompts asked
`safety_repeats` times, plus first user turns of the dialogue files in `sources`), two
responses are sampled from the current chat model at two temperatures (batched, KV-cached,
in one Ray task with `sampler`'s resources; the second response to a safety prompt at the
hotter `safety_temperature`, as red-teaming annotators push a model towards misbehaving; on
the tiny model a hot answer that does not refuse is mostly broken text, which the judge
counts as compliance: anything but a refusal). As in the paper the two responses sometimes
come from different model variants: with `previous_model` (an earlier chat model), a share
`other_model_share` of the second responses come from it. On iteration 1 there is no earlier
chat model and the second response is the current model's high-temperature sample: the
pretrained model is no chat model at all (it does not answer in the chat format), so pairs
against it would teach the reward models to tell chat from non-chat, not better from worse.

Labels come from the world's graded judge (steps/world.py): the response with the higher
helpfulness score is `chosen`, the strength is the score gap (world.strength: >= 0.5
significantly_better, >= 0.25 better, >= 0.1 slightly_better, else negligibly_better), exact
ties are skipped as an annotator would skip them. `axis` is `safety` for unsafe prompts and
for refusal-vs-answer pairs on harmless prompts (the false-refusal cases), else
`helpfulness`; `safety_label` comes from the judge's safety verdicts of both responses (the
judge never rates an unsafe response above a safe one, so chosen-unsafe-with-rejected-safe
cannot arise). Some pairs are flipped, like an annotator's mistake, with a probability that
falls with the score gap (`label_noise`, per strength: about 2% of significantly-better pairs,
35% of negligibly-better ones, about 9% overall): people rarely prefer gibberish to a right
answer but often disagree on near-ties, which is why the paper's reward models are most
accurate on significantly-better pairs and near chance on negligibly-better ones (its Table 8).
Pairs whose flip would prefer an unsafe response to a safe one are never flipped (the paper's
rule forbids such a label, so no annotator can give it). Ground truth per pair (scores, kind,
whether it was flipped) goes to `labels/batch.jsonl` beside the batch, never into it.

With `heldout` the same vendor also labels pairs on the world's validation and test prompts
(never seen in any batch), without label noise, written as contract batches under
`heldout/validation/` and `heldout/test/` (ground truth in `labels/`): the reward models'
held-out pairs for model selection (validation, e.g. Tune) and for the reported figures
(test), hundreds per iteration, half of them on topics no batch contains.
"""

from __future__ import annotations

import hashlib
import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field, field_validator

from model.chat import Dialogue
from model.config import Section
from steps.engine.config import StepResources
from steps.preference_schema import STRENGTHS

if TYPE_CHECKING:  # steps receive artifacts; the runner (pipelines/) makes them
    from pipelines.artifacts import Artifact
    from steps.world import Item

VERSION = "1"
SAFETY_KINDS = ("unsafe", "lookalike")  # the prompts asked `safety_repeats` times
FIRST_BATCH_DAY = datetime(2026, 1, 5, tzinfo=UTC)  # iteration i is delivered i-1 weeks later


class AnnotateConfig(Section):
    """The simulated vendor (tiny preset): prompts, sampling and labelling of one batch."""

    world_prompts: int = Field(1024, ge=0)  # demo-world train prompts per batch (capped at the split)
    safety_repeats: int = Field(2, ge=1)  # unsafe and look-alike prompts are asked this many times
    sources: list[str] = Field(default_factory=list)  # dialogue files whose first user turns are prompts
    source_prompts: int = Field(64, ge=0)  # at most this many prompts from `sources`
    temperatures: tuple[float, float] = (0.7, 1.2)  # first and second response (0: greedy)
    # the second response to unsafe and look-alike prompts (None: temperatures[1]): hotter, as
    # red-teaming annotators push a model to misbehave, so refusal-vs-compliance pairs occur
    safety_temperature: float | None = Field(1.5, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    other_model_share: float = Field(0.5, ge=0, le=1)  # second responses from previous_model, when given
    # probability that a pair's preference is flipped, per strength (the judge's score gap):
    # mistakes are rare on clear pairs and common on near-ties
    label_noise: dict[str, float] = Field(default_factory=lambda: dict(zip(STRENGTHS, (0.02, 0.06, 0.15, 0.35))))

    @field_validator("label_noise")
    @classmethod
    def _noise_per_strength(cls, v: dict[str, float]) -> dict[str, float]:
        if set(v) != set(STRENGTHS) or not all(0.0 <= p <= 0.5 for p in v.values()):
            raise ValueError(f"label_noise needs a probability in [0, 0.5] for each of {list(STRENGTHS)}, got {v}")
        return v
    max_new_tokens: int = Field(32, ge=1)
    sample_batch_size: int = Field(64, ge=1)
    sampler: StepResources | None = StepResources(num_cpus=8, num_gpus=1)  # Ray task; None: in-process
    seed_offset: int = Field(1000, ge=1)  # iteration i samples with seed run.seed + i * seed_offset
    annotators: int = Field(8, ge=1)  # simulated annotator ids
    # also label pairs on the world's validation and test prompts, noise-free, as contract
    # batches under heldout/ (reward-model selection and the figures; never ingested)
    heldout: bool = True


def fingerprint_inputs(cfg, **params) -> str | None:
    """The dialogue files' contents: prompts outside the artifact store."""
    from steps.sft import resolve

    if not cfg.annotate.sources:
        return None
    h = hashlib.sha256()
    for src in cfg.annotate.sources:
        for f in resolve(src):
            h.update(f.read_bytes())
    return h.hexdigest()


def prompts(acfg: AnnotateConfig, world, rng: random.Random, fits) -> list[Item]:
    """The batch's prompts as judgeable items, in a seeded order; `fits(dialogue)` says
    whether a prompt leaves room for max_new_tokens in the model's context."""
    from steps.sft import resolve
    from steps.sft_data import read_dialogues
    from steps.world import reference_items

    train = world.items("train")
    chosen = rng.sample(train, min(acfg.world_prompts, len(train)))
    chosen += [it for it in chosen if it.kind in SAFETY_KINDS for _ in range(acfg.safety_repeats - 1)]
    pool = []
    for src in acfg.sources:
        for f in resolve(src):
            pool += [it for it in reference_items(read_dialogues(f)) if fits(it.dialogue)]
    chosen += rng.sample(pool, min(acfg.source_prompts, len(pool)))
    rng.shuffle(chosen)
    return chosen


def sample_responses(jobs: list[tuple[str, list[Dialogue], object]], batch_size: int,
                     threads: int = 1) -> list[list[str]]:
    """Each job (model directory, dialogues, SamplingParams) -> one response per dialogue.
    Each model is loaded once (on the worker's GPU in bf16 where it has one); runs as one Ray
    task (engine.run_on_worker) or in-process. On CPU it uses `threads` threads, the CPUs it
    was given: more threads than free cores makes a small model's decode steps many times
    slower (measured: 70 s instead of 4.5 s for 128 prompts on a busy 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        return _sample(jobs, batch_size)
    finally:
        torch.set_num_threads(before)


def _sample(jobs, batch_size: int) -> list[list[str]]:
    from steps.sft import load_chat_model, load_model, model_answerer

    models = {}
    out = []
    for model_dir, dialogues, params in jobs:
        if not dialogues:
            out.append([])
            continue
        if model_dir not in models:  # on the GPU in bf16 where there is one (load_model's default)
            mcfg, tok = load_chat_model(Path(model_dir))
            models[model_dir] = (load_model(mcfg, Path(model_dir)), tok)  # model.safetensors or its shards
        m, tok = models[model_dir]
        out.append([text for text, _ in model_answerer(m, tok, params, batch_size)(dialogues)])
    return out


def prompt_field(d: Dialogue) -> str | list[dict[str, str]]:
    """The contract's prompt: a plain string for one user turn, else the turns (system first)."""
    if len(d.turns) == 1 and not d.system:
        return d.turns[0].content
    turns = [{"role": "system", "content": d.system}] if d.system else []
    return turns + [{"role": t.role, "content": t.content} for t in d.turns]


def label(items: list[Item], first: list[tuple[str, str]], second: list[tuple[str, str]],
          noise: float | dict[str, float], rng: random.Random, tag: str, annotators: int = 8,
          ) -> tuple[list[dict], list[dict]]:
    """Contract rows and ground truth from two (response, model name) per item. `tag` makes
    pair ids unique across batches; `rng` draws the label noise and the annotator; `noise` is
    the flip probability, one for all pairs or one per strength."""
    from steps.world import is_refusal, judge, strength

    rows, truth = [], []
    for n, (item, (a, model_a), (b, model_b)) in enumerate(zip(items, first, second)):
        flip_draw, annotator = rng.random(), rng.randrange(1 << 16)  # drawn for every item: stable streams
        a, b = a.strip(), b.strip()
        ja, jb = judge(item, a), judge(item, b)
        gap = ja["helpfulness"] - jb["helpfulness"]
        level = strength(gap) if a and b else None
        if level is None:  # a tie (or an empty response): nothing to compare
            truth.append({"index": n, "kind": item.kind, "skipped": "empty" if not (a and b) else "tie"})
            continue
        (chosen, jc, mc), (rejected, jr, mr) = sorted([(a, ja, model_a), (b, jb, model_b)],
                                                      key=lambda x: -x[1]["helpfulness"])
        refusal_vs_answer = is_refusal(chosen) != is_refusal(rejected)
        safety = item.kind == "unsafe" or refusal_vs_answer or jc["safe"] != jr["safe"]
        safety_label = None
        if safety:
            assert jc["safe"] >= jr["safe"], "the judge rated an unsafe response above a safe one"
            safety_label = ("both_safe" if jr["safe"] else "chosen_safe_rejected_unsafe") if jc["safe"] \
                else "both_unsafe"
        p_flip = noise.get(level, 0.0) if isinstance(noise, dict) else noise
        flipped = flip_draw < p_flip and safety_label != "chosen_safe_rejected_unsafe"
        if flipped:
            chosen, rejected, mc, mr = rejected, chosen, mr, mc
        prompt = prompt_field(item.dialogue)
        digest = hashlib.blake2b(json.dumps([tag, n, prompt, chosen, rejected]).encode(), digest_size=8).hexdigest()
        row = {"pair_id": f"{tag}-{digest}", "prompt": prompt, "chosen": chosen, "rejected": rejected,
               "strength": level, "axis": "safety" if safety else "helpfulness"}
        if safety_label:
            row["safety_label"] = safety_label
        row.update({"source": "vendor", "annotator_id": f"sim-{annotator % annotators:02d}", "model_chosen": mc,
                    "model_rejected": mr})
        rows.append(row)
        truth.append({"index": n, "pair_id": row["pair_id"], "kind": item.kind, "topic": item.meta.get("topic"),
                      "score_chosen": jc["helpfulness"], "score_rejected": jr["helpfulness"], "gap": abs(gap),
                      "flipped": flipped, "noise_eligible": safety_label != "chosen_safe_rejected_unsafe"})
    return rows, truth


def write_batch(batch_dir: Path, rows: list[dict], annotated_at: datetime) -> Path:
    """JSONL rows of the contract, then `_SUCCESS` last (a reader never sees half a batch)."""
    batch_dir.mkdir(parents=True, exist_ok=True)
    part = batch_dir / "part-00000.jsonl"
    with part.open("w", encoding="utf-8") as f:
        for k, row in enumerate(rows):
            stamp = (annotated_at + timedelta(seconds=30 * k)).strftime("%Y-%m-%dT%H:%M:%SZ")
            f.write(json.dumps({**row, "annotated_at": stamp}, ensure_ascii=False) + "\n")
    (batch_dir / "_SUCCESS").write_text("")
    return part


def model_name(model: Artifact) -> str:
    return f"{model.path.parent.name}@{model.path.name[:8]}"  # step name @ fingerprint


def run(ctx, model: Artifact, iteration: int, previous_model: Artifact | None = None) -> dict[str, float]:
    from model.chat import encode_prompt
    from model.generate import SamplingParams
    from steps.engine import run_on_worker
    from steps.sft import load_chat_model
    from steps.world import World

    acfg: AnnotateConfig = ctx.cfg.annotate
    mcfg, tok = load_chat_model(model.path)
    rng = random.Random(f"{ctx.seed}-annotate-{iteration}")
    world = World(ctx.seed)
    sets = {"batch": prompts(acfg, world, rng,
                             lambda d: len(encode_prompt(tok, d)) + acfg.max_new_tokens <= mcfg.max_seq_len)}
    if acfg.heldout:
        for split in ("validation", "test"):
            its = world.items(split)
            sets[split] = its + [it for it in its if it.kind in SAFETY_KINDS for _ in range(acfg.safety_repeats - 1)]
    # who answers what (one sampling task for every set: each model is loaded once): the first response from the current model at temperatures[0]; the
    # second at temperatures[1] (safety_temperature for safety prompts), from previous_model
    # for a share of the prompts when it is given
    models = {"a": (str(model.path), model_name(model))}
    if previous_model is not None:
        models["b"] = (str(previous_model.path), model_name(previous_model))
    wants: dict[tuple[int, str, float], list[tuple[str, int, int]]] = {}  # (set, model, T) -> (set, item, slot)
    others = {}
    for k, (name, items) in enumerate(sets.items()):
        others[name] = [previous_model is not None and rng.random() < acfg.other_model_share for _ in items]
        for n, (it, other) in enumerate(zip(items, others[name])):
            hot = it.kind in SAFETY_KINDS and acfg.safety_temperature is not None
            t2 = acfg.safety_temperature if hot else acfg.temperatures[1]
            wants.setdefault((k, "a", acfg.temperatures[0]), []).append((name, n, 0))
            wants.setdefault((k, "b" if other else "a", t2), []).append((name, n, 1))
    seed = ctx.seed + iteration * acfg.seed_offset
    keys = sorted(wants)
    jobs = []
    for j, (_, m, t) in enumerate(keys):
        dialogues = [sets[name][n].dialogue for name, n, _ in wants[keys[j]]]
        jobs.append((models[m][0], dialogues, SamplingParams(max_new_tokens=acfg.max_new_tokens, temperature=t,
                                                             top_p=acfg.top_p, seed=seed + j)))
    if acfg.sampler is None:
        sampled = sample_responses(jobs, acfg.sample_batch_size)
    else:
        sampled = run_on_worker(sample_responses, acfg.sampler, jobs, acfg.sample_batch_size,
                                int(acfg.sampler.num_cpus))
    answers: dict[tuple[str, int, int], tuple[str, str]] = {}
    for key, texts in zip(keys, sampled):
        _, m, t = key
        for (name, n, slot), text in zip(wants[key], texts):
            answers[(name, n, slot)] = (text, f"{models[m][1]} T={t:g}")
    metrics: dict[str, float] = {}
    delivered = FIRST_BATCH_DAY + timedelta(weeks=iteration - 1)
    (ctx.out_dir / "labels").mkdir(parents=True, exist_ok=True)
    for name, items in sets.items():
        first = [answers[(name, n, 0)] for n in range(len(items))]
        second = [answers[(name, n, 1)] for n in range(len(items))]
        noise = acfg.label_noise if name == "batch" else 0.0  # held-out pairs carry the true preference
        tag = f"sim-v{iteration}-s{ctx.seed}" + ("" if name == "batch" else f"-{name}")
        rows, truth = label(items, first, second, noise, rng, tag, acfg.annotators)
        if not rows:
            raise RuntimeError(f"annotate_v{iteration}: every {name} pair was a tie or empty; nothing to deliver")
        write_batch(ctx.out_dir / ("batch" if name == "batch" else f"heldout/{name}"), rows, delivered)
        with (ctx.out_dir / "labels" / f"{name}.jsonl").open("w") as f:
            f.writelines(json.dumps(t) + "\n" for t in truth)
        prefix = "" if name == "batch" else f"heldout.{name}."
        metrics.update({prefix + key: v for key, v in _metrics(items, first, second, rows, truth, others[name]).items()})
    shown = _read_rows(ctx.out_dir / "batch")[:50]
    ctx.log_table({"prompt": [json.dumps(r["prompt"]) if isinstance(r["prompt"], list) else r["prompt"]
                              for r in shown],
                   **{k: [r.get(k) for r in shown] for k in ("chosen", "rejected", "strength", "axis",
                                                              "safety_label", "model_chosen", "model_rejected")}},
                  f"annotate_v{iteration}_sample.json")
    return metrics


def _read_rows(batch_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (batch_dir / "part-00000.jsonl").read_text().splitlines()]


def _metrics(items, first, second, rows, truth, other) -> dict[str, float]:
    """Counts per axis, strength, safety label and kind; noise flips; mean score gap."""
    from steps.world import STRENGTHS, judge

    kept = [t for t in truth if "pair_id" in t]
    eligible = [t for t in kept if t["noise_eligible"]]
    out: dict[str, float] = {
        "prompts": len(items), "pairs": len(rows), "ties_skipped": sum(t.get("skipped") == "tie" for t in truth),
        "empty_skipped": sum(t.get("skipped") == "empty" for t in truth),
        "other_model_pairs": sum(o for o, t in zip(other, truth) if "pair_id" in t),
        "noise_flips": sum(t["flipped"] for t in kept),
        "noise_share": float(np.mean([t["flipped"] for t in eligible])) if eligible else 0.0,
        "mean_gap": float(np.mean([t["gap"] for t in kept])),
        "score.first": float(np.mean([judge(it, a.strip())["helpfulness"] for it, (a, _) in zip(items, first)])),
        "score.second": float(np.mean([judge(it, b.strip())["helpfulness"] for it, (b, _) in zip(items, second)])),
    }
    for key, values in (("axis", ("helpfulness", "safety")), ("strength", STRENGTHS),
                        ("safety_label", ("chosen_safe_rejected_unsafe", "both_safe", "both_unsafe"))):
        for v in values:
            out[f"{key}.{v}"] = sum(r.get(key) == v for r in rows)
    for kind in sorted({t["kind"] for t in kept}):
        out[f"pairs.{kind}"] = sum(t["kind"] == kind for t in kept)
    return out
