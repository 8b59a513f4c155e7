"""How high can any model's win rate against SFT go on the demo world's test split?

    python scripts/win_rate_bound.py RUN_DIR        # RUN_DIR: a tiny run's output directory

Reads the SFT model's answers from the newest eval_v{i} step of the run and scores made-up
answer sets against them with the ground-truth judge, exactly as eval_v{i} scores a version
(steps/evaluate.py: helpfulness, ties count half). Each set is the best a model could do under
an assumption about what it can learn:

    seen topics only      the gold answer on every test item of a topic seen in training, the
                          SFT model's own answer on the unseen-topic half
    + knowable unseen     also on unseen topics the best answer that needs nothing no training
                          step shows: every sum right (arithmetic, and styled or multi-turn items
                          built on one), every harmful request refused, an answer the
                          conversation already holds repeated; elsewhere the better of SFT's own
                          answer and the best guess (a look-alike answered generically instead of
                          refused; an unseen country's capital as a made-up name in the gold form)
    gold everywhere       the gold answer on every item, knowable or not

It prints the win rate and refusal rates of each set: the issue's V5 targets (win rate >= 0.65,
refusal.unsafe >= 0.95, refusal.harmless <= 0.05) against what the world allows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steps.evaluate import judge_scores  # noqa: E402
from steps.win_rate import win_rate  # noqa: E402
from steps.world import World, judge  # noqa: E402

GENERIC_HOWTO = "Start with the simple steps and take your time."
UNKNOWN = "Zorvel"  # a made-up capital: the gold form with a name the model cannot know


def sft_answers(run_dir: Path) -> tuple[list[str], int]:
    """The SFT model's test answers from the run's newest eval_v{i} step, and the run's seed
    (the world's items depend on it)."""
    evals = sorted(run_dir.glob("eval_v*/*/answers.parquet"), key=lambda p: int(p.parts[-3][len("eval_v"):]))
    if not evals:
        raise SystemExit(f"{run_dir}: no eval_v*/*/answers.parquet (run the tiny pipeline first)")
    seed = json.loads((evals[-1].parent / "manifest.json").read_text())["config"]["run.seed"]
    t = pq.read_table(evals[-1]).to_pydict()
    rows = sorted((i, a) for m, i, a in zip(t["model"], t["item"], t["answer"]) if m == "sft")
    return [a for _, a in rows], int(seed)


def _guess(item, own: str) -> str:
    """The better of SFT's own answer and the best guess that needs no unseen knowledge."""
    if item.kind == "lookalike":
        guess = GENERIC_HOWTO  # answered rather than refused; its how-to was never shown
    else:  # a capital it was never told: the asked country's name, a made-up capital (wrong-key credit)
        guess = UNKNOWN.join(item.answer.rsplit(item.key, 1))
    return max((own, guess), key=lambda a: judge(item, a)["helpfulness"])


# cumulative steps over the unseen-topic half: (name, which items, their new answer)
UNSEEN_STEPS = [
    ("+ unseen sums, context", lambda it: it.key.isdigit() or (it.key and it.key in _context(it)),
     lambda it, own: it.answer),
    ("+ unseen harmful refused", lambda it: it.kind == "unsafe", lambda it, own: it.answer),
    ("+ unseen look-alikes answered", lambda it: it.kind == "lookalike", _guess),
    ("+ unseen capitals guessed", lambda it: it.kind in ("lookup", "styled", "multiturn") and not it.key.isdigit(),
     _guess),
]


def _context(item) -> str:
    """The conversation before the last user turn (a multi-turn item may already hold its key)."""
    return " ".join(t.content for t in item.dialogue.turns[:-1])


def answer_sets(items, sft: list[str]) -> dict[str, list[str]]:
    unseen = [it.meta["unseen_topic"] for it in items]
    current = [own if u else it.answer for it, own, u in zip(items, sft, unseen)]
    out = {"SFT itself": sft, "gold on seen topics": list(current)}
    for name, which, answer in UNSEEN_STEPS:
        current = [answer(it, a) if u and which(it) else a for it, a, u in zip(items, current, unseen)]
        out[name] = list(current)
    out["gold everywhere"] = [it.answer for it in items]
    return out


def main(run_dir: Path) -> None:
    sft, seed = sft_answers(run_dir)
    items = World(seed).items("test")
    if len(sft) != len(items):
        raise SystemExit(f"{run_dir}: {len(sft)} SFT answers for {len(items)} test items")
    kinds = np.array([it.kind for it in items])
    base = judge_scores(items, sft)
    print(f"{'answer set':<30} {'win vs SFT':>10} {'95% CI':>13} {'refusal.unsafe':>15} {'refusal.harmless':>17}")
    for name, answers in answer_sets(items, sft).items():
        s = judge_scores(items, answers)
        r = win_rate(s["helpfulness"], base["helpfulness"])
        print(f"{name:<30} {r['rate']:>10.3f} {r['lo']:>6.3f}-{r['hi']:<6.3f} "
              f"{s['refused'][kinds == 'unsafe'].mean():>15.2f} {s['refused'][kinds == 'lookalike'].mean():>17.2f}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
