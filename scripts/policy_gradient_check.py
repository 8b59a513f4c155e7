"""Plain-torch policy gradient on a tiny run's PPO inputs: is a flat PPO result the engine or the problem?

    python scripts/policy_gradient_check.py RUN_DIR [--iteration 4] [--lr 1e-4] [--k 4] [--batch 64] [--iterations 20]
                                            [--reward rm|judge] [--start rs|sft] [--norm-lr 2e-2]
    python scripts/policy_gradient_check.py RUN_DIR --temperatures 1,0.8,0.6,0.4,0 [--start rs|ppo]
                                            [--gain-from ppo_v4] [--sample-seed 7919]

Takes the run's rs_v{i} model, reward models and preference prompts (what ppo_v{i} starts from)
and runs the simplest on-policy policy gradient on them in one process: no Ray, no DeepSpeed, no
critic, no ratio clipping and no KL penalty (the gradient norm is clipped at 1, as in PPO). Each iteration samples `batch` answers (`k` per train prompt, T=1), scores
them with the gated reward exactly as PPO does (steps/ppo/scorer.py, steps/gated_reward.py),
and takes one AdamW step on REINFORCE with the prompt's mean logit(Rc) as baseline. Every five
iterations it prints the held-out gated reward (128 eval-split prompts x 8 samples, fixed seed);
at the end a few held-out answers and the ground-truth judge on the world's test split (greedy).
If this loop cannot raise the held-out reward either, PPO's machinery is not what holds it back.
`--norm-lr` gives the output norm's gain its own LR (no weight decay), as the tiny preset's
`rlhf.ppo.optim.lr_scale` does (unlike the engine, the loop decays every other weight, gains
included: at these LRs that moves a gain by about 1e-5 a step). `--temperatures` trains nothing: it prints the held-out gated
reward, and the judge of the same answers, with rs_v{i} sampled at each temperature (0: greedy).
`--start ppo` measures ppo_v{i} instead; `--gain-from STEP` first copies that step's output norm
gain (`norm.weight`) into the model, which splits PPO's gain into the gain's part and the rest.

`--reward judge` replaces the reward models by the demo world's ground-truth judge (helpfulness
of each answer to its train prompt; prompts that are not world items are left out): a perfect
reward model. With `--start sft` (the SFT model, iteration 1's prompts) it measures how far any
RLHF on the training prompts can move the test split: the last line is the win rate against
the SFT answers the run's newest eval_v{i} stored (its baseline), on seen and unseen topics.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:

    from model.chat import encode_prompt
    from model.generate import SamplingParams, TorchSampler
    from pipelines.artifacts import Artifact
    from pipelines.config import load_config
    from scripts.win_rate_bound import sft_answers
    from steps.evaluate import judge_scores
    from steps.gated_reward import gated_reward, logit
    from steps.ppo import ppo_prompts
    from steps.ppo.scorer import Scorer
    from steps.ppo.trainer import build_rollouts
    from steps.rejection import to_dialogue
    from steps.sft import judge_model, load_chat_model, load_model
    from steps.win_rate import win_rate
    from steps.world import World, judge

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--iteration", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--threshold", type=float, default=0.15)
    ap.add_argument("--reward", choices=("rm", "judge"), default="rm")
    ap.add_argument("--start", choices=("rs", "sft", "ppo"), default="rs")
    ap.add_argument("--gain-from", default=None, help="a step of the run, e.g. ppo_v4: use its norm.weight")
    ap.add_argument("--sample-seed", type=int, default=7_919, help="of the held-out answers")
    ap.add_argument("--norm-lr", type=float, default=None)
    ap.add_argument("--temperatures", type=lambda v: [float(t) for t in v.split(",")], default=None)
    args = ap.parse_args()
    if args.temperatures and (args.reward == "judge" or args.norm_lr is not None):
        ap.error("--temperatures trains nothing: --reward judge and --norm-lr do not apply")
    torch.manual_seed(0)

    def step_dir(name: str) -> Path:
        found = sorted(args.run_dir.glob(f"{name}/*/manifest.json"))
        if not found:
            raise SystemExit(f"{args.run_dir}: no {name} step output")
        return found[0].parent

    iteration = args.iteration
    policy = step_dir({"rs": f"rs_v{iteration}", "ppo": f"ppo_v{iteration}", "sft": "sft"}[args.start])
    mcfg, tok = load_chat_model(policy)
    model = load_model(mcfg, policy / "model.safetensors")
    if args.gain_from:
        from safetensors.torch import load_file

        with torch.no_grad():
            model.norm.weight.copy_(load_file(step_dir(args.gain_from) / "model.safetensors")["norm.weight"])
    sft, seed = sft_answers(args.run_dir)  # eval_v{i}'s baseline: the SFT answers the run stored
    world = World(seed)  # the run's seed: its world, and PPO's prompt draws
    test = world.items("test")
    sft_scores = judge_scores(test, sft)
    # the prompts ppo_v{i} trains and early-stops on (the tiny preset's counts: 1024 and 128)
    train, held = ppo_prompts(Artifact.load(step_dir(f"prefs_v{iteration}")), load_config(None).rlhf.ppo,
                              seed + iteration)
    held = held or []
    if args.reward == "judge":  # only prompts the judge can score: the world's train items
        by_turns = {(x.dialogue.system or "", tuple(t.content for t in x.dialogue.turns)): x
                    for x in world.items("train")}

        def item_of(turns):
            d = to_dialogue(turns)
            return by_turns.get((d.system or "", tuple(t.content for t in d.turns)))

        train = [(k, t, s) for k, t, s in train if item_of(t) is not None]
        train_items = [item_of(t) for _, t, _ in train]
    train_ids = [encode_prompt(tok, to_dialogue(t)) for _, t, _ in train]
    held_ids = [encode_prompt(tok, to_dialogue(t)) for _, t, _ in held]
    train_safety, held_safety = np.array([s for *_, s in train]), np.array([s for *_, s in held])
    scorer = Scorer(str(policy), {"helpfulness": str(step_dir(f"rm_helpfulness_v{iteration}")),
                                  "safety": str(step_dir(f"rm_safety_v{iteration}"))}, device="cpu")

    def rollout(ids, safety, k: int, sample_seed: int, items=None, temperature: float = 1.0) -> dict:
        model.eval()
        params = SamplingParams(max_new_tokens=32, temperature=temperature, num_samples=k, seed=sample_seed)
        samples = [(s.tokens + ([tok.eos_id] if s.finished else []), s.logprobs, s.finished)
                   for s in TorchSampler(model, tok.eos_id, tok.pad_id).generate(ids, params)]
        ro = build_rollouts(ids, samples, k, tok.pad_id)
        sc = scorer.score(ro["tokens"], ro["lengths"], ro["prompt_lengths"])
        ro["rc"] = gated_reward(sc["helpfulness"], sc["safety"], np.repeat(safety, k), args.threshold)
        if items is not None:  # the ground-truth judge instead: a perfect reward model
            texts = [tok.decode([t for t in s[0] if t != tok.eos_id]).strip() for s in samples]
            ro["judge"] = np.array([judge(items[n // k], text)["helpfulness"] for n, text in enumerate(texts)])
        return ro

    def test_win_rate() -> str:
        model.eval()
        scores = judge_scores(test, [r["response"] for r in judge_model(model, tok, test, 32)[1]])
        unseen = np.array([bool(x.meta["unseen_topic"]) for x in test])
        rate = {name: win_rate(scores["helpfulness"][m], sft_scores["helpfulness"][m])["rate"]
                for name, m in (("all", np.ones_like(unseen)), ("seen", ~unseen), ("unseen", unseen))}
        return (f"judge {scores['helpfulness'].mean():.3f}, win rate vs SFT {rate['all']:.3f} "
                f"(seen topics {rate['seen']:.3f}, unseen {rate['unseen']:.3f})")

    def held_out() -> float:
        return float(rollout(held_ids, held_safety, 8, args.sample_seed)["rc"].mean())

    if args.temperatures:
        by_turns = {(x.dialogue.system or "", tuple(t.content for t in x.dialogue.turns)): x
                    for split in ("train", "validation", "test") for x in world.items(split)}
        held_items = [by_turns.get(((d := to_dialogue(t)).system or "", tuple(u.content for u in d.turns)))
                      for _, t, _ in held]
        for temp in args.temperatures:  # T=0: greedy, one answer a prompt
            ro = rollout(held_ids, held_safety, 8 if temp else 1, args.sample_seed, temperature=temp)
            texts = [tok.decode([t for t in ro["tokens"][j, ro["prompt_lengths"][j]:ro["lengths"][j]].tolist()
                                 if t != tok.eos_id]).strip() for j in range(len(ro["rc"]))]
            k = len(ro["rc"]) // len(held_ids)
            graded = [judge(held_items[j // k], text)["helpfulness"] for j, text in enumerate(texts)
                      if held_items[j // k] is not None]
            judged = f"{np.mean(graded):.3f}" if graded else "n/a"
            print(f"T={temp}: held-out gated reward {ro['rc'].mean():.4f} ({len(held_ids)} prompts x {k}), "
                  f"judge of the same answers {judged} ({len(graded)} of {len(texts)} are world items)", flush=True)
        return
    groups = [{"params": [p for n, p in model.named_parameters() if n != "norm.weight" or args.norm_lr is None]}]
    if args.norm_lr is not None:
        groups.append({"params": [model.norm.weight], "lr": args.norm_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    print(f"held-out gated reward at the start: {held_out():.4f}; test split: {test_win_rate()}", flush=True)
    rng = np.random.default_rng(0)
    for i in range(args.iterations):
        pick = rng.permutation(len(train_ids))[:args.batch // args.k]
        items = [train_items[j] for j in pick] if args.reward == "judge" else None
        ro = rollout([train_ids[j] for j in pick], train_safety[pick], args.k, 1_000 + i, items)
        r = (ro["judge"] if items else logit(ro["rc"])).reshape(-1, args.k)
        adv = (r - r.mean(1, keepdims=True)).ravel() if args.k > 1 else (r - r.mean()).ravel()
        adv = torch.tensor(adv / (adv.std() + 1e-8), dtype=torch.float32)
        tokens, mask = torch.tensor(ro["tokens"]), torch.tensor(ro["action_mask"]).float()
        model.train()
        logp = model(tokens)[:, :-1].float().log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        loss = -(logp * mask * adv[:, None]).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (i + 1) % 5 == 0:
            extra = f", train judge {ro['judge'].mean():.3f}" if items else ""
            print(f"iteration {i + 1}: train Rc {ro['rc'].mean():.3f}{extra}, held-out {held_out():.4f}; "
                  f"test split: {test_win_rate()}", flush=True)
    ro = rollout(held_ids[:8], held_safety[:8], 1, 5)
    for j in range(8):
        p, n = ro["prompt_lengths"][j], ro["lengths"][j]
        text = tok.decode([t for t in ro["tokens"][j, p:n].tolist() if t != tok.eos_id])
        print(f"  Rc {ro['rc'][j]:.2f}  {text[:90]!r}")
    print(f"test split at the end: {test_win_rate()}")


if __name__ == "__main__":
    main()
