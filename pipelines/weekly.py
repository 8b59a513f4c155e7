"""The weekly preference batch: validate and ingest it (`--ingest-only`), and (a later issue)
one more RLHF iteration on top of the champion.

    python pipelines/weekly.py --batch s3://vendor/prefs/2026-w48/ --ingest-only
    python pipelines/weekly.py --batch ./hh-rlhf/harmless-base --format hh --ingest-only --output-dir runs/a
    python pipelines/weekly.py --batch ./batch --ingest-only preference.on_error=fail

Exit status (stable; scripts and schedules rely on it):
    0  every row was ingested, or the batch had been ingested before (a no-op that says so)
    3  the valid rows were ingested and the invalid ones quarantined (see the report)
    2  the batch was rejected (the store is unchanged), a bad argument or config, or a mode
       that is not available yet
    1  an unexpected failure (e.g. the store stayed locked past preference.lock_timeout_s)
The report is printed, and written beside the batch's record in the store (report.txt) when
the batch was ingested, or to --report PATH when given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python pipelines/weekly.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.config import ConfigError, load_cli_config
from steps.preference_adapters import FORMATS
from steps.preference_store import EXIT_REJECTED, StoreBusy
from steps.preferences import store

EXIT_FAILED = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", required=True,
                   help="the batch: a directory, a single file, or a URI pyarrow.fs reads")
    p.add_argument("--ingest-only", action="store_true", help="validate and ingest the batch; train nothing")
    p.add_argument("--format", choices=FORMATS, default="contract",
                   help="the batch's format: the batch contract (default) or a public format to adapt")
    p.add_argument("--config", default=None, help="preset name (tiny, 7b, ...) or YAML path; default tiny")
    p.add_argument("--output-dir", default=None, help="storage root holding the preference store")
    p.add_argument("--report", default=None, help="also write the report to this file")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_cli_config(args.config, args.output_dir, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REJECTED
    if not args.ingest_only:
        print("error: the weekly RLHF iteration (weekly.py without --ingest-only) is not available yet; "
              "use --ingest-only to validate and ingest the batch", file=sys.stderr)
        return EXIT_REJECTED
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
