"""The weekly preference batch: validate and ingest it, then one more RLHF iteration on top of
the champion (V6, V7, ...), by hand or by watching a landing location.

    python pipelines/weekly.py --batch s3://vendor/prefs/2026-W49/          # ingest + the next iteration
    python pipelines/weekly.py --batch s3://vendor/prefs/2026-w48/ --ingest-only
    python pipelines/weekly.py --batch ./hh-rlhf/harmless-base --format hh --ingest-only --output-dir runs/a
    python pipelines/weekly.py --watch s3://vendor/prefs/ --interval 600    # poll, run each new batch once
    python pipelines/weekly.py --watch /mnt/landing --once                  # one check, then exit

A weekly run (`--batch` without `--ingest-only`) ingests the batch (the same ingestion), records
it as the next iteration i (after rlhf.iterations, or after the last weekly one) in
<output dir>/weekly/state.json together with the model it starts from (the champion now), and
runs the DAG of pipelines/full.py plus every weekly iteration: `landing_v{i}` (the batch copied
into the store) -> `prefs_v{i}` -> `rm_helpfulness_v{i}` || `rm_safety_v{i}` -> `rs_v{i}` (and
PPO per rlhf.ppo_from) -> `eval_v{i}` (against SFT, V(i-1) and the champion; the champion rule).
Everything before is a cache hit. Its MLflow parent run is named `weekly-<ISO week>-v<i>-<preset>`.
`--watch` (pipelines/watch.py) documents the landing contract and the watcher's guarantees.

Exit status (stable; scripts and schedules rely on it):
    0  every row was ingested (and the iteration ran), the batch had been ingested or trained on
       before (a no-op that says so), or a check found nothing new
    3  the valid rows were ingested and the invalid ones quarantined (see the report), and the
       iteration ran
    2  the batch was rejected (the store is unchanged), a bad argument or config
    1  an unexpected failure: a step failed (run again to resume; finished steps are cached), the
       store stayed locked past preference.lock_timeout_s, an unreachable location
    4  another weekly run (a watcher or --batch) holds the storage root's lock: nothing was done;
       a watcher's batch waits for the next check
The report is printed, and written beside the batch's record in the store (report.txt) when
the batch was ingested, to <output dir>/weekly/reports/ when it was rejected by a weekly run, or
to --report PATH when given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):  # `python pipelines/weekly.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.config import Config, ConfigError, load_cli_config
from pipelines.watch import EXIT_BUSY, EXIT_FAILED, Busy, WeeklyState, check_once, pending, watch
from steps.preference_adapters import FORMATS
from steps.preference_store import EXIT_REJECTED, StoreBusy, store_root
from steps.preferences import store

if TYPE_CHECKING:  # the DAG's modules (Ray, MLflow, torch) load only when a run starts: checks stay quick
    from pipelines.runner import StepSpec


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--batch", help="the batch: a directory, a single file, or a URI pyarrow.fs reads")
    src.add_argument("--watch", metavar="URI",
                     help="the landing location to poll: one batch per subdirectory, complete once _SUCCESS is there")
    p.add_argument("--ingest-only", action="store_true", help="validate and ingest the batch; train nothing")
    p.add_argument("--format", choices=FORMATS, default="contract",
                   help="the batch's format: the batch contract (default) or a public format to adapt")
    p.add_argument("--once", action="store_true", help="--watch: one check, then exit (exit status above)")
    p.add_argument("--interval", type=float, default=600.0, help="--watch: seconds between checks")
    p.add_argument("--only", metavar="NAME@DIGEST",
                   help="--watch: consider only this batch (as --pending prints it): a per-batch job")
    p.add_argument("--pending", action="store_true",
                   help="--watch: print the key (NAME@DIGEST) of the batch the next check would run, start nothing")
    p.add_argument("--wait", type=float, default=0.0,
                   help="--batch: seconds to wait for another weekly run's lock before giving up (exit 4)")
    p.add_argument("--config", default=None, help="preset name (tiny, 7b, ...) or YAML path; default tiny")
    p.add_argument("--output-dir", default=None, help="the storage root (artifacts, preference store, weekly state)")
    p.add_argument("--report", default=None, help="also write the report to this file")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = p.parse_args(argv)
    if args.watch is None and (args.once or args.only or args.pending):
        p.error("--once, --only and --pending go with --watch")
    if args.watch is not None and (args.ingest_only or args.format != "contract"):
        p.error("--watch runs contract batches through the weekly run; --ingest-only and --format go with --batch")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_cli_config(args.config, args.output_dir, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REJECTED
    if args.ingest_only:
        return ingest_only(cfg, args)
    root = store_root(cfg.run.output_dir, "")  # the storage root, resolved as the preference store resolves it
    cfg.run.output_dir = str(root)  # absolute: Ray workers and the state file agree on it
    state = WeeklyState(root)
    if args.batch is not None:
        try:
            with state.lock(args.wait):
                return run_weekly(cfg, args.batch, args.format, args.report)
        except Busy as e:
            print(f"error: {e}: nothing done; run again later", file=sys.stderr)
            return EXIT_BUSY

    def start(uri: str, name: str) -> int:
        return run_weekly(cfg, uri, "contract", None, name=name)

    try:
        if args.pending:
            keys = [b.key(d) for b, d, why in pending(args.watch, state) if d and not why.startswith("rejected")]
            print(keys[0] if keys else "")
            return 0
        if args.once:
            result = check_once(args.watch, state, start, only=args.only)
            print(result.message)
            return result.exit_code
        watch(args.watch, state, start, args.interval)
    except (FileNotFoundError, OSError) as e:  # the landing location is unreachable: try again later
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def ingest_only(cfg: Config, args: argparse.Namespace) -> int:
    try:
        result = store(cfg).ingest(args.batch, cfg.preference, args.format)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REJECTED
    except (StoreBusy, OSError) as e:  # a busy store, an unreachable bucket, a full disk: try again later
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    if args.report:
        Path(args.report).write_text(result.report + "\n", encoding="utf-8")
    print(shorten(result.report, args.report or (result.record_dir and result.record_dir / "report.txt")))
    return result.exit_code


# ----------------------------------------------------------------------------- the weekly run
def weekly_specs(cfg: Config, iterations: list[dict[str, Any]]) -> list[StepSpec]:
    """pipelines/full.py's DAG plus every weekly iteration recorded so far. Iteration i starts
    from the model recorded with it (the champion when its batch was chosen), so its steps keep
    their fingerprints in later weeks whatever the champion became; its batch is `landing_v{i}`
    where the tiny preset's iterations have the simulated vendor (annotate_v{i})."""
    from pipelines.full import pipeline, rlhf_iterations
    from pipelines.runner import StepSpec
    from steps import landing

    specs = pipeline(cfg)
    for it in iterations:
        i, v = it["iteration"], f"_v{it['iteration']}"
        specs.append(StepSpec(f"landing{v}", landing, "preferences", (),
                              params={"iteration": i, "source": it["source"], "digest": it["digest"]},
                              tags={"rlhf_version": f"v{i}", "batch": it["name"]}, light=True))
        for s in rlhf_iterations(cfg, first=i, last=i, chat=it["from"]):
            if s.name == f"annotate{v}":
                continue
            if s.name == f"prefs{v}":
                s = replace(s, inputs={**s.inputs, "batch": f"landing{v}"})
            specs.append(s)
    return specs


def champion_step(root: Path, specs: list[StepSpec], last: int, cfg: Config) -> str | None:
    """The step whose model is the champion after iteration `last` (from eval_v{last}'s state),
    or None while eval_v{last} is not complete."""
    from pipelines.artifacts import ArtifactStore
    from pipelines.runner import plan_fingerprints

    fps = plan_fingerprints(specs, cfg)
    art = ArtifactStore(root).get(f"eval_v{last}", fps[f"eval_v{last}"])
    if art is None:
        return None
    path = Path(json.loads(art.file("state.json").read_text())["champion"]["path"])
    step = path.parent.name  # <root>/<step>/<fingerprint>: the name holds wherever the root was copied
    if step not in {s.name for s in specs}:
        raise ValueError(f"eval_v{last}: the champion {path} is no step of this pipeline")
    return step


def trained_in(root: Path, specs: list[StepSpec], cfg: Config, version: str) -> str | None:
    """The prefs_v{i} snapshot that already holds store batch `version`, if any."""
    from pipelines.artifacts import ArtifactStore
    from pipelines.runner import plan_fingerprints

    fps = plan_fingerprints(specs, cfg)
    for s in specs:
        art = ArtifactStore(root).get(s.name, fps[s.name]) if s.name.startswith("prefs_v") else None
        if art and any(b["version"] == version for b in json.loads(art.file("batches.json").read_text())["batches"]):
            return s.name
    return None


def run_weekly(cfg: Config, uri: str, fmt: str, report: str | None, name: str | None = None) -> int:
    """Ingest `uri` and run its RLHF iteration (the caller holds the weekly lock); an exit status.

    A rejected batch stops here, before anything runs. Otherwise the iterations recorded before
    are completed first (a fresh storage root runs full.py's DAG, a weekly run that failed
    resumes from its cached steps), so the new iteration starts from a known champion."""
    from pipelines.full import KEY_METRICS
    from pipelines.session import run_pipeline

    metrics = {**KEY_METRICS, "landing": ["files", "bytes"],
               "eval": [*KEY_METRICS["eval"], "win_rate.vs_champion.judge", "champion.promoted"]}
    root = Path(cfg.run.output_dir)
    state = WeeklyState(root)
    week = time.strftime("%G-W%V", time.gmtime())
    iterations = state.read()["iterations"]
    last = iterations[-1]["iteration"] if iterations else cfg.rlhf.iterations
    specs = weekly_specs(cfg, iterations)
    try:
        result = store(cfg).ingest(uri, cfg.preference, fmt)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REJECTED
    except (StoreBusy, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    if report:
        Path(report).write_text(result.report + "\n", encoding="utf-8")
    rejected_report = state.report_path(result.digest)
    print(shorten(result.report, report or (result.record_dir / "report.txt" if result.record_dir else rejected_report)))
    name = name or Path(uri.rstrip("/")).name
    if result.status == "rejected":
        rejected_report.parent.mkdir(parents=True, exist_ok=True)
        rejected_report.write_text(result.report + "\n", encoding="utf-8")
        state.record(result.digest, name=name, source=uri, status="rejected", exit_code=EXIT_REJECTED)
        return EXIT_REJECTED
    if champion_step(root, specs, last, cfg) is None:
        print(f"eval_v{last} is not complete: running the iterations up to V{last} first", flush=True)
        if run_pipeline(cfg, specs, title=f"weekly-{week}-v{last}", key_metrics=metrics) != 0:
            return EXIT_FAILED

    done = next((f"V{it['iteration']} (week {it['week']})" for it in iterations if it["digest"] == result.digest),
                None) or trained_in(root, specs, cfg, result.version)
    if done:  # everything up to V{last} is complete by now
        print(f"batch {name} ({result.version}) was trained on in {done}: nothing to do")
        state.record(result.digest, name=name, source=uri, status="done", exit_code=0)
        return 0
    entry = {"iteration": last + 1, "digest": result.digest, "source": uri, "name": name, "week": week,
             "store_version": result.version, "from": champion_step(root, specs, last, cfg),
             "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    data = state.read()
    data["iterations"].append(entry)
    state.write(data)
    i = entry["iteration"]
    print(f"weekly run {week}: batch {name} ({result.version}) is iteration V{i}, starting from {entry['from']}",
          flush=True)
    rc = run_pipeline(cfg, weekly_specs(cfg, data["iterations"]), title=f"weekly-{week}-v{i}", key_metrics=metrics)
    if rc != 0:  # a failed step, or a cluster that refused the run: the next run resumes it
        state.record(result.digest, name=name, source=uri, status="failed", iteration=i, exit_code=EXIT_FAILED)
        return EXIT_FAILED
    state.record(result.digest, name=name, source=uri, status="done", iteration=i, exit_code=result.exit_code)
    return result.exit_code


def shorten(report: str, full: object, limit: int = 200) -> str:
    """The report with at most `limit` problem lines (a broken 100k-row batch has 100k problems)."""
    lines = report.splitlines()
    head = next((i + 1 for i, line in enumerate(lines) if line.startswith("problems (")), len(lines))
    if len(lines) - head <= limit:
        return report
    where = f"all of them in {full}" if full else "all of them with --report FILE"
    return "\n".join(lines[:head + limit] + [f"  ... and {len(lines) - head - limit} more ({where})"])


if __name__ == "__main__":
    sys.exit(main())
