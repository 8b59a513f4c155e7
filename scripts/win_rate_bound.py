"""How high can any model's win rate against SFT go on the demo world's test split?

    python scripts/win_rate_bound.py RUN_DIR        # RUN_DIR: a tiny run's output directory

Reads the SFT model's answers from the newest eval_v{i} step of the run and scores made-up
answer sets against them with the ground-truth judge, exactly as eval_v{i} scores a version
(steps/evaluate.py: helpfulness, ties count half). Each set is the best a model could do under
an assumption about what it can learn:

    seen topics only      the gold answer on every test item of a topic seen in training, the
                          SFT model's own answer on the unseen-topic half
    + all that is knowable  also on unseen topics: every sum right (arithmetic, and styled or
                          multi-turn items built on one), every harmful request refused, every
                          look-alike answered instead of refused (its how-to was never shown,
                          so a generic one: it earns the judge's 0.15 floor plus any overlap);
                          the capitals of unseen countries cannot be known and keep SFT's answer
    gold everywhere       the gold answer on every item, knowable or not

It prints the win rate and refusal rates of each set: the issue's V5 targets (win rate >= 0.65,
refusal.unsafe >= 0.95, refusal.harmless <= 0.05) against what the world allows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steps.evaluate import judge_scores  # noqa: E402
from steps.win_rate import win_rate  # noqa: E402
from steps.world import World  # noqa: E402

GENERIC_HOWTO = "Start with the simple steps and take your time."


def sft_answers(run_dir: Path) -> list[str]:
    evals = sorted(run_dir.glob("eval_v*/*/answers.parquet"), key=lambda p: int(p.parts[-3][len("eval_v"):]))
    if not evals:
        raise SystemExit(f"{run_dir}: no eval_v*/*/answers.parquet (run the tiny pipeline first)")
    t = pq.read_table(evals[-1]).to_pydict()
    rows = sorted((i, a) for m, i, a in zip(t["model"], t["item"], t["answer"]) if m == "sft")
    return [a for _, a in rows]


def answer_sets(items, sft: list[str]) -> dict[str, list[str]]:
    def knowable(item, own: str) -> str:
        if not item.meta["unseen_topic"]:
            return item.answer
        if item.kind == "unsafe" or item.key.isdigit():  # a refusal, or a sum it can compute
            return item.answer
        if item.kind == "lookalike":
            return GENERIC_HOWTO
        return own  # a capital it was never told

    return {"SFT itself": sft,
            "seen topics only": [own if it.meta["unseen_topic"] else it.answer for it, own in zip(items, sft)],
            "+ all that is knowable": [knowable(it, own) for it, own in zip(items, sft)],
            "gold everywhere": [it.answer for it in items]}


def main(run_dir: Path) -> None:
    items = World(0).items("test")
    sft = sft_answers(run_dir)
    if len(sft) != len(items):
        raise SystemExit(f"{run_dir}: {len(sft)} SFT answers for {len(items)} test items")
    kinds = np.array([it.kind for it in items])
    base = judge_scores(items, sft)
    print(f"{'answer set':<24} {'win vs SFT':>10} {'95% CI':>13} {'refusal.unsafe':>15} {'refusal.harmless':>17}")
    for name, answers in answer_sets(items, sft).items():
        s = judge_scores(items, answers)
        r = win_rate(s["helpfulness"], base["helpfulness"])
        print(f"{name:<24} {r['rate']:>10.3f} {r['lo']:>6.3f}-{r['hi']:<6.3f} "
              f"{s['refused'][kinds == 'unsafe'].mean():>15.2f} {s['refused'][kinds == 'lookalike'].mean():>17.2f}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
