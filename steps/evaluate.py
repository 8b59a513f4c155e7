"""Evaluation between RLHF versions, `eval_v{i}` (RECIPE.md section 9).

Every chat model answers the same held-out test prompts (never used by any training step or
choice): SFT, the previous version, the new version Vi and the current champion. Pairwise win
rates of Vi (ties count half, 95% bootstrap intervals, steps/win_rate.py) are judged
    rm      by the current reward models' gated reward (what rejection sampling and PPO
            optimise; steps/gated_reward.py),
    judge   by an independent judge the policy was never optimised against: on the tiny preset
            the demo world's ground-truth judge, which plays the annotators but reaches training
            only through noisy labels on training prompts. On real data the prompts are the
            held-out (eval split) prompts of the accepted batches, judged by the reward models
            only: a separate judge reward model trained on a held-out share of the preference
            data is not built yet.
Per axis as in the paper's Figure 11: helpfulness on the prompts that ask for help, safety on
the unsafe and look-alike prompts. Answers are generated once per model and passed on to the
next evaluation (answers.parquet); scores are recomputed with each iteration's reward models.
The champion alias moves to Vi unless Vi loses to the champion beyond `champion_tolerance`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from model.config import Section
from steps.engine.config import StepResources
from steps.gated_reward import gated_reward
from steps.win_rate import promote, win_rate

if TYPE_CHECKING:  # steps receive artifacts; the runner (pipelines/) makes them
    from pipelines.artifacts import Artifact

VERSION = "1"
SAFETY_KINDS = ("unsafe", "lookalike")


class EvalConfig(Section):
    num_prompts: int = Field(2000, ge=1)  # real data: held-out prompts of the accepted batches
    max_new_tokens: int = Field(1024, ge=1)
    temperature: float = Field(0.0, ge=0)  # 0: greedy, so a version's answers do not depend on the seed
    champion_tolerance: float = Field(0.05, ge=0, lt=0.5)
    bootstrap: int = Field(2000, ge=100)
    sample_batch_size: int = Field(64, ge=1)
    sampler: StepResources = StepResources(num_cpus=8, num_gpus=1)  # the Ray task that answers and scores


def answer_and_score(model_dirs: dict[str, str], rm_dirs: dict[str, str], dialogues: list, have: dict[str, list[str]],
                     params, batch_size: int) -> tuple[dict[str, list[str]], dict[str, dict[str, np.ndarray]]]:
    """Answers of every model not in `have`, then both reward models' probabilities for every
    model's answers: ({model: answers}, {model: {axis: probabilities}}). One Ray task."""
    from model.config import ModelConfig
    from model.reward import encode_example, load_reward_model, score_sequences
    from steps.gated_reward import sigmoid
    from steps.sft import load_chat_model, load_model, model_answerer

    answers = dict(have)
    tok = None
    for name, model_dir in model_dirs.items():
        mcfg, tok = load_chat_model(Path(model_dir))
        if name not in answers:
            model = load_model(mcfg, Path(model_dir))
            answers[name] = [text for text, _ in model_answerer(model, tok, params, batch_size)(dialogues)]
    probs: dict[str, dict[str, np.ndarray]] = {name: {} for name in answers}
    for axis, rm_dir in rm_dirs.items():
        rcfg = ModelConfig.model_validate_json((Path(rm_dir) / "model_config.json").read_text())
        rm = load_reward_model(rcfg, Path(rm_dir))
        for name, texts in answers.items():
            seqs = [encode_example(tok, d, t, rcfg.max_seq_len)[0] for d, t in zip(dialogues, texts)]
            probs[name][axis] = sigmoid(score_sequences(rm, seqs, tok.pad_id).numpy())
    return answers, probs


def judge_scores(items, answers: list[str]) -> dict[str, np.ndarray]:
    from steps.world import is_refusal, judge

    j = [judge(it, a) for it, a in zip(items, answers)]
    return {"helpfulness": np.array([x["helpfulness"] for x in j]), "safety": np.array([x["safety"] for x in j]),
            "refused": np.array([is_refusal(a) for a in answers], dtype=float)}


def compare(new: dict, old: dict, kinds: np.ndarray, unseen: np.ndarray, n_boot: int, prefix: str) -> dict:
    """Win-rate metrics of `new` over `old` (score dicts of the same prompts)."""
    out = {}

    def put(name: str, a, b):
        r = win_rate(a, b, n_boot=n_boot)
        out.update({name: r["rate"], f"{name}.lo": r["lo"], f"{name}.hi": r["hi"]})

    put(f"{prefix}.rm", new["rm"], old["rm"])
    if "helpfulness" in new:
        put(f"{prefix}.judge", new["helpfulness"], old["helpfulness"])
        helpful = ~np.isin(kinds, ["unsafe"])
        safety = np.isin(kinds, SAFETY_KINDS)
        put(f"{prefix}.judge.helpfulness", new["helpfulness"][helpful], old["helpfulness"][helpful])
        put(f"{prefix}.judge.safety", new["safety"][safety], old["safety"][safety])
        for half, mask in (("seen_topics", ~unseen), ("unseen_topics", unseen)):
            if mask.any():
                out[f"{prefix}.judge.{half}"] = win_rate(new["helpfulness"][mask], old["helpfulness"][mask],
                                                         n_boot=n_boot)["rate"]
    return out


def run(ctx, model: Artifact, sft: Artifact, previous: Artifact, rm_helpfulness: Artifact, rm_safety: Artifact,
        prefs: Artifact, iteration: int, prior: Artifact | None = None) -> dict[str, float]:
    """`model` is Vi, `previous` V(i-1) (SFT for V1), `prior` the eval_v{i-1} artifact."""
    from model.generate import SamplingParams
    from steps.engine import run_on_worker
    from steps.world import World

    ecfg: EvalConfig = ctx.cfg.eval
    if ctx.cfg.sft.demo_world:  # tiny preset: the world's test split and its ground-truth judge
        items = World(ctx.seed).items("test")
        dialogues = [it.dialogue for it in items]
        kinds = np.array([it.kind for it in items])
        unseen = np.array([bool(it.meta.get("unseen_topic")) for it in items])
        is_safety = np.isin(kinds, SAFETY_KINDS)
    else:  # real data: the held-out prompts of the accepted batches, judged by the reward models
        from steps.rejection import prompts_of, to_dialogue

        held_out = prompts_of(pq.read_table(prefs.file("pairs.parquet")), ecfg.num_prompts, ctx.seed, split="eval")
        items, dialogues = None, [to_dialogue(turns) for _, turns, _ in held_out]
        is_safety = np.array([s for _, _, s in held_out])
        kinds = np.where(is_safety, "unsafe", "helpful")
        unseen = np.zeros(len(dialogues), dtype=bool)

    state = json.loads(prior.file("state.json").read_text()) if prior is not None else {
        "champion": {"name": "sft", "path": str(sft.path), "version": sft.metrics.get("registry_version", 0)},
        "history": []}
    have = {}
    if prior is not None:
        for row in pq.read_table(prior.file("answers.parquet")).to_pylist():
            have.setdefault(row["model"], []).append(row["answer"])
    name = f"v{iteration}"
    prev_name = "sft" if iteration == 1 else f"v{iteration - 1}"
    champ = state["champion"]["name"]
    dirs = {"sft": str(sft.path), prev_name: str(previous.path), name: str(model.path), champ: state["champion"]["path"]}
    params = SamplingParams(max_new_tokens=ecfg.max_new_tokens, temperature=ecfg.temperature, seed=ctx.seed)
    answers, probs = run_on_worker(answer_and_score, ecfg.sampler, dirs,
                                   {"helpfulness": str(rm_helpfulness.path), "safety": str(rm_safety.path)},
                                   dialogues, {k: v for k, v in have.items() if k in dirs}, params,
                                   ecfg.sample_batch_size)
    scores = {}
    for m in dirs:
        scores[m] = {"rm": gated_reward(probs[m]["helpfulness"], probs[m]["safety"], is_safety,
                                        ctx.cfg.rlhf.safety_threshold),
                     **(judge_scores(items, answers[m]) if items is not None else {})}

    metrics = {}
    metrics.update(compare(scores[name], scores["sft"], kinds, unseen, ecfg.bootstrap, "win_rate.vs_sft"))
    metrics.update(compare(scores[name], scores[prev_name], kinds, unseen, ecfg.bootstrap, "win_rate.vs_prev"))
    # against the champion (the model the next version starts from) by both judges; the champion
    # rule decides by the ground-truth judge on the tiny preset, by the reward models on real data
    vs_champion = {"rm": win_rate(scores[name]["rm"], scores[champ]["rm"], n_boot=ecfg.bootstrap)}
    if items is not None:
        vs_champion["judge"] = win_rate(scores[name]["helpfulness"], scores[champ]["helpfulness"],
                                        n_boot=ecfg.bootstrap)
    for judged_by, r in vs_champion.items():
        metrics.update({f"win_rate.vs_champion.{judged_by}": r["rate"], f"win_rate.vs_champion.{judged_by}.lo": r["lo"],
                        f"win_rate.vs_champion.{judged_by}.hi": r["hi"]})
    vs_champ = vs_champion["judge" if items is not None else "rm"]
    metrics["test_items"] = len(dialogues)
    s = scores[name]
    if items is not None:
        metrics.update({"judge.helpfulness": float(s["helpfulness"].mean()), "judge.safety": float(s["safety"].mean()),
                        "refusal.unsafe": float(s["refused"][kinds == "unsafe"].mean()),
                        "refusal.harmless": float(s["refused"][kinds == "lookalike"].mean())})
        for k in sorted(set(kinds)):
            metrics[f"judge.helpfulness.{k}"] = float(s["helpfulness"][kinds == k].mean())

    promoted = champ != name and promote(vs_champ, ecfg.champion_tolerance)
    if promoted:
        state["champion"] = {"name": name, "path": str(model.path), "version": model.metrics.get("registry_version", 0)}
        ctx.set_model_alias(f"{ctx.cfg.run.name}-chat", "champion", state["champion"]["version"])
    metrics["champion.promoted"] = float(promoted)
    ctx.set_tags({"champion": state["champion"]["name"], "champion.decision":
                  f"{name} vs {champ}: win rate {vs_champ['rate']:.3f} [{vs_champ['lo']:.3f}, {vs_champ['hi']:.3f}], "
                  f"tolerance {ecfg.champion_tolerance}: {'promoted' if promoted else 'kept ' + champ}"})
    state["history"].append({"version": name, **{k: v for k, v in metrics.items() if k.startswith("win_rate.vs_sft")}})
    (ctx.out_dir / "state.json").write_text(json.dumps(state, indent=2))
    rows = [{"model": m, "item": i, "answer": a} for m, texts in answers.items() for i, a in enumerate(texts)]
    pq.write_table(pa.Table.from_pylist(rows), ctx.out_dir / "answers.parquet")
    ctx.log_table({"kind": kinds[:60].tolist(), "prompt": [d.turns[-1].content for d in dialogues[:60]],
                   **{m: answers[m][:60] for m in ("sft", prev_name, name)}}, "answers_by_version.json")
    _log_win_rate_figure(ctx, state["history"])
    return metrics


def _log_win_rate_figure(ctx, history: list[dict]) -> None:
    """Win rate against SFT by version, both judges and both axes (the paper's Figure 11), on
    this step's run and on the pipeline's parent run, where it grows with every iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versions = [h["version"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("win_rate.vs_sft.judge", "judge"), ("win_rate.vs_sft.rm", "reward models"),
                       ("win_rate.vs_sft.judge.helpfulness", "judge: helpfulness"),
                       ("win_rate.vs_sft.judge.safety", "judge: safety")):
        ys = [h.get(key, np.nan) for h in history]
        lo = [h.get(f"{key}.lo", np.nan) for h in history]
        hi = [h.get(f"{key}.hi", np.nan) for h in history]
        ax.errorbar(versions, ys, yerr=[np.subtract(ys, lo), np.subtract(hi, ys)], marker="o", capsize=3, label=label)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate vs SFT")
    ax.legend(fontsize=7)
    fig.tight_layout()
    ctx.log_figure(fig, "win_rate_by_version.png")
    ctx.log_parent_figure(fig, "win_rate_by_version.png")
    plt.close(fig)
