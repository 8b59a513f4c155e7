"""What a person sees in the console of a pipeline run, and where everything else goes.

The console shows where the logs go (once), one line per step when it ends (cached or ran,
seconds, key metrics), the lines a user must see from inside a step (an interrupted training
resuming from its checkpoint), a failing step's error with the path of its log, and the final
table. On a terminal, one status line shows the steps in flight and how far each is: training
steps (read from the step's MLflow run), rows (Ray Data's bar), answers sampled or PPO iterations
(`[progress]` lines in the step's log); to a file or pipe nothing is redrawn.

Everything else goes to files under `<output_dir>/logs/<invocation>/`:
    driver.log    this process's stdout and stderr (ray.init, MLflow, library warnings)
    <step>.log    the step's process, its Ray Train workers and its worker tasks (DeepSpeed's info
                  logs, deprecation warnings, Ray Train's per-report lines, Ray Data and Tune output)
    ray/          a link to Ray's own session logs (the Train controller's state queries, raylet)
`latest` next to the invocations links the newest. LLAMA2_VERBOSE=1 puts everything on the
console instead, as Ray prints it.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from steps.engine.launch import PROGRESS_PREFIX, output_to

VERBOSE_ENV = "LLAMA2_VERBOSE"
# Lines of a step's log repeated on the console: what a user must see (the engine's resume message).
NOTICE = re.compile(r"^\[engine\] resumed ")
PROGRESS_EVERY_S = 2.0  # MLflow queries for the status line (terminal only)
RAY_TQDM_PREFIX = '{"__magic_token__": "__ray_tqdm_magic_token__"'


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").lower() not in ("", "0", "false", "no")


def logged_step(log_file: str | None, *args: Any, **kwargs: Any) -> Any:
    """runner.execute_step with the step's output (and that of the Ray Train workers and worker
    tasks it starts, steps/engine/launch.py) in `log_file`. Runs as the step's Ray task; the
    worker process is reused by later steps, so the redirection and the variable end with it."""
    from pipelines.runner import execute_step

    with output_to(log_file):  # also names the log in STEP_LOG_ENV for the tasks the step starts
        return execute_step(*args, **kwargs)


def fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def key_metrics_text(name: str, metrics: dict[str, Any], key_metrics: dict[str, list[str]] | None) -> str:
    """The step's key metrics (by step name, else base name: rs_v3 -> rs), as in the final table."""
    base = re.sub(r"_v\d+$", "", name)
    keys = (key_metrics or {}).get(name) or (key_metrics or {}).get(base) or list(metrics)[:4]
    return ", ".join(f"{k}={fmt_value(metrics[k])}" for k in keys if k in metrics)


def step_line(elapsed: float, name: str, cached: bool, seconds: float, metrics: dict[str, Any],
              key_metrics: dict[str, list[str]] | None = None) -> str:
    shown = key_metrics_text(name, metrics, key_metrics)
    return (f"[{elapsed:7.1f}s] {name}: {'cached' if cached else 'done'} ({seconds:.1f}s)"
            + (f"  {shown}" if shown else ""))


def bar(done: int, total: int, width: int = 20) -> str:
    full = min(width, max(0, round(width * done / max(total, 1))))
    return "#" * full + "." * (width - full)


@dataclass(frozen=True)
class Progress:
    """How far a step in flight is: training steps (its MLflow run), rows (Ray Data's bar),
    answers or iterations (its `[progress]` lines)."""

    done: int
    total: int | None
    unit: str
    loss: float | None = None


def status_line(elapsed: float, finished: int, total: int, running: list[str],
                progress: dict[str, Progress], width: int) -> str:
    """The terminal's one status line: steps done of all, then each step in flight with its
    progress where there is some."""
    parts = []
    for name in running:
        p = progress.get(name)
        if p is None:
            parts.append(name)
            continue
        shown = f"{name} [{bar(p.done, p.total)}] {p.done}/{p.total} {p.unit}" if p.total else \
            f"{name} {p.done} {p.unit}"
        parts.append(shown + (f" loss {p.loss:.3f}" if p.loss is not None else ""))
    line = f"[{elapsed:7.1f}s] {finished}/{total} steps | " + (" | ".join(parts) or "starting")
    return line if len(line) <= width else line[: max(width - 3, 0)] + "..."


def step_progress(line: str) -> Progress | None:
    """Answers (or other units) done of a step's sampling or iterations, from the line
    steps/engine/launch.py:report_progress writes to the step's log: `[progress] 128/512 answers`."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    m = re.fullmatch(r"(\d+)/(\d+) (\w[\w ]*)", line[len(PROGRESS_PREFIX):].strip())
    return Progress(int(m[1]), int(m[2]), m[3]) if m else None


def ray_data_progress(line: str) -> Progress | None:
    """Rows done of a Ray Data job, from the progress line Ray Data writes to a worker's stdout
    (tqdm_ray's JSON, meant for a driver that shows worker output; here it lands in the step log).
    Position 0 is the dataset's overall bar."""
    if not line.startswith(RAY_TQDM_PREFIX):
        return None
    try:
        bar_state = json.loads(line)
    except ValueError:
        return None
    if bar_state.get("pos") != 0 or "x" not in bar_state:
        return None
    total = bar_state.get("total")
    return Progress(int(bar_state["x"]), int(total) if total else None, "rows")


class TrainingProgress:
    """Training steps of the pipeline's running step runs, from the metrics the engine's rank 0
    logs to them (train/loss at every logged step, train/total_steps once)."""

    def __init__(self, tracking: Any):
        self.tracking = tracking
        self._client = None

    def __call__(self) -> dict[str, Progress]:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.tracking.uri)
        runs = self._client.search_runs(
            [self.tracking.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.tracking.parent_run_id}' "
                          f"and attributes.status = 'RUNNING'")
        out: dict[str, Progress] = {}
        for run in runs:
            metrics = run.data.metrics
            if "train/loss" not in metrics:
                continue
            history = self._client.get_metric_history(run.info.run_id, "train/loss")
            step = max((m.step for m in history), default=0)
            steps = metrics.get("train/total_steps")
            out[run.data.tags.get("step", run.info.run_name)] = Progress(
                step, int(steps) if steps else None, "steps", metrics["train/loss"])
        return out


def _survivor(stream: TextIO, fd: int) -> tuple[TextIO, bool]:
    """A stream that still reaches the console once fd `fd` goes to the driver log: a duplicate of
    the fd when `stream` writes to it, else `stream` itself (pytest's capture, say)."""
    try:
        if stream.fileno() == fd:
            dup = os.fdopen(os.dup(fd), "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8",
                            errors="replace")
            return dup, True
    except (AttributeError, OSError, io.UnsupportedOperation, ValueError):
        pass
    return stream, False


class Console:
    """The pipeline's console (see the module docstring). Use as a context manager around the
    run: inside it this process's own stdout/stderr go to driver.log, and `out`/`err` reach
    the console."""

    def __init__(self, root: Path, *, total: int = 0, quiet: bool | None = None,
                 out: TextIO | None = None, err: TextIO | None = None):
        self.quiet = not verbose() if quiet is None else quiet
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.total, self.finished = total, 0
        self.started = time.time()
        self.dir: Path | None = None
        if self.quiet:
            self.dir = Path(root) / "logs" / time.strftime(f"%Y%m%d-%H%M%S-{os.getpid()}")
            self.dir.mkdir(parents=True, exist_ok=True)
            _relink(self.dir.parent / "latest", self.dir.name)
        self.progress: Callable[[], dict[str, Progress]] | None = None  # e.g. TrainingProgress
        self._owned: list[TextIO] = []
        self._saved: tuple[int, int] | None = None
        self._offsets: dict[str, int] = {}
        self._partial: dict[str, str] = {}
        self._done: set[str] = set()
        self._status = ""
        self._progress: dict[str, Progress] = {}  # MLflow's, refreshed every PROGRESS_EVERY_S
        self._rows: dict[str, Progress] = {}  # Ray Data's bars and [progress] lines, from the step logs
        self._progress_at = 0.0
        self.tty = False  # set on entering: the stream to look at may change there

    # ---------------------------------------------------------------- the process's own output
    def __enter__(self) -> Console:
        if self.dir is not None:
            self.out, own_out = _survivor(self.out, 1)
            self.err, own_err = _survivor(self.err, 2)
            self._owned = [s for s, own in ((self.out, own_out), (self.err, own_err)) if own]
            sys.stdout.flush()
            sys.stderr.flush()
            fd = os.open(self.dir / "driver.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._saved = os.dup(1), os.dup(2)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            self.say(f"logs: {self.dir}")
        self.tty = _isatty(self.err)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.poll([])  # the last notices
        self._clear()
        self._status = ""
        if exc_type is not None and self.dir is not None and not issubclass(exc_type, SystemExit):
            self.say(f"error: the run stopped ({exc_type.__name__}); its logs: {self.dir}")
        if self._saved is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(self._saved[0], 1)
            os.dup2(self._saved[1], 2)
            for fd in self._saved:
                os.close(fd)
            self._saved = None
        for s in self._owned:
            s.close()
        self._owned = []

    # ---------------------------------------------------------------- lines
    def say(self, text: str) -> None:
        """A line on stderr (progress, notices, errors)."""
        self._write(self.err, text)

    def show(self, text: str) -> None:
        """A line on stdout (the results: the final table and where to look at them)."""
        self._write(self.out, text)

    def _write(self, stream: TextIO, text: str) -> None:
        self._clear()
        stream.write(text + "\n")
        stream.flush()
        self._draw()

    def step_log(self, name: str) -> str | None:
        return str(self.dir / f"{name}.log") if self.dir is not None else None

    def link_ray_logs(self) -> None:
        """`ray/` in the log dir -> the session logs of the Ray this process is connected to."""
        if self.dir is None:
            return
        try:
            import ray

            logs = ray._private.worker.global_worker.node.get_logs_dir_path()  # no public API for it
        except Exception:  # a client connection or another Ray version: no link, nothing lost
            return
        _relink(self.dir / "ray", logs)

    def step_done(self, name: str, cached: bool, seconds: float, metrics: dict[str, Any],
                  key_metrics: dict[str, list[str]] | None = None) -> None:
        self.poll([])  # notices of the step (its resume message) before its line
        self._done.add(name)
        self.finished += 1
        self._clear()
        self._status = ""  # stale now: the next poll draws it again
        self.say(step_line(time.time() - self.started, name, cached, seconds, metrics, key_metrics))

    def failure(self, step: str, message: str) -> None:
        self.poll([])
        self._clear()
        self.tty, self._status = False, ""  # the run is over: no status line between the error's lines
        self.say(f"\nerror: {message}")
        if self.dir is not None:
            self.say(f"  the step's log:  {self.step_log(step)}")
            self.say(f"  all logs:        {self.dir} (driver.log, one file per step, ray/ for Ray's own)")

    # ---------------------------------------------------------------- while steps run
    def poll(self, running: Iterable[str]) -> None:
        """Repeat new notice lines of the step logs; on a terminal, redraw the status line."""
        if self.dir is None:
            return
        for path in sorted(self.dir.glob("*.log")):
            name = path.stem
            if name == "driver":
                continue
            for line in self._new_lines(name, path):
                if NOTICE.match(line):
                    self.say(f"[{time.time() - self.started:7.1f}s] {name}: {line}")
                elif self.tty and (done := ray_data_progress(line) or step_progress(line)) is not None:
                    self._rows[name] = done
        if self.tty:
            running = [r for r in running if r not in self._done and (self.dir / f"{r}.log").exists()]
            if self.progress is not None and time.time() - self._progress_at >= PROGRESS_EVERY_S:
                self._progress_at = time.time()
                try:
                    self._progress = self.progress()
                except Exception:  # a busy sqlite store or a server hiccup: keep the last figures
                    pass
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self._clear()
            self._status = status_line(time.time() - self.started, self.finished, self.total, running,
                                       {**self._rows, **self._progress}, width)
            self._draw()

    def _new_lines(self, name: str, path: Path) -> list[str]:
        try:
            size = path.stat().st_size
            if size <= self._offsets.get(name, 0):
                return []
            with open(path, "rb") as f:
                f.seek(self._offsets.get(name, 0))
                chunk = f.read(size - self._offsets.get(name, 0))
        except OSError:
            return []
        self._offsets[name] = size
        text = self._partial.pop(name, "") + chunk.decode("utf-8", errors="replace")
        lines = text.split("\n")
        if lines[-1]:
            self._partial[name] = lines[-1]  # a line still being written
        return [ln.rstrip("\r") for ln in lines[:-1]]

    def _clear(self) -> None:
        if self.tty and self._status:
            self.err.write("\r\033[K")
            self.err.flush()

    def _draw(self) -> None:
        if self.tty and self._status:
            self.err.write(self._status)
            self.err.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _relink(link: Path, target: str) -> None:
    """Point the symlink `link` at `target`, replacing an older link (not atomic: informational)."""
    try:
        if link.is_symlink():
            link.unlink()
        link.symlink_to(target)
    except OSError:
        pass
