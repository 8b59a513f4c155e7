"""PPO in the shared end-to-end run (issue 13's done-when): from V4 on, each ppo_v{i} improves
on the rs_v{i} model it started from, in the same run."""

import json

import pytest
from mlflow import MlflowClient

from pipelines.config import load_config
from tests.conftest import latest

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(4800)]
CFG = load_config("tiny")
PPO_ITERATIONS = range(CFG.rlhf.ppo_from, CFG.rlhf.iterations + 1)


@pytest.mark.parametrize("i", PPO_ITERATIONS)
def test_ppo_moves_within_the_kl_budget_and_logs_each_iteration(tiny_run, i):
    out, _, _ = tiny_run
    ppo = latest(out, f"ppo_v{i}")
    assert ppo.manifest["inputs"]["model"]["step"] == f"rs_v{i}"
    m = ppo.metrics
    assert 0.001 < m["kl"] < CFG.rlhf.ppo.kl_stop, m  # held-out KL to the reference (rs_v{i})
    history = json.loads(ppo.file("history.json").read_text())
    assert history["history"] and all({"time.rollout", "time.score", "time.update"} <= set(h)
                                      for h in history["history"])


@pytest.mark.parametrize("i", PPO_ITERATIONS)
def test_ppo_raises_the_held_out_reward_and_the_judge_is_not_significantly_lower(tiny_run, i):
    out, _, _ = tiny_run
    m = latest(out, f"ppo_v{i}").metrics
    # the gated reward of the iteration's reward models on held-out prompts (the preference
    # batches' eval split, never trained on), sampled as PPO samples (T=1): up by 0.05 or more
    # (2026-12-04 with the learned logit scale: V4 +0.074, V5 +0.063; README "PPO")
    assert m["heldout.reward.gain"] >= 0.05, m
    # the demo world's ground-truth judge on its test prompts (greedy), paired per prompt. PPO
    # changes 7-12% of the 131 greedy answers, so the paired change is +-0.005-0.007 of noise
    # around its true value (2026-12-04: V4 +0.009 +- 0.005, V5 +0.001 +- 0.007). Asserting its
    # sign would fail on noise as often as not when PPO leaves the greedy answers as good as they
    # were; what is asserted is "not significantly lower" (one-sided, about 2.3%) and never lower
    # by more than 0.02, with the noise bounded so the check cannot become loose.
    assert m["judge.diff_se.helpfulness"] < 0.02, m  # 131 prompts: a wider error would make this loose
    assert m["judge.diff.helpfulness"] >= -min(2 * m["judge.diff_se.helpfulness"], 0.02), m
    assert m["judge.ppo.safety"] >= m["judge.start.safety"] - 0.01, m


def test_the_next_iteration_and_the_evaluation_use_the_ppo_model(tiny_run):
    out, _, _ = tiny_run
    first = CFG.rlhf.ppo_from
    assert latest(out, f"eval_v{first}").manifest["inputs"]["model"]["step"] == f"ppo_v{first}"
    if first < CFG.rlhf.iterations:
        assert latest(out, f"rs_v{first + 1}").manifest["inputs"]["model"]["step"] == f"ppo_v{first}"


def test_ppo_logs_its_iterations_and_registers_the_version(tiny_run):
    out, _, _ = tiny_run
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    i = CFG.rlhf.ppo_from
    run_id = latest(out, f"ppo_v{i}").manifest["mlflow_run_id"]
    for key in ("reward.raw.mean", "reward.whitened.std", "kl", "entropy", "clip_fraction", "approx_kl",
                "value_loss", "explained_variance", "response_length", "time.rollout", "time.update"):
        assert len(client.get_metric_history(run_id, key)) >= 2, key
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"reward_and_kl.png", "rollouts.json"} <= artifacts
    version = client.get_model_version_by_alias(f"{CFG.run.name}-chat", f"rlhf-v{i}")
    assert version.run_id == run_id


def test_ppo_rerun_repeats_the_runs_step(tiny_run, tmp_path):
    """scripts/ppo_rerun.py, which the README's PPO tables were measured with, runs the step's own
    code on the run's V4 inputs: with no override it gives the run's ppo_v4 figures exactly."""
    import subprocess
    import sys

    from tests.conftest import REPO

    out, _, _ = tiny_run
    done = subprocess.run([sys.executable, "scripts/ppo_rerun.py", str(out), "--iteration", str(CFG.rlhf.ppo_from),
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rerun = json.loads((tmp_path / "result.json").read_text())
    m = latest(out, f"ppo_v{CFG.rlhf.ppo_from}").metrics
    assert rerun["gain"] == pytest.approx(m["heldout.reward.gain"], abs=1e-6)
    assert rerun["kl"] == pytest.approx(m["kl"], abs=1e-6)
    for key in ("judge.diff.helpfulness", "judge.ppo.helpfulness", "judge.sampled.diff.helpfulness"):
        assert rerun["judge"][key] == pytest.approx(m[key], abs=1e-6), key
