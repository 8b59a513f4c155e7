"""What a person sees: one line per step, notices relayed from step logs, chatter in log files."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.console import (
    Console,
    Progress,
    key_metrics_text,
    ray_data_progress,
    status_line,
    step_line,
    step_progress,
)
from steps.engine.launch import output_to

REPO = Path(__file__).resolve().parent.parent


def test_step_line_shows_status_seconds_and_key_metrics():
    metrics = {"accuracy": 0.71234, "launch_seconds": 21.0, "pairs": 569, "ignored": 1.0}
    keys = {"rm_safety": ["pairs", "accuracy", "missing"]}
    line = step_line(29.25, "rm_safety_v2", False, 23.21, metrics, keys)
    assert line == "[   29.2s] rm_safety_v2: done (23.2s)  pairs=569, accuracy=0.7123"
    assert step_line(4.4, "sft", True, 0.0, {}, keys) == "[    4.4s] sft: cached (0.0s)"
    # a step without key metrics shows its first four
    assert key_metrics_text("x", {"a": 1, "b": 2.5, "c": "s", "d": 4, "e": 5}, None) == "a=1, b=2.5, c=s, d=4"


def test_status_line_shows_steps_in_flight_and_fits_the_terminal():
    line = status_line(65.0, 12, 37, ["rm_helpfulness_v1", "rm_safety_v1"],
                       {"rm_helpfulness_v1": Progress(40, 120, "steps", 0.6312)}, width=200)
    assert line.startswith("[   65.0s] 12/37 steps | rm_helpfulness_v1 [")
    assert "40/120 steps loss 0.631 | rm_safety_v1" in line and "#######......." in line
    rows = status_line(1.0, 0, 3, ["data"], {"data": Progress(7, None, "rows")}, 200)
    assert rows.endswith("| data 7 rows")
    short = status_line(65.0, 12, 37, ["rm_helpfulness_v1", "rm_safety_v1"], {}, width=30)
    assert len(short) == 30 and short.endswith("...")


def test_rows_come_from_ray_datas_progress_lines_in_the_step_log():
    line = ('{"__magic_token__": "__ray_tqdm_magic_token__", "x": 1200, "pos": 0, "desc": "Running Dataset", '
            '"total": 5000, "unit": " row", "ip": "192.0.2.2", "pid": 1, "uuid": "u", "closed": false}')
    assert ray_data_progress(line) == Progress(1200, 5000, "rows")
    assert ray_data_progress(line.replace('"pos": 0', '"pos": 2')) is None  # an operator's bar
    assert ray_data_progress("2026-11-30 pipelines INFO data running") is None
    assert ray_data_progress(line[:60]) is None  # cut short


def test_sampling_in_a_step_reports_answers_done_to_the_status_line(tmp_path, monkeypatch, capfd):
    """The rejection-sampling loop, on a real (tiny, untrained) model and tokenizer, inside the
    step-log redirection a pipeline step runs in: its [progress] lines reach the log, the console
    reads them, and nothing is printed outside a step."""
    import torch

    from model.chat import Dialogue, Turn
    from model.config import ModelConfig
    from model.generate import SamplingParams, TorchSampler
    from model.llama import Transformer
    from steps.rejection import sample_answers
    from tests.conftest import train_tiny_tokenizer

    monkeypatch.delenv("LLAMA2_VERBOSE", raising=False)
    monkeypatch.delenv("LLAMA2_STEP_LOG", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    tok = train_tiny_tokenizer(tmp_path / "sp", "what is the capital of two plus three seven hello thanks")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size,
                                    multiple_of=16, max_seq_len=64)).eval()
    sampler = TorchSampler(model, tok.eos_id, tok.pad_id)
    dialogues = [Dialogue([Turn("user", f"what is {a} plus three")]) for a in ("two", "seven", "hello")]
    params = SamplingParams(max_new_tokens=4, temperature=1.0, num_samples=2, seed=0)

    err = Terminal()
    with Console(tmp_path / "out", total=2, out=io.StringIO(), err=err) as console:
        log = console.step_log("rs_v1")
        with output_to(log):
            answers, _ = sample_answers(sampler, tok, dialogues, params, batch_size=2)
        assert [len(a) for a in answers] == [2, 2, 2]
        lines = [x for x in Path(log).read_text().splitlines() if x.startswith("[progress]")]
        assert lines == ["[progress] 4/6 answers", "[progress] 6/6 answers"]  # one per batch of 2 prompts
        console.poll(["rs_v1"])
        assert "rs_v1 [####################] 6/6 answers" in err.getvalue().split("\r\x1b[K")[-1]
    assert os.environ.get("LLAMA2_STEP_LOG") is None  # the redirection gave the variable back
    capfd.readouterr()
    sample_answers(sampler, tok, dialogues, params, batch_size=2)
    assert "[progress]" not in capfd.readouterr().out  # outside a step: no progress lines


def test_step_progress_lines_parse():
    assert step_progress("[progress] 128/512 answers") == Progress(128, 512, "answers")
    assert step_progress("[progress] 3/15 iterations\n") == Progress(3, 15, "iterations")
    assert step_progress("[progress] 3/ iterations") is None
    assert step_progress("[ppo] resumed at iteration 5 of 15") is None


def test_output_to_sends_process_level_output_to_the_file_and_restores_it(tmp_path, capfd):
    log = tmp_path / "step.log"
    with output_to(str(log)):
        os.write(1, b"fd one\n")
        os.write(2, b"fd two\n")
        subprocess.run(["echo", "from a subprocess"], check=True)  # C++ and child processes too
    os.write(1, b"back on the console\n")
    assert log.read_text().splitlines() == ["fd one", "fd two", "from a subprocess"]
    out, err = capfd.readouterr()
    assert out == "back on the console\n" and err == ""
    with output_to(None):  # no file: nothing is redirected
        os.write(1, b"untouched\n")
    assert capfd.readouterr().out == "untouched\n"


def test_console_relays_notices_keeps_chatter_in_logs_and_names_the_failing_log(tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("LLAMA2_VERBOSE", raising=False)
    out, err = io.StringIO(), io.StringIO()
    with Console(tmp_path, total=2, out=out, err=err) as console:
        log_dir = console.dir
        os.write(2, b"Failed to query Ray Train Controller actor state.\n")  # the driver's own chatter
        step_log = Path(console.step_log("pretrain"))
        step_log.write_text("DeepSpeed info: lots\n[engine] resumed pretrain from step_20 (step 20 of 40)\n"
                            "[engine] resumed half a li")  # an unfinished line is kept for later
        console.poll(["pretrain"])
        with open(step_log, "a") as f:
            f.write("ne\n")
        console.step_done("pretrain", False, 12.0, {"val_loss": 5.3}, {"pretrain": ["val_loss"]})
        console.failure("sft", "step 'sft' failed: RuntimeError: planned")
        console.show("the table")
    said = err.getvalue().splitlines()
    assert said[0] == f"logs: {log_dir}" and log_dir.parent == tmp_path / "logs"
    assert (tmp_path / "logs" / "latest").resolve() == log_dir
    assert said[1].endswith("pretrain: [engine] resumed pretrain from step_20 (step 20 of 40)")
    assert said[2].endswith("pretrain: [engine] resumed half a line")
    assert said[3].endswith("pretrain: done (12.0s)  val_loss=5.3")
    assert "error: step 'sft' failed: RuntimeError: planned" in said
    assert f"  the step's log:  {log_dir / 'sft.log'}" in said
    assert not any("DeepSpeed" in s or "Failed to query" in s for s in said)
    assert out.getvalue() == "the table\n"
    assert "Failed to query Ray Train Controller" in (log_dir / "driver.log").read_text()
    assert capfd.readouterr() == ("", "")  # nothing reached the process's own stdout/stderr
    os.write(2, b"restored\n")
    assert capfd.readouterr().err == "restored\n"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_one_status_line_redrawn_in_place(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMA2_VERBOSE", raising=False)
    monkeypatch.setenv("COLUMNS", "200")  # the terminal's width, which the status line is cut to
    err = Terminal()
    with Console(tmp_path, total=3, out=io.StringIO(), err=err) as console:
        console.progress = lambda: {"pretrain": Progress(50, 200, "steps", 5.31)}
        Path(console.step_log("pretrain")).write_text("running\n")
        Path(console.step_log("data")).write_text(
            '{"__magic_token__": "__ray_tqdm_magic_token__", "x": 10, "pos": 0, "total": 40}\n')
        console.poll(["data", "pretrain", "sft"])  # sft has not started: no log file yet
        drawn = err.getvalue().split("\r\x1b[K")[-1]
        assert "0/3 steps | data [#####...............] 10/40 rows | pretrain [#####" in drawn
        assert "50/200 steps loss 5.310" in drawn and "sft" not in drawn
        console.step_done("data", False, 3.0, {})
        console.poll(["pretrain"])
        console.failure("pretrain", "step 'pretrain' failed: boom")
    text = err.getvalue()
    assert "steps |" not in text.split("error: step 'pretrain' failed: boom")[1]  # no status amid the error
    # the step line replaces the status line, which comes back below it
    assert "\r\x1b[K[" in text and "data: done (3.0s)\n" in text


def test_verbose_keeps_everything_on_the_console(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA2_VERBOSE", "1")
    with Console(tmp_path, err=io.StringIO()) as console:
        assert console.dir is None and console.step_log("data") is None
    assert not (tmp_path / "logs").exists()


# A prefix of the tiny DAG on one small corpus (as in test_cluster_local_head.py): the console,
# not the data, is under test.
SMALL = ["--until", "tokenizer", "data.num_shards=1",
         'data.sources=[{name: web, kind: jsonl, paths: ["~/.cache/llama2-recipe/demo/web/*.jsonl"], epochs: 1}]']


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA2_VERBOSE", "RAY_ADDRESS")}
    return subprocess.run([sys.executable, "pipelines/full.py", "--output-dir", str(out), *SMALL, *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_real_run_prints_a_line_per_step_and_writes_the_chatter_to_log_files(tmp_path):
    first = _run(tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    lines = (first.stdout + first.stderr).splitlines()
    # logs, ray, a line per step; blank, header, rule, a row per step; blank, summary, MLflow
    assert len(lines) <= 3 + 2 + 3 + 2 + 3, "\n".join(lines)
    err = first.stderr.splitlines()
    assert err[0].startswith(f"logs: {tmp_path}/logs/") and err[1].startswith("ray: started a private local")
    assert [line.split("] ")[1].split(":")[0] for line in err[2:]] == ["data", "tokenizer"]
    assert "data: done" in first.stderr and "docs_out=" in first.stderr and "tokenizer: done" in first.stderr
    assert "step       status  seconds  metrics" in first.stdout and "(0 cached)" in first.stdout
    logs = Path(err[0].removeprefix("logs: "))
    assert "running ->" in (logs / "data.log").read_text()  # the step's own logging, off the console
    assert "running ->" in (logs / "tokenizer.log").read_text()
    assert (logs / "ray").is_symlink() and (logs / "driver.log").exists()

    # A step that fails at run time (SentencePiece refuses the vocabulary): its error and log path
    failed = _run(tmp_path, "tokenizer.vocab_size=1000000")
    assert failed.returncode == 1
    assert "data: cached" in failed.stderr
    assert "error: step 'tokenizer' failed:" in failed.stderr, failed.stderr
    log = next(line.split(":  ")[1] for line in failed.stderr.splitlines() if "the step's log:" in line)
    assert log.endswith("/tokenizer.log") and "Traceback" not in failed.stdout
    assert Path(log).read_text().strip(), "the failing step's log is empty"
    assert len((failed.stdout + failed.stderr).splitlines()) < 25, failed.stderr
