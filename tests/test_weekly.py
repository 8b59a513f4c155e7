"""The weekly rerun: the DAG of a weekly iteration (fast), and end to end a second vendor batch
dropped into a landing location becoming V6 on top of the shared tiny run (tests/conftest.py
`tiny_run`; the weekly run itself is the session fixture `tiny_week6`, which the MLflow UI test
shares), with no manual step and nothing before it recomputed; a second check does nothing.
The watcher's decisions are unit-tested in tests/test_watch.py."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from tests.conftest import artifacts, latest, weekly

V6_STEPS = ("landing_v6", "prefs_v6", "rm_helpfulness_v6", "rm_safety_v6", "rs_v6", "eval_v6")


def test_weekly_iterations_continue_the_dag_and_keep_their_fingerprints_in_later_weeks():
    from pipelines.config import load_config
    from pipelines.full import pipeline
    from pipelines.runner import plan_fingerprints
    from pipelines.weekly import weekly_specs

    cfg = load_config(None)
    v6 = {"iteration": 6, "digest": "a" * 64, "source": "/landing/2026-W49", "name": "2026-W49", "from": "rs_v5"}
    v7 = {"iteration": 7, "digest": "b" * 64, "source": "/landing/2026-W50", "name": "2026-W50", "from": "sft"}
    week6, week7 = weekly_specs(cfg, [v6]), weekly_specs(cfg, [v6, v7])
    by_name = {s.name: s for s in week7}
    # PPO (ppo_v{i}, per rlhf.ppo_from) sits between rs_v{i} and eval_v{i} where the config asks for it
    assert [s.name for s in week7[len(pipeline(cfg)):] if not s.name.startswith("ppo_")] == [
        f"{step}_v{i}" for i in (6, 7) for step in ("landing", "prefs", "rm_helpfulness", "rm_safety", "rs", "eval")]
    assert "annotate_v6" not in by_name  # a vendor's batch where the tiny preset simulates one
    assert by_name["prefs_v7"].inputs == {"previous": "prefs_v6", "batch": "landing_v7"}
    assert by_name["rm_safety_v7"].inputs["model"] == "sft" and by_name["rs_v7"].inputs["model"] == "sft"  # its champion
    assert by_name["eval_v7"].inputs["prior"] == "eval_v6" and by_name["eval_v7"].inputs["previous"] in ("rs_v6",
                                                                                                       "ppo_v6")
    full, f6, f7 = (plan_fingerprints(s, cfg) for s in (pipeline(cfg), week6, week7))
    assert {k: f6[k] for k in full} == full  # full.py's steps are cache hits in a weekly run
    assert {k: f7[k] for k in f6} == f6  # next week, V6 stays cached whatever the champion became
    other = plan_fingerprints(weekly_specs(cfg, [{**v6, "digest": "c" * 64}]), cfg)
    assert other["landing_v6"] != f6["landing_v6"] and other["eval_v6"] != f6["eval_v6"]  # another batch


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(4800)  # the first e2e test to use the shared run waits for the whole tiny DAG
def test_a_second_batch_in_the_landing_location_becomes_v6_end_to_end(tiny_week6):
    out, landing, p = tiny_week6.out, tiny_week6.landing, tiny_week6.process
    rows, earlier, before = tiny_week6.rows, tiny_week6.earlier_pair_ids, tiny_week6.before
    assert not earlier & {r["pair_id"] for r in rows}  # a new batch, not a copy of an ingested one
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "2026-W49: done (exit 0)" in p.stdout and "is iteration V6, starting from" in p.stdout

    # nothing before V6 was recomputed: every earlier step kept its one artifact
    after = artifacts(out)
    assert {k: v for k, v in after.items() if k in before} == before
    new = set(after) - set(before)
    assert set(V6_STEPS) <= new and new <= {*V6_STEPS, "ppo_v6"}, new
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name("llama2-tiny")
    parents = client.search_runs([exp.experiment_id], "tags.pipeline LIKE 'weekly-%'")
    assert len(parents) == 1 and parents[0].info.run_name.startswith("weekly-") and "-v6" in parents[0].info.run_name
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    ran = {r.data.tags["step"] for r in children if r.data.tags["cache_hit"] == "false"}
    assert ran == new and len(children) > 35  # all of full.py's steps as cache hits, plus V6
    assert "win_rate_by_version.png" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}

    # V6 end to end: trained on all six batches, from the champion, evaluated against it
    prefs = latest(out, "prefs_v6").metrics
    assert prefs["batches"] == 6 and prefs["pairs"] == len(earlier) + len(rows), prefs
    for axis in ("helpfulness", "safety"):
        rm = latest(out, f"rm_{axis}_v6").metrics
        assert rm["accuracy"] > 0.5, rm
    m = latest(out, "eval_v6").metrics
    for key in ("win_rate.vs_sft.judge", "win_rate.vs_prev.judge", "win_rate.vs_champion.judge",
                "win_rate.vs_champion.rm"):
        assert m[f"{key}.lo"] <= m[key] <= m[f"{key}.hi"], (key, m)
    assert m["champion.promoted"] in (0.0, 1.0)
    eval_run = next(r for r in children if r.data.tags["step"] == "eval_v6")
    assert eval_run.data.tags["champion.decision"].startswith("v6 vs ")
    assert client.get_model_version_by_alias("llama2-tiny-chat", "rlhf-v6").source.endswith("/hf")
    state = json.loads((out / "weekly" / "state.json").read_text())
    assert [it["iteration"] for it in state["iterations"]] == [6]
    assert [b["status"] for b in state["batches"].values()] == ["done"]

    # the next check finds nothing new, starts nothing
    p = weekly("--watch", str(landing), "--once", "--output-dir", str(out))
    assert p.returncode == 0 and "no new complete batch" in p.stdout, p.stdout + p.stderr
    assert artifacts(out) == after
    assert len(client.search_runs([exp.experiment_id], "tags.pipeline LIKE 'weekly-%'")) == 1
