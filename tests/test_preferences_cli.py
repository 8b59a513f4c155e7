"""pipelines/weekly.py --ingest-only as a user runs it (exit codes, reports), and the adapters
from public formats: ShareGPT-DPO on real public pairs (LLaMA-Factory's demo file, fetched by
scripts/fetch_demo_data.py), HH-RLHF and SHP on samples written here in their published layouts
(no pinned package ships either)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest

from steps.preference_adapters import AdapterError, adapt, hh_turns, shp_strength
from steps.preference_store import PreferenceStore
from steps.preferences import PreferenceConfig
from tests.test_preferences import ROOT, batch, row, snapshot, write_jsonl


def weekly(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pipelines/weekly.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_weekly_ingest_only_exit_codes_and_reports(tmp_path):
    out = tmp_path / "out"
    store_root = out / "preferences"
    good = batch(tmp_path, "good", [row(i) for i in range(10)])
    p = weekly("--batch", str(good), "--ingest-only", "--output-dir", str(out))
    assert p.returncode == 0, p.stderr
    assert "ingested as 0001-" in p.stdout and "10 pairs, 0 quarantined" in p.stdout

    p = weekly("--batch", str(good), "--ingest-only", "--output-dir", str(out))
    assert p.returncode == 0 and "already ingested as 0001-" in p.stdout and "nothing to do" in p.stdout

    mixed = batch(tmp_path, "mixed", [row(i) for i in range(10, 19)] + [row(19, strength="much_better")])
    p = weekly("--batch", str(mixed), "--ingest-only", "--output-dir", str(out))
    assert p.returncode == 3, p.stdout + p.stderr
    assert "mixed/part-0.jsonl:10: strength: 'much_better' is not one of" in p.stdout
    record = store_root / "batches" / PreferenceStore(store_root).batches()[1]["version"]
    assert "much_better" in (record / "quarantine.jsonl").read_text()
    assert (record / "report.txt").read_text().strip() == p.stdout.strip()

    before = snapshot(store_root)
    bad = batch(tmp_path, "bad", [row(20), row(21, chosen="same", rejected="same")])
    report = tmp_path / "report.txt"
    p = weekly("--batch", str(bad), "--ingest-only", "--output-dir", str(out), "--report", str(report),
               "preference.on_error=fail")
    assert p.returncode == 2 and "REJECTED" in p.stdout and "bad/part-0.jsonl:2: rejected: identical" in p.stdout
    assert report.read_text().strip() == p.stdout.strip()
    assert snapshot(store_root) == before

    p = weekly("--batch", str(bad), "--output-dir", str(out), "preference.on_error=fail")  # the weekly run
    assert p.returncode == 2 and "REJECTED" in p.stdout and not (out / "landing_v6").exists()  # nothing trained
    p = weekly("--batch", str(good), "--ingest-only", "--output-dir", str(out), "preference.on_error=sometimes")
    assert p.returncode == 2 and "preference.on_error" in p.stderr
    p = weekly("--batch", str(tmp_path / "nowhere"), "--ingest-only", "--output-dir", str(out))
    assert p.returncode == 2 and "not found" in p.stderr
    assert snapshot(store_root) == before


# ----------------------------------------------------------------------------- HH-RLHF
HH = [  # the published layout: whole transcripts, identical up to the last "Assistant:"
    {"chosen": "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water for about nine minutes.",
     "rejected": "\n\nHuman: How do I boil an egg?\n\nAssistant: Eggs are a kind of food."},
    {"chosen": "\n\nHuman: Name a prime.\n\nAssistant: Which range?\n\nHuman: Under ten.\n\nAssistant: 7 is one.",
     "rejected": "\n\nHuman: Name a prime.\n\nAssistant: Which range?\n\nHuman: Under ten.\n\nAssistant: 9."},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hey\n\nAssistant: Hello!"},
]


def test_hh_transcripts_become_prompt_turns_and_the_last_answers():
    assert hh_turns(HH[1]["chosen"], "chosen") == [
        {"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Which range?"},
        {"role": "user", "content": "Under ten."}, {"role": "assistant", "content": "7 is one."}]
    r = adapt("hh", HH[1], "helpful-base/train.jsonl")
    assert r["prompt"][-1] == {"role": "user", "content": "Under ten."} and len(r["prompt"]) == 3
    assert (r["chosen"], r["rejected"], r["strength"], r["axis"], r["source"]) == (
        "7 is one.", "9.", "better", "helpfulness", "anthropic-hh")
    assert r["pair_id"] == adapt("hh", dict(HH[1]), "elsewhere.jsonl")["pair_id"]  # a content hash
    harmless = adapt("hh", HH[0], "harmless-base/train.jsonl")
    assert (harmless["axis"], harmless["safety_label"]) == ("safety", "both_unsafe")
    with pytest.raises(AdapterError, match="differ before the last Assistant turn"):
        adapt("hh", HH[2], "x.jsonl")


def test_weekly_ingests_an_hh_file_and_reports_the_row_it_cannot_adapt(tmp_path):
    plain = write_jsonl(tmp_path / "hh.jsonl", HH)
    (tmp_path / "hh" / "harmless-base").mkdir(parents=True)  # as published: <subset>/train.jsonl.gz
    (tmp_path / "hh" / "harmless-base" / "train.jsonl.gz").write_bytes(gzip.compress(plain.read_bytes()))
    p = weekly("--batch", str(tmp_path / "hh"), "--format", "hh", "--ingest-only", "--output-dir",
               str(tmp_path / "out"), "preference.max_invalid_fraction=0.5")
    assert p.returncode == 3, p.stdout + p.stderr
    assert "hh/harmless-base/train.jsonl.gz:3: rejected: the chosen and rejected transcripts differ" in p.stdout
    pairs = PreferenceStore(tmp_path / "out" / "preferences").pairs(
        [PreferenceStore(tmp_path / "out" / "preferences").batches()[0]["version"]]).to_pylist()
    assert [(x["axis"], x["safety_label"], x["chosen"]) for x in pairs] == [
        ("safety", "both_unsafe", "Put it in boiling water for about nine minutes."),
        ("safety", "both_unsafe", "7 is one.")]


# ----------------------------------------------------------------------------- ShareGPT-DPO (real data)
def test_sharegpt_dpo_adapter_on_real_public_pairs(tmp_path):
    from scripts.fetch_demo_data import ensure

    path = ensure(verbose=False) / "prefs" / "dpo_en_demo.json"
    raw = json.loads(path.read_text())
    store = PreferenceStore(tmp_path / "store")
    res = store.ingest(str(path), PreferenceConfig(), "sharegpt-dpo")
    # 300 real pairs, 5 of them exact copies of earlier ones: the first copy is kept
    assert (res.status, res.accepted, res.quarantined) == ("quarantined", 295, 5), res.report
    assert res.report.count("an exact copy of dpo_en_demo.json:") == 5
    pairs = store.pairs([res.version]).to_pylist()
    first = pairs[0]
    assert first["prompt"] == [{"role": "user", "content": raw[0]["conversations"][0]["value"]}]
    assert (first["chosen"], first["rejected"]) == (raw[0]["chosen"]["value"], raw[0]["rejected"]["value"])
    assert first["source"] == "sharegpt-dpo" and first["strength"] == "better"
    multi = [p for p in pairs if len(p["prompt"]) > 1]
    assert multi and all(p["prompt"][-1]["role"] == "user" for p in pairs)
    assert {t["role"] for p in multi for t in p["prompt"]} >= {"user", "assistant", "system"}


# ----------------------------------------------------------------------------- SHP
def shp_row(score_a, score_b, labels=None, **over):
    r = {"post_id": "p1x", "domain": "askscience_train", "history": "Why is the sky blue?", "c_root_id_A": "ca",
         "c_root_id_B": "cb", "human_ref_A": "Rayleigh scattering of sunlight.", "human_ref_B": "Because it is.",
         "score_A": score_a, "score_B": score_b, **over}
    if labels is not None:
        r["labels"] = labels
    return r


@pytest.mark.parametrize("ratio,level", [(12.0, "significantly_better"), (8.0, "significantly_better"),
                                         (5.0, "better"), (2.0, "slightly_better"), (1.5, "negligibly_better")])
def test_shp_strength_thresholds(ratio, level):
    assert shp_strength(ratio) == level


def test_shp_rows_map_by_label_and_score_ratio():
    r = adapt("shp", shp_row(40, 5, labels=1), "shp/askscience.jsonl")
    assert (r["chosen"], r["rejected"], r["strength"], r["source"]) == (
        "Rayleigh scattering of sunlight.", "Because it is.", "significantly_better", "stanford-shp")
    assert r["pair_id"] == "shp-p1x-ca-cb" and r["prompt"] == "Why is the sky blue?"
    r = adapt("shp", shp_row(3, 9, labels=0, score_ratio=3.0), "x.jsonl")  # B preferred, SHP's own ratio
    assert (r["chosen"], r["strength"]) == ("Because it is.", "slightly_better")
    with pytest.raises(AdapterError, match="score_A and score_B must be numbers"):
        adapt("shp", shp_row("many", 2), "x.jsonl")


def test_weekly_ingests_an_shp_batch(tmp_path):
    rows = [shp_row(40, 5, labels=1, post_id=f"post{i}") for i in range(3)] + [shp_row(6, 2, labels=1, post_id="q")]
    write_jsonl(tmp_path / "shp" / "part-0.jsonl", rows)
    store = PreferenceStore(tmp_path / "store")
    res = store.ingest(str(tmp_path / "shp"), PreferenceConfig(), "shp")
    assert res.status == "ingested" and res.accepted == 4
    got = {p["pair_id"]: p["strength"] for p in store.pairs([res.version]).to_pylist()}
    assert got == {"shp-post0-ca-cb": "significantly_better", "shp-post1-ca-cb": "significantly_better",
                   "shp-post2-ca-cb": "significantly_better", "shp-q-ca-cb": "slightly_better"}


def test_the_printed_report_is_capped_and_says_where_the_rest_is():
    from pipelines.weekly import shorten

    report = "\n".join(["batch:   b", "result:  REJECTED", "problems (250):"] + [f"  b/p.jsonl:{i}: x: y" for i in range(250)])
    short = shorten(report, None).splitlines()
    assert len(short) == 3 + 200 + 1 and short[-1] == "  ... and 50 more (all of them with --report FILE)"
    assert shorten(report, "store/batches/0002-ab/report.txt").endswith("all of them in store/batches/0002-ab/report.txt)")
    assert shorten("\n".join(report.splitlines()[:20]), None) == "\n".join(report.splitlines()[:20])
