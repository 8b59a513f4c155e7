"""The submission path on a real Ray head on this machine: token authentication on, the jobs
API refusing requests without the token, `ray job submit` of the tiny pipeline's cheap prefix
(`--until tokenizer`) into a storage root outside the job's working-dir copy, a re-submission
of the same inputs through infra/submit.py recognised and not run twice, a second job reusing
the first one's cache, and a job without a durable storage root refused.

The head is this test's own: its own --temp-dir (so its "current cluster" file cannot steer
anyone else's `ray.init()`), its own free ports, its own process group, ended by this test
(never `ray stop`, which would end every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _get(url: str, token: str | None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _end(proc: subprocess.Popen, temp_dir: str) -> None:
    """End this head: its process group, then any process still naming its temp dir (raylet,
    GCS, workers may sit in other groups). Only processes this test started match."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    me = os.getpid()
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.info["pid"] != me and any(temp_dir in part for part in (p.info["cmdline"] or [])):
            try:
                p.kill()
            except psutil.Error:
                pass


@pytest.fixture()
def token_head():
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's unix sockets live under it
    gcs, dash, client, agent, agent_grpc, metrics, node_mgr, obj_mgr, rt_env = _free_ports(9)
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    log = open(Path(temp_dir) / "head.log", "w")
    proc = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--temp-dir", temp_dir, "--num-cpus", "2",
         "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
         "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
         "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr),
         "--runtime-env-agent-port", str(rt_env), "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                if _get(f"{url}/api/version", token)[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("head did not come up:\n" + (Path(temp_dir) / "head.log").read_text()[-3000:])
            time.sleep(1)
        yield url, env, token, f"127.0.0.1:{gcs}"
    finally:
        _end(proc, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _run(cmd: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    # Generous: about 40 s per job on an idle 2-core machine, minutes when it is shared.
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_token_head_refuses_anonymous_jobs_and_jobs_share_the_cache(token_head, tmp_path):
    url, env, token, gcs = token_head
    # The jobs API: refused without the token (and with a wrong one), served with it.
    status, _ = _get(f"{url}/api/jobs/", None)
    assert status in (401, 403), status
    assert _get(f"{url}/api/jobs/", "0" * 64)[0] in (401, 403)
    status, body = _get(f"{url}/api/jobs/", token)
    assert status == 200 and json.loads(body) == []
    # the CLI without the token is refused too
    anon = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    anon["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "no-token")
    (tmp_path / "no-token").write_text("")
    refused = _run(["ray", "job", "list", "--address", url], anon, timeout=60)
    assert refused.returncode != 0

    # A local run joins this head only when run.ray_address names it, and says so.
    join = ("import sys; from pipelines.config import load_config; from pipelines.dag import ensure_ray; "
            "ensure_ray(load_config('tiny', sys.argv[1:]))")
    named = _run([sys.executable, "-c", join, f"run.ray_address={gcs}"], env, timeout=300)
    assert named.returncode == 0, named.stderr[-3000:]
    said = next(line for line in named.stderr.splitlines() if line.startswith("ray: "))
    assert said.startswith(f"ray: joined the cluster named by run.ray_address={gcs} at ") and "(1 node)" in said
    unnamed = _run([sys.executable, "-c", join], {**env, "RAY_ADDRESS": gcs}, timeout=300)
    assert unnamed.returncode != 0 and "ClusterError" in unnamed.stderr and "run.ray_address=" in unnamed.stderr

    out_dir = tmp_path / "outputs"
    # The tiny preset's prefix on one of its corpora: the job path, not the data, is under test.
    args = ["--config", "tiny", "--until", "tokenizer", "--output-dir", str(out_dir), "data.num_shards=1",
            'data.sources=[{name: web, kind: jsonl, paths: ["~/.cache/llama2-recipe/demo/web/*.jsonl"], epochs: 1}]']
    first = _run([sys.executable, "infra/submit.py", "--address", url, "--", *args], env)
    log1 = first.stdout + first.stderr
    assert first.returncode == 0, log1[-4000:]
    assert "submitting job full-tiny-" in log1
    assert "data: done" in log1 and "tokenizer: done" in log1, log1[-4000:]
    assert "joined the cluster of this Ray job" in log1
    assert (out_dir / "tokenizer").is_dir() and (out_dir / "mlflow.db").is_file()

    # Same inputs again through submit.py: the job is found, not run twice.
    again = _run([sys.executable, "infra/submit.py", "--address", url, "--", *args], env, timeout=120)
    assert again.returncode == 0 and "SUCCEEDED: not submitting it again" in again.stdout, again.stdout
    jobs = json.loads(_get(f"{url}/api/jobs/", token)[1])
    assert len([j for j in jobs if j["type"] == "SUBMISSION"]) == 1  # (DRIVER rows: the joins above)

    # A new job (plain `ray job submit`) on the same storage root reuses the first one's work.
    second = _run(["ray", "job", "submit", "--address", url, "--working-dir", ".", "--",
                   "python", "pipelines/full.py", *args], env)
    log2 = second.stdout + second.stderr
    assert second.returncode == 0, log2[-4000:]
    assert "data: cached" in log2 and "tokenizer: cached" in log2, log2[-4000:]
    assert "(2 cached)" in log2

    # Without --output-dir the tiny preset's relative `outputs` would land in the job's copy of
    # the working directory, deleted after the job: refused before any step runs.
    lost = _run(["ray", "job", "submit", "--address", url, "--working-dir", ".", "--",
                 "python", "pipelines/full.py", "--until", "data"], env)
    log3 = lost.stdout + lost.stderr
    assert lost.returncode != 0 and "deletes after the job" in log3, log3[-4000:]
    assert "data: done" not in log3
