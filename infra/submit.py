"""Submit a pipeline to a Ray cluster as a job whose submission id is derived from its inputs.

    RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.llama2-secrets/ray_auth_token \\
      python infra/submit.py --address http://127.0.0.1:8265 -- --config 7b

The id hashes the pipeline script, its arguments (preset, overrides, output dir, batch) and
the code, which includes the preset files: every file `git ls-files` lists, or, in an image
without a git checkout, the files under pipelines/, steps/, model/ and configs/. Submitting the same inputs
again, say a retry after the client lost its connection, finds that job and follows it instead
of running it twice: a job that is pending, running or succeeded is not resubmitted. A job that
failed or was stopped is resubmitted under the same id plus `-retry<N>` (finished steps are
cached on the shared file system, so the retry resumes). Arguments after `--` go to the script.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ACTIVE_OR_DONE = {"PENDING", "RUNNING", "SUCCEEDED"}


CODE_DIRS = ("pipelines", "steps", "model", "configs")


def _code_files(root: Path) -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, check=True, capture_output=True).stdout
        return sorted(n for n in out.decode().split("\0") if n)
    except (OSError, subprocess.CalledProcessError):  # no git, or not a checkout (the images)
        return sorted(str(f.relative_to(root)) for d in CODE_DIRS for f in (root / d).rglob("*")
                      if f.is_file() and "__pycache__" not in f.parts)


def code_digest(root: Path = ROOT) -> str:
    """sha256 over the code files' paths and current contents (uncommitted edits count)."""
    h = hashlib.sha256()
    for name in _code_files(root):
        path = root / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def submission_id(script: str, script_args: list[str], root: Path = ROOT) -> str:
    """`<script>-<preset>-<16 hex>`: the config follows from the preset files (code) and the
    arguments, so these three are the job's inputs."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", default="tiny")
    preset = Path(p.parse_known_args(script_args)[0].config).stem
    inputs = {"script": script, "args": script_args, "code": code_digest(root)}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return f"{Path(script).stem}-{preset}-{digest}"


def job_status(address: str, job_id: str) -> str | None:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    try:
        return str(client.get_job_status(job_id).value)
    except RuntimeError as e:  # the SDK's "job does not exist"
        if "does not exist" in str(e):
            return None
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", required=True, help="the cluster's dashboard URL, e.g. http://127.0.0.1:8265")
    p.add_argument("--script", default="pipelines/full.py")
    p.add_argument("--no-wait", action="store_true", help="submit and return; do not stream the logs")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="after --: arguments of the script")
    args = p.parse_args(argv)
    script_args = args.script_args[1:] if args.script_args[:1] == ["--"] else args.script_args

    base = submission_id(args.script, script_args)
    job_id, attempt = base, 1
    while (status := job_status(args.address, job_id)) is not None and status not in ACTIVE_OR_DONE:
        attempt += 1  # FAILED or STOPPED: the next attempt gets its own id
        job_id = f"{base}-retry{attempt}"
    if status is not None:
        print(f"job {job_id} with these inputs is {status}: not submitting it again", flush=True)
        if status == "SUCCEEDED" or args.no_wait:
            return 0
        return subprocess.call(["ray", "job", "logs", "--address", args.address, "--follow", job_id])
    cmd = ["ray", "job", "submit", "--address", args.address, "--submission-id", job_id,
           "--working-dir", str(ROOT)] + (["--no-wait"] if args.no_wait else [])
    print(f"submitting job {job_id}", flush=True)
    return subprocess.call(cmd + ["--", "python", args.script, *script_args], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
