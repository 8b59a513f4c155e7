"""PPO iteration time: ours (steps/ppo.run_ppo: Ray actors for the sampler, the reference and the
two reward models, the persistent learner on the shared engine) against TRL's PPOTrainer, in one run.

Same start (a finished pipeline run's chat model `rs_v{i}` and reward model(s) of that
iteration, ours from their safetensors, TRL's from their HF exports), same prompts (the train
prompts of `prefs_v{i}`, via steps.rejection.prompts_of, encoded once with model/chat.py so
both sides see the same token ids), same number of prompts per PPO iteration, number of new
tokens, temperature, PPO epochs and mini-batches (one optimizer step per mini-batch), clip
ranges, GAE gamma/lambda, KL coefficient, AdamW settings and precision (fp32 on CPU; bf16 with
--device cuda, where the four roles of ours share the one GPU: written, not measured on a GPU).

What differs, by design of each side (so TRL is the easier side):
  - reward: ours scores every response with BOTH reward models and gates them
    (steps/gated_reward.py: Rc = safety RM for safety prompts or unsafe answers, else the
    helpfulness RM; then whiten(logit(Rc))); TRL's PPOTrainer takes one reward model, the
    helpfulness RM here. Our scoring therefore runs one more reward model per response.
  - critic: both start it from the helpfulness RM; ours is a separate learner with its own
    AdamW, TRL's shares one optimizer with the policy (loss = policy + vf_coef * value).
  - old log-probs: TRL takes them from the sampling logits; ours runs the policy learner once
    more over the rollouts (in parallel with the scorer and the critic).
  - responses: both sides stop a response at </s> (TRL: stop_token="eos") or after
    `--new-tokens`; sampled lengths differ by chance, so each side's generated tokens are
    counted and printed with its prompts and optimizer steps (the equal-work check).
  - threads: TRL runs in this process on `--threads` threads; ours runs as the tiny preset
    places it (rlhf.ppo resources: each role a Ray actor with one thread), so its roles can
    overlap on the machine's cores. Ray is started before either side, as in the pipeline.

TRL removed PPOTrainer in 1.13 (huggingface/trl PR 7020); the last release with
`trl.experimental.ppo` is 1.12.0, which requirements-bench.txt's trl==1.16.0 lacks. The
benchmark imports it from a side directory (gitignored), so the other benchmarks keep 1.16:

    pip install -r requirements-bench.txt
    pip install --no-deps --target .cache/trl-ppo trl==1.12.0
    python benchmarks/ppo_step.py --run-dir <a pipeline --output-dir that has reached V4>
    python benchmarks/ppo_step.py --run-dir ... --repeats 2   # ~6 minutes on a shared 2-core CPU

Timing: per PPO iteration (rollout + scoring + update), steady state = mean over the iterations
after the first of each run, pooled over `--repeats` runs per side (alternating which side goes
first); the first iteration is also reported including launch: from the side's call (TRL:
imports, model loading, trainer construction; ours: Ray actors, DeepSpeed engines, one held-out
rollout that run_ppo's early stopping needs) to the end of its first iteration. Our breakdown
comes from run_ppo's history (time.rollout, time.score; update = the rest of the iteration:
learner steps, weights to the sampler, advantages); TRL's from timers wrapped around its module
functions (generation; no-grad forwards of the reference, value and reward models; update = the
rest, with its two gc.collect() calls per iteration shown apart).

Also measured: CPU seconds per steady iteration (user + system of this process and its
descendants, Ray's daemons and actors included, for both sides), `cpu_ratio_vs_trl`. On a
shared, overloaded machine the wall-clock ratio also reflects that ours has several runnable
processes and TRL one (the scheduler shares cores per thread); the CPU ratio does not.

The last line is `ratio_vs_trl: X` (steady-state wall seconds per PPO iteration, ours / TRL;
below 1: we are faster).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TRL_PPO_DIR = ROOT / ".cache" / "trl-ppo"
TRL_PPO_VERSION = "1.12.0"

import numpy as np  # noqa: E402
import torch  # noqa: E402


def artifact(run_dir: Path, step: str) -> Path:
    """The one complete artifact of `step` in a pipeline output dir (`<step>/<fingerprint>/`)."""
    found = sorted(p for p in glob.glob(str(run_dir / step / "*")) if (Path(p) / "manifest.json").exists())
    if not found:
        raise SystemExit(f"{run_dir}: no finished {step} artifact (run the pipeline through that step first)")
    if len(found) > 1:
        print(f"note: {len(found)} {step} artifacts, using {found[-1]}", file=sys.stderr)
    return Path(found[-1])


def load_prompts(prefs: Path, policy: Path, n: int, max_prompt: int, seed: int, split: str = "train"):
    """n `split` prompts of the preference batch (key, turns, is_safety) whose encoding leaves
    room for the response in the model's context, and their token ids (model/chat.py's encoder)."""
    import pyarrow.parquet as pq

    from model.chat import encode_prompt
    from steps.rejection import prompts_of, to_dialogue
    from steps.sft import load_chat_model

    _, tok = load_chat_model(policy)
    prompts, ids = [], []
    for p in prompts_of(pq.read_table(prefs / "pairs.parquet"), 10**9, seed, split):
        enc = encode_prompt(tok, to_dialogue(p[1]))
        if len(enc) <= max_prompt:
            prompts.append(p)
            ids.append(enc)
    rng = np.random.default_rng(seed)
    pick = range(len(prompts))
    if len(prompts) > n:
        pick = sorted(rng.choice(len(prompts), n, replace=False).tolist())
    if len(pick) < n:
        raise SystemExit(f"only {len(pick)} prompts of at most {max_prompt} tokens in {prefs}")
    return [prompts[i] for i in pick], [ids[i] for i in pick], tok


# ------------------------------------------------------------------------------------------- TRL
def import_trl_ppo():
    """trl.experimental.ppo from the side directory when it is there (1.12.0), else the installed trl."""
    if (TRL_PPO_DIR / "trl" / "experimental" / "ppo").is_dir():
        sys.path.insert(0, str(TRL_PPO_DIR))
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        import trl
        from trl.experimental.ppo import ppo_trainer
    except ImportError as e:
        raise SystemExit(f"TRL's PPOTrainer is missing ({e}); it was removed in trl 1.13. Install the last "
                         f"release that has it beside the pinned one:\n  pip install --no-deps --target "
                         f"{TRL_PPO_DIR} trl=={TRL_PPO_VERSION}") from None
    return trl.__version__, ppo_trainer


def run_trl(args, policy: Path, rm: Path, ids: list[list[int]], work: Path) -> dict:
    start = time.perf_counter()  # the launch includes importing TRL and transformers
    import datasets
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging

    version, mod = import_trl_ppo()
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    phase = {"rollout": 0.0, "score": 0.0, "gc": 0.0}
    work_done = {"prompts": 0, "tokens": 0, "steps": 0}
    per_iter: list[dict] = []

    def timed(fn, name, when=lambda: True):
        def wrapper(*a, **k):
            if not when():
                return fn(*a, **k)
            sync()
            start = time.perf_counter()
            out = fn(*a, **k)
            sync()
            phase[name] += time.perf_counter() - start
            return out
        return wrapper

    originals = {k: getattr(mod, k) for k in ("batch_generation", "forward", "get_reward")}
    gen = originals["batch_generation"]

    def generation(model, queries, *a, **k):
        qr, logits = gen(model, queries, *a, **k)
        work_done["prompts"] += queries.shape[0]
        # a response's tokens up to and including its first EOS (all of them if it has none),
        # as ours counts them (its action mask)
        resp = qr[:, queries.shape[1]:]
        eos = resp == tok.eos_token_id
        n = torch.where(eos.any(1), eos.int().argmax(1) + 1, resp.shape[1])
        work_done["tokens"] += int(n.sum())
        return qr, logits

    # Module-level names the trainer calls: generation is the rollout; the no-grad forwards
    # (reference log-probs, critic values, reward) are the scoring; the rest is the update.
    mod.batch_generation = timed(generation, "rollout")
    mod.forward = timed(originals["forward"], "score", when=lambda: not torch.is_grad_enabled())
    mod.get_reward = timed(originals["get_reward"], "score")

    class TimedGC:
        """TRL runs two full garbage collections per iteration (inside its update phase here);
        on a busy machine they are a large share of its iteration, so they are timed apart."""

        @staticmethod
        def collect(*a):
            import gc

            start = time.perf_counter()
            n = gc.collect(*a)
            phase["gc"] += time.perf_counter() - start
            return n

    mod.gc = TimedGC
    ticks: list[float] = []
    cpus: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_end(self, *a, **k):
            sync()
            ticks.append(time.perf_counter())
            cpus.append(tree_cpu())
            per_iter.append(dict(phase))
            phase.update(rollout=0.0, score=0.0, gc=0.0)

    hf_logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(str(policy / "hf"))
    tok.padding_side = "left"  # generation continues every prompt from its last column

    def load(cls, d):
        return cls.from_pretrained(str(d / "hf"), dtype=dtype).to(args.device)

    model = load(AutoModelForCausalLM, policy)
    ref = load(AutoModelForCausalLM, policy)
    value = load(AutoModelForSequenceClassification, rm)  # the critic starts from the reward model
    reward = load(AutoModelForSequenceClassification, rm)
    ds = datasets.Dataset.from_dict({"input_ids": ids})
    # gradient_accumulation_steps=1: each of TRL's mini-batches is then one micro-batch and one
    # optimizer step, as ours (with accumulation, TRL would step once per accumulation window)
    cfg = mod.PPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=args.prompts, gradient_accumulation_steps=1,
        num_mini_batches=args.mini_batches, num_ppo_epochs=args.epochs,
        total_episodes=args.prompts * args.iterations, local_rollout_forward_batch_size=args.prompts,
        response_length=args.new_tokens, stop_token="eos", temperature=args.temperature,
        kl_coef=args.kl_coef, cliprange=0.2, cliprange_value=0.2, vf_coef=args.vf_coef, gamma=1.0, lam=0.95,
        whiten_rewards=False, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-5, max_grad_norm=1.0,
        gradient_checkpointing=False, bf16=args.device != "cpu", fp16=False, use_cpu=args.device == "cpu",
        num_sample_generations=0, save_strategy="no", report_to="none", logging_steps=10**6,
        disable_tqdm=True, dataloader_num_workers=0, seed=args.seed)
    trainer = mod.PPOTrainer(args=cfg, processing_class=tok, model=model, ref_model=ref, reward_model=reward,
                             value_model=value, train_dataset=ds, eval_dataset=ds, callbacks=[Timer()])
    trainer.remove_callback(PrinterCallback)  # its per-iteration metrics dict would bury the result lines
    # count the optimizer steps actually taken (the torch optimizer under accelerate's wrapper)
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    inner.register_step_post_hook(lambda *a: work_done.__setitem__("steps", work_done["steps"] + 1))
    sync()
    train_start, cpu_start = time.perf_counter(), tree_cpu()
    try:
        trainer.train()
    finally:  # a later repeat wraps the originals again
        for k, fn in originals.items():
            setattr(mod, k, fn)
        import gc

        mod.gc = gc
    wall = time.perf_counter() - start
    cpus = [cpu_start, *cpus]
    for i, (row, s) in enumerate(zip(per_iter, np.diff([train_start, *ticks]))):
        row["update"] = float(s) - row["rollout"] - row["score"]
        row["total"], row["cpu"] = float(s), cpu_between(cpus[i], cpus[i + 1])
    return {"version": version, "iterations": per_iter, "wall_s": wall, "setup_s": train_start - start,
            "first_end_s": ticks[0] - start} | work_done


def tree_cpu() -> dict[tuple[int, float], float]:
    """CPU seconds (user + system) used so far by this process and each live descendant, keyed
    by (pid, start time): the private Ray instance's daemons and workers (ensure_ray starts it
    as our child) are in it. On a loaded machine the wall time of a side also depends on how
    many runnable threads it has (the scheduler shares the cores per thread); CPU seconds do not."""
    import psutil

    me = psutil.Process()
    out = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            out[(proc.pid, proc.create_time())] = t.user + t.system
        except psutil.Error:  # exited meanwhile (Ray's idle workers come and go)
            continue
    return out


def cpu_between(before: dict, after: dict) -> float:
    """CPU seconds spent between two tree_cpu() snapshots by the processes alive at the second
    (a process that exited in between loses its last interval: an undercount, not a negative)."""
    return float(sum(v - before.get(k, 0.0) for k, v in after.items()))


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ ours
def ours_config(args):
    """The tiny preset's `rlhf.ppo` (its resources: the roles share the machine as in the
    pipeline), with the benchmark's batch, lengths and optimisation settings."""
    from pipelines.config import load_config

    cfg = load_config(None)
    ppo = cfg.rlhf.ppo
    mini = args.prompts // args.mini_batches
    gpu = args.device != "cpu"
    # on one GPU the four roles (sampler, scorer, policy and critic learners) share it; bf16 as TRL
    res = {"num_gpus": 0.25} if gpu else {}
    train = ppo.train.model_copy(update={
        "global_batch_size": args.prompts, "micro_batch_size": mini, "num_workers": 1, "use_gpu": gpu,
        "gpus_per_worker": 0.25 if gpu else 0, "precision": "bf16" if gpu else "fp32"})
    optim = ppo.optim.model_copy(update={
        "lr": args.lr, "schedule": "constant", "warmup_steps": 0, "warmup_fraction": None,
        "weight_decay": 0.1, "betas": (0.9, 0.95), "eps": 1e-5, "grad_clip": 1.0,
        "lr_scale": {}})  # TRL trains every weight at one LR, and has no learned logit scale (below)
    update = {"train": train, "optim": optim, "critic_train": None, "critic_optim": None,
              "mini_batch_size": mini, "ppo_epochs": args.epochs, "samples_per_prompt": 1, "logit_scale": False,
              # TRL has no critic-only warm-up: every iteration updates both (equal optimizer steps)
              "freeze_policy_iterations": 0,
              "clip": 0.2, "value_clip": 0.2, "kl_beta": args.kl_coef, "gamma": 1.0, "lam": 0.95,
              "iterations": args.iterations, "max_new_tokens": args.new_tokens,
              "temperature": args.temperature, "top_p": 1.0, "num_prompts": args.prompts,
              # one held-out prompt, evaluated before the first and after the last iteration only
              # (outside the timed iterations); no checkpoint, no early stop inside the run
              "eval_every": 10**6, "eval_prompts": 1, "eval_samples": 1, "early_stop_patience": 10**6,
              "kl_stop": 1e9, "max_length_ratio": 1e9, "checkpoint_every": 10**6,
              "sampler": ppo.sampler.model_copy(update=res), "scorer": ppo.scorer.model_copy(update=res)}
    return cfg, ppo.model_copy(update=update), cfg.rlhf.safety_threshold


def run_ours(args, policy: Path, rm_h: Path, rm_s: Path, prompts, heldout, work: Path) -> dict:
    import steps.engine.learner as learner
    from steps.ppo import run_ppo

    cfg, pcfg, threshold = ours_config(args)
    ticks: list[tuple[float, dict]] = []
    evals: list[tuple[float, dict]] = []
    steps: dict[int, int] = {}

    def log(metrics: dict, step: int) -> None:
        # an iteration's row, or a held-out evaluation's (heldout.*: before the first iteration
        # and after the last)
        (ticks if "time.rollout" in metrics else evals).append((time.perf_counter(), tree_cpu()))

    # count the optimizer steps each learner group takes (one step_async = one step)
    original = learner.LearnerGroup.step_async

    def step_async(self, rows):
        steps[id(self)] = steps.get(id(self), 0) + 1
        return original(self, rows)

    learner.LearnerGroup.step_async = step_async
    start = time.perf_counter()
    try:
        res = run_ppo(policy, rm_h, rm_s, prompts, pcfg, safety_threshold=threshold, work_dir=work / "work",
                      out_dir=work / "out", seed=args.seed, log=log, heldout=heldout)
    finally:
        learner.LearnerGroup.step_async = original
    wall = time.perf_counter() - start
    per_iter = []
    # iteration 1 starts when the roles are up and the first held-out evaluation is done
    marks = [evals[0], *ticks]
    for i, h in enumerate(res.history):
        s = marks[i + 1][0] - marks[i][0]
        per_iter.append({"rollout": h["time.rollout"], "score": h["time.score"],
                         "update": s - h["time.rollout"] - h["time.score"], "total": s,
                         "cpu": cpu_between(marks[i][1], marks[i + 1][1]),
                         "learner_update": h["time.update"], "response_length": h["response_length"]})
    counts = sorted(steps.values())  # the policy's and the critic's; the fewer is reported
    if len(set(counts)) > 1:
        print(f"warning: the learners took different numbers of steps: {counts}", file=sys.stderr)
    return {"iterations": per_iter, "wall_s": wall, "first_end_s": ticks[0][0] - start,
            "launch_s": evals[0][0] - start,  # the roles up and one held-out rollout
            "prompts": len(res.history) * pcfg.train.global_batch_size,
            # response_length: the mean of the action mask's rows (response tokens, </s> included)
            "tokens": round(sum(h["response_length"] for h in res.history) * pcfg.train.global_batch_size),
            "steps": counts[0] if counts else 0, "stop_reason": res.stop_reason}


# ------------------------------------------------------------------------------------------ main
def summary(runs: list[dict]) -> dict:
    """Steady state: every iteration after each run's first (pooled over repeats); the first
    iteration with launch: from the side's call to the end of its first iteration (mean over repeats)."""
    steady = [r["total"] for run in runs for r in run["iterations"][1:]]
    rows = [r for run in runs for r in run["iterations"][1:]]
    if not steady:  # one iteration per run: nothing is steady, report it as is
        rows = [run["iterations"][0] for run in runs]
        steady = [r["total"] for r in rows]
    first = [run["first_end_s"] for run in runs]
    return {"steady_s": float(np.mean(steady)), "steady_cpu_s": float(np.mean([r["cpu"] for r in rows])),
            "steady_min_s": float(np.min(steady)),
            "steady_max_s": float(np.max(steady)), "steady_n": len(steady),
            "per_run_steady_s": [float(np.mean([r["total"] for r in run["iterations"][1:]] or
                                               [run["iterations"][0]["total"]])) for run in runs],
            "first_with_launch_s": float(np.mean(first)),
            "phases_s": {k: float(np.mean([r[k] for r in rows])) for k in ("rollout", "score", "update")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, default=Path("outputs"),
                   help="a pipeline --output-dir holding rs_v{i}, rm_*_v{i} and prefs_v{i} artifacts")
    p.add_argument("--iteration", type=int, default=4, help="the RLHF iteration whose artifacts start PPO")
    p.add_argument("--prompts", type=int, default=16, help="prompts per PPO iteration (one rollout each)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--iterations", type=int, default=4, help="PPO iterations per run; the first: warm-up")
    p.add_argument("--epochs", type=int, default=1, help="PPO epochs over each batch of rollouts")
    p.add_argument("--mini-batches", type=int, default=2, help="per epoch; one optimizer step each")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--kl-coef", type=float, default=0.01)
    p.add_argument("--vf-coef", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-6)
    # 1 by default: on a shared, loaded 2-core machine more OpenMP threads per process oversubscribe
    # the cores (see benchmarks/reward_throughput.py)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per side, alternating which side goes first (the machine's load drifts)")
    p.add_argument("--ours-first", action="store_true", help="ours before TRL in the first repeat")
    p.add_argument("--only", choices=["ours", "trl"], default=None, help="time one side only (no ratio)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write every iteration's figures here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    i = args.iteration
    policy, prefs = artifact(args.run_dir, f"rs_v{i}"), artifact(args.run_dir, f"prefs_v{i}")
    rm_h, rm_s = artifact(args.run_dir, f"rm_helpfulness_v{i}"), artifact(args.run_dir, f"rm_safety_v{i}")
    mcfg = json.loads((policy / "model_config.json").read_text())
    room = mcfg["max_seq_len"] - args.new_tokens
    prompts, ids, _ = load_prompts(prefs, policy, args.prompts, room, args.seed)
    # run_ppo evaluates held-out prompts before and after its iterations (early stopping); one
    # eval-split prompt keeps that small, and outside the per-iteration times
    heldout, _, _ = load_prompts(prefs, policy, 1, room, args.seed, split="eval")
    if args.only != "trl":
        from pipelines.config import load_config
        from pipelines.dag import ensure_ray

        # Ray is up before either side starts, as in the pipeline (and its idle daemons load
        # the machine during both sides' runs alike)
        ensure_ray(load_config(None))
    results: dict[str, list[dict]] = {"ours": [], "trl": []}
    with tempfile.TemporaryDirectory(prefix="ppo-bench-") as tmp:
        for rep in range(args.repeats):
            order = ["ours", "trl"] if args.ours_first == (rep % 2 == 0) else ["trl", "ours"]
            for side in order:
                if args.only not in (None, side):
                    continue
                work = Path(tmp) / f"{side}{rep}"
                work.mkdir()
                print(f"[ppo_step] repeat {rep + 1}/{args.repeats}: {side}", file=sys.stderr, flush=True)
                if side == "trl":
                    results[side].append(run_trl(args, policy, rm_h, ids, work))
                else:
                    results[side].append(run_ours(args, policy, rm_h, rm_s, prompts, heldout, work))
    if args.only != "trl":
        import ray

        ray.shutdown()  # no worker log line may follow the result lines
    results = {k: v for k, v in results.items() if v}
    sums = {k: summary(v) for k, v in results.items()}
    setup = {k: getattr(args, k) for k in ("prompts", "new_tokens", "iterations", "epochs", "mini_batches",
                                           "temperature", "threads", "device", "repeats")}
    report = {"setup": setup | {"model": mcfg, "safety_prompts": int(sum(p[2] for p in prompts))},
              "results": results, "summary": sums}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=float))
    print(json.dumps({k: report[k] for k in ("setup", "summary")}, indent=2, default=float))
    print(f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {args.prompts} prompts x "
          f"{args.new_tokens} new tokens at most, {args.epochs} epoch(s) x {args.mini_batches} mini-batches "
          f"per iteration, {args.iterations} iterations x {args.repeats} run(s) per side, {args.device}")
    for name, s in sums.items():
        runs = results[name]
        ph = s["phases_s"]
        print(f"{name:5} per iteration: {s['steady_s']:.2f} s, mean of {s['steady_n']} steady iterations "
              f"(min {s['steady_min_s']:.2f}, max {s['steady_max_s']:.2f}): rollout {ph['rollout']:.2f}, "
              f"score {ph['score']:.2f}, update {ph['update']:.2f}; first iteration with launch "
              f"{s['first_with_launch_s']:.1f} s {[round(r['first_end_s'], 1) for r in runs]}; CPU seconds "
              f"per steady iteration {s['steady_cpu_s']:.2f}")
        if "gc" in runs[0]["iterations"][0]:
            print(f"{name:5} of which gc.collect() in the update: "
                  f"{np.mean([r['gc'] for run in runs for r in run['iterations'][1:]] or [0.0]):.2f} s")
        print(f"{name:5} work per run: prompts {[r['prompts'] for r in runs]}, generated tokens "
              f"{[r['tokens'] for r in runs]}, optimizer steps {[r['steps'] for r in runs]}")
    if len(sums) == 2:
        o, t = results["ours"], results["trl"]
        same = all(a[k] == b[k] for a in o for b in t for k in ("prompts", "steps"))
        tok_o, tok_t = np.mean([r["tokens"] for r in o]), np.mean([r["tokens"] for r in t])
        print(f"equal work: prompts and optimizer steps {'OK' if same else 'MISMATCH'}; generated tokens "
              f"ours/TRL {tok_o / tok_t:.2f} (both stop at </s>: sampled lengths differ by chance)")
        per_run = [a / b for a, b in zip(sums["ours"]["per_run_steady_s"], sums["trl"]["per_run_steady_s"])]
        print("ratio per run pair: " + ", ".join(f"{r:.3f}" for r in per_run))
        print(f"cpu_ratio_vs_trl: {sums['ours']['steady_cpu_s'] / sums['trl']['steady_cpu_s']:.3f}")
        print(f"first_iteration_ratio_vs_trl: "
              f"{sums['ours']['first_with_launch_s'] / sums['trl']['first_with_launch_s']:.3f}")
        print(f"ratio_vs_trl: {sums['ours']['steady_s'] / sums['trl']['steady_s']:.3f}")


if __name__ == "__main__":
    main()
