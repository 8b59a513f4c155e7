"""Content-addressed artifacts.

An artifact is a directory `<root>/<step>/<fingerprint>/` holding the step's files plus
`manifest.json` (step name and version, config subset, input fingerprints, file checksums,
summary metrics). The fingerprint hashes everything that determines the output, so the
same inputs and config always map to the same path, and a path that exists is complete:
a step writes into a staging directory and the runner moves it into place in one rename
(on object stores, the manifest is written last and its presence marks completion).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.weights import file_sha256

MANIFEST = "manifest.json"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(step: str, version: str, config: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    """Hash of what determines a step's output: its code version, config subset and inputs."""
    payload = canonical_json({"step": step, "version": version, "config": config, "inputs": dict(inputs)})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def tree_checksums(root: Path) -> dict[str, str]:
    """sha256 of every file under root, keyed by relative posix path (manifest excluded)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(root).as_posix()] = file_sha256(p)
    return out


@dataclass(frozen=True)
class Artifact:
    """A complete artifact on local disk: what steps receive as inputs."""

    step: str
    fingerprint: str
    path: Path
    manifest: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})

    def file(self, name: str) -> Path:
        p = self.path / name
        if not p.exists():
            raise FileNotFoundError(f"artifact {self.step}/{self.fingerprint} has no file {name!r}")
        return p

    @classmethod
    def load(cls, path: Path) -> Artifact:
        manifest = json.loads((path / MANIFEST).read_text())
        return cls(manifest["step"], manifest["fingerprint"], path, manifest)


class ArtifactStore:
    """Artifacts under a local root directory.

    Object-store roots (s3://, gs://) are mirrored: a cluster mounts or syncs the bucket to
    the same local path on every node (see infra/), which keeps steps plain file code.
    """

    def __init__(self, root: str | os.PathLike):
        root = str(root)
        if "://" in root and not root.startswith("file://"):
            raise ValueError(
                f"storage root {root!r}: mount object stores on a shared path (infra/README.md) "
                "and point run.output_dir at the mount"
            )
        self.root = Path(root.removeprefix("file://")).resolve()

    def path(self, step: str, fp: str) -> Path:
        return self.root / step / fp

    def get(self, step: str, fp: str) -> Artifact | None:
        p = self.path(step, fp)
        return Artifact.load(p) if (p / MANIFEST).exists() else None

    def work_dir(self, step: str, fp: str) -> Path:
        """Scratch space that survives a crash (checkpoints live here) and is removed on success."""
        p = self.root / step / ".work" / fp
        p.mkdir(parents=True, exist_ok=True)
        return p

    def staging_dir(self, step: str, fp: str) -> Path:
        p = self.root / step / ".staging" / f"{fp}-{uuid.uuid4().hex[:8]}"
        p.mkdir(parents=True)
        return p

    def publish(self, staging: Path, manifest: dict[str, Any]) -> Artifact:
        """Write the manifest and move staging into its content-addressed place atomically."""
        step, fp = manifest["step"], manifest["fingerprint"]
        manifest = {**manifest, "files": tree_checksums(staging)}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        final = self.path(step, fp)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staging, final)
        except OSError:
            if (final / MANIFEST).exists():  # another attempt published the same content first
                shutil.rmtree(staging, ignore_errors=True)
            else:
                raise
        shutil.rmtree(self.root / step / ".work" / fp, ignore_errors=True)
        return Artifact.load(final)

    def verify(self, artifact: Artifact) -> list[str]:
        """Files whose checksum no longer matches the manifest (empty when intact)."""
        expected = artifact.manifest.get("files", {})
        actual = tree_checksums(artifact.path)
        return sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))

    def check(self, artifact: Artifact) -> Artifact:
        """The artifact if every file matches its manifest checksum; else ArtifactCorrupted
        naming the files (truncated, altered, missing or added), before anything reads them."""
        bad = self.verify(artifact)
        if bad:
            raise ArtifactCorrupted(
                f"artifact {artifact.step}/{artifact.fingerprint} at {artifact.path} is corrupted: "
                f"{', '.join(str(artifact.path / b) for b in bad[:5])}"
                f"{f' and {len(bad) - 5} more' if len(bad) > 5 else ''} no longer match the checksums in "
                f"its manifest. It is not loaded. Delete {artifact.path} and re-run to recompute it.")
        return artifact


class ArtifactCorrupted(RuntimeError):
    """A stored artifact's files no longer match the checksums recorded when it was published."""
