"""Readers: raw corpus formats -> documents {id, source, text, metadata(JSON)}.

One reader per `SourceConfig.kind`. Readers stream (a dump never sits in memory whole) and
never lose input silently: a corrupt record (invalid UTF-8, a broken JSON line, a truncated
compressed stream, malformed XML) is either raised as `CorruptInputError` naming the file and
line (`on_error="fail"`), or skipped and recorded in the `ReadReport` (`on_error="skip"`),
keeping everything read before it.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import html
import json
import lzma
import os
import re
import sqlite3
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import IO

import pyarrow.parquet as pq

from steps.data.config import SourceConfig
from steps.data.wikitext import strip_wiki_markup


class CorruptInputError(ValueError):
    def __init__(self, path: Path | str, line: int | None, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {reason}")


@dataclass
class ReadReport:
    """What a read skipped and why; part of the data step's manifest."""

    errors: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason -> count (licence, redirect, ...)
    files: int = 0

    def error(self, err: CorruptInputError, on_error: str) -> None:
        if on_error == "fail":
            raise err
        self.errors.append({"path": err.path, "line": err.line, "reason": err.reason})


def doc(source: str, doc_id: str, text: str, **meta) -> dict:
    return {"id": f"{source}/{doc_id}", "source": source, "text": text,
            "metadata": json.dumps(meta, sort_keys=True, ensure_ascii=False)}


def expand_paths(patterns: list[str], base: Path | None = None) -> list[Path]:
    """Files matching the patterns (globs, files or directories), sorted, relative to base."""
    out: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(os.path.expandvars(pattern))
        p = Path(pattern)
        if not p.is_absolute() and base is not None:
            p = base / p
        hits = sorted(Path(x) for x in glob.glob(str(p), recursive=True)) if any(c in pattern for c in "*?[") else [p]
        out.extend(h for h in hits if h.exists())
    return out


def open_text(path: Path) -> IO[bytes]:
    """Binary stream of a possibly compressed file (decoding happens per line/record)."""
    name = path.name
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".bz2"):
        return bz2.open(path, "rb")
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    return open(path, "rb")


def _decode(raw: bytes, path: Path, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptInputError(path, line, f"invalid UTF-8 at byte {e.start}") from None


def _read_all(path: Path) -> str:
    """Whole-file text; an invalid UTF-8 sequence is reported with its line number."""
    try:
        with open_text(path) as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise CorruptInputError(path, None, f"unreadable ({type(e).__name__}: {e})") from None
    try:
        return raw.decode("utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        raise CorruptInputError(path, raw.count(b"\n", 0, e.start) + 1, f"invalid UTF-8 at byte {e.start}") from None


def _rel(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.name


# ----------------------------------------------------------------------------- text and books
def read_text(src: SourceConfig, files: list[Path], report: ReadReport, on_error: str) -> Iterator[dict]:
    for path in files:
        try:
            text = _read_all(path)
        except CorruptInputError as e:
            report.error(e, on_error)
            continue
        if src.line_documents:
            for i, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    yield doc(src.name, f"{path.name}#{i}", line, path=str(path))
        else:
            yield doc(src.name, path.name, text, path=str(path))


_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_LEGAL = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>|^End of (the )?Project Gutenberg.*$", re.S | re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Drop the Project Gutenberg header before START and the licence after END."""
    if m := _GUTENBERG_START.search(text):
        text = text[m.end():]
    if m := _GUTENBERG_END.search(text):
        text = text[: m.start()]
    return _GUTENBERG_LEGAL.sub("", text).strip() + "\n"


def read_gutenberg(src: SourceConfig, files: list[Path], report: ReadReport, on_error: str) -> Iterator[dict]:
    for d in read_text(src, files, report, on_error):
        d["text"] = strip_gutenberg(d["text"])
        yield d


# ----------------------------------------------------------------------------- web text (C4 style)
def read_jsonl(src: SourceConfig, files: list[Path], report: ReadReport, on_error: str) -> Iterator[dict]:
    for path in files:
        if path.suffix == ".json" and not path.name.endswith(".jsonl.json"):
            yield from _read_json_array(src, path, report, on_error)
            continue
        line_no = 0
        try:
            with open_text(path) as f:
                for line_no, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    try:
                        record = json.loads(_decode(raw, path, line_no))
                    except json.JSONDecodeError as e:
                        report.error(CorruptInputError(path, line_no, f"invalid JSON: {e.msg}"), on_error)
                        continue
                    except CorruptInputError as e:
                        report.error(e, on_error)
                        continue
                    text = record.get(src.text_field) if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        report.error(CorruptInputError(path, line_no, f"field {src.text_field!r} missing or not a string"),
                                     on_error)
                        continue
                    meta = {k: v for k, v in record.items() if k != src.text_field and isinstance(v, (str, int, float))}
                    yield doc(src.name, f"{path.name}#{line_no}", text, **meta)
        except (OSError, EOFError) as e:  # truncated .gz/.bz2: keep what was read, report the rest
            report.error(CorruptInputError(path, line_no + 1, f"unreadable from here ({type(e).__name__}: {e})"),
                         on_error)


def _read_json_array(src: SourceConfig, path: Path, report: ReadReport, on_error: str) -> Iterator[dict]:
    try:
        records = json.loads(_read_all(path))
    except json.JSONDecodeError as e:
        report.error(CorruptInputError(path, e.lineno, f"invalid JSON: {e.msg}"), on_error)
        return
    except CorruptInputError as e:
        report.error(e, on_error)
        return
    for i, record in enumerate(records if isinstance(records, list) else []):
        text = record.get(src.text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            report.error(CorruptInputError(path, i + 1, f"record {i}: field {src.text_field!r} missing"), on_error)
            continue
        yield doc(src.name, f"{path.name}#{i}", text)


def read_parquet(src: SourceConfig, files: list[Path], report: ReadReport, on_error: str) -> Iterator[dict]:
    for path in files:
        row = 0
        try:
            pf = pq.ParquetFile(path)
            if src.text_field not in pf.schema_arrow.names:
                raise CorruptInputError(path, None, f"no column {src.text_field!r} (columns: {pf.schema_arrow.names})")
            for batch in pf.iter_batches(columns=[src.text_field], batch_size=4096):
                for text in batch.column(0).to_pylist():
                    row += 1
                    if isinstance(text, str):
                        yield doc(src.name, f"{path.name}#{row}", text)
                    else:
                        report.error(CorruptInputError(path, row, f"row {row}: {src.text_field!r} is null"), on_error)
        except CorruptInputError as e:
            report.error(e, on_error)
        except (OSError, ValueError) as e:
            report.error(CorruptInputError(path, row or None, f"unreadable Parquet ({e})"), on_error)


# ----------------------------------------------------------------------------- MediaWiki XML dumps
def read_mediawiki(src: SourceConfig, files: list[Path], report: ReadReport, on_error: str) -> Iterator[dict]:
    """One document per article (namespace 0, redirects skipped), markup stripped."""
    for path in files:
        pages = 0
        try:
            with open_text(path) as f:
                for _, el in ET.iterparse(f, events=("end",)):
                    if _local(el.tag) != "page":
                        continue
                    pages += 1
                    ns = _child_text(el, "ns")
                    title = _child_text(el, "title") or ""
                    redirect = any(_local(c.tag) == "redirect" for c in el)
                    rev = next((c for c in el if _local(c.tag) == "revision"), None)
                    text = _child_text(rev, "text") if rev is not None else None
                    el.clear()
                    if ns != "0":
                        report.skipped["wiki_non_article"] += 1
                    elif redirect or (text or "").lstrip().upper().startswith("#REDIRECT"):
                        report.skipped["wiki_redirect"] += 1
                    elif text:
                        body = strip_wiki_markup(text)
                        yield doc(src.name, f"{path.name}#{title}", f"{title}\n\n{body}", title=title)
        except ET.ParseError as e:
            report.error(CorruptInputError(path, e.position[0], f"malformed XML after {pages} pages: {e}"), on_error)
        except (OSError, EOFError) as e:
            report.error(CorruptInputError(path, None, f"truncated or unreadable after {pages} pages "
                                                       f"({type(e).__name__}: {e})"), on_error)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child_text(el: ET.Element | None, name: str) -> str | None:
    if el is None:
        return None
    for c in el:
        if _local(c.tag) == name:
            return c.text
    return None


# ----------------------------------------------------------------------------- source code
_EXT_LANG = {".py": "python", ".js": "javascript", ".ts": "typescript", ".java": "java", ".c": "c",
             ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp", ".go": "go", ".rs": "rust",
             ".rb": "ruby", ".sh": "shell", ".scala": "scala", ".kt": "kotlin", ".php": "php"}
_SPDX = re.compile(r"SPDX-License-Identifier:\s*([\w.\-+]+)")
_LICENSE_HINTS = [("MIT", re.compile(r"\bMIT License\b|Permission is hereby granted, free of charge", re.I)),
                  ("Apache-2.0", re.compile(r"Apache License,? Version 2\.0", re.I)),
                  ("BSD-3-Clause", re.compile(r"Redistribution and use in source and binary forms.*?neither the name", re.I | re.S)),
                  ("BSD-2-Clause", re.compile(r"Redistribution and use in source and binary forms", re.I)),
                  ("PSF-2.0", re.compile(r"Python Software Foundation License", re.I))]
_HEADER_COMMENT = re.compile(r"\A(?:\s*(?:#|//)[^\n]*\n)+|\A\s*/\*.*?\*/\s*\n", re.S)


def detect_license(text: str) -> str | None:
    if m := _SPDX.search(text[:4000]):
        return m.group(1)
    for name, pattern in _LICENSE_HINTS:
        if pattern.search(text[:4000]):
            return name
    return None


def strip_license_header(text: str) -> str:
    """Remove a leading comment block that is a licence/copyright boilerplate header."""
    m = _HEADER_COMMENT.match(text)
    if m and re.search(r"copyright|licen[cs]e|SPDX", m.group(0), re.I):
        return text[m.end():].lstrip("\n")
    return text


def read_code(src: SourceConfig, files: list[Path], report: ReadReport, on_error: str) -> Iterator[dict]:
    """Source trees: the repo licence (LICENSE/COPYING at the tree root) or a per-file header
    must be in `src.licenses`; files without an allowed licence are skipped and counted."""
    for root in files:
        tree = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        base = root if root.is_dir() else root.parent
        tree_license = None
        for name in ("LICENSE", "LICENSE.txt", "LICENSE.md", "COPYING"):
            if (base / name).exists():
                tree_license = detect_license((base / name).read_text(errors="replace"))
                break
        for path in tree:
            lang = _EXT_LANG.get(path.suffix)
            if lang is None:
                continue
            try:
                text = _read_all(path)
            except CorruptInputError as e:
                report.error(e, on_error)
                continue
            lic = detect_license(text) or tree_license
            if lic not in src.licenses:
                report.skipped[f"license_{lic or 'unknown'}"] += 1
                continue
            rel = _rel(path, base)
            yield doc(src.name, rel, strip_license_header(text), path=rel, language=lang, license=lic)


# ----------------------------------------------------------------------------- StackExchange dumps
class _HTMLText(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in ("p", "br", "li", "pre", "h1", "h2", "h3", "blockquote"):
            self.parts.append("\n")


def html_to_text(fragment: str) -> str:
    parser = _HTMLText()
    # dumps store Body with entities already decoded by the XML parser; a doubly escaped body
    # (only "&lt;" present) is unescaped once more
    parser.feed(html.unescape(fragment) if "&lt;" in fragment and "<" not in fragment else fragment)
    parser.close()
    return re.sub(r"\n{3,}", "\n\n", "".join(parser.parts)).strip()


def read_stackexchange(src: SourceConfig, files: list[Path], report: ReadReport, on_error: str) -> Iterator[dict]:
    """Posts.xml: one document per question = title + body + answers by score, high to low.

    A dump's answers can come any distance after their question (rows are in Id order), so a
    question cannot be emitted as it is read. Instead of holding the file in memory, rows are
    streamed (iterparse, each row and the root's reference to it cleared) into an on-disk SQLite
    table, indexed by question, then read back one question at a time: memory stays flat however
    big the dump (tests/test_data_readers.py measures it), and the disk holds about one copy."""
    for path in files:
        with tempfile.TemporaryDirectory(prefix="se-posts-") as tmp:
            db = sqlite3.connect(Path(tmp) / "posts.db")
            try:
                _load_posts(db, path, report, on_error)
                yield from _questions(db, src.name, path)
            finally:
                db.close()


def _load_posts(db: sqlite3.Connection, path: Path, report: ReadReport, on_error: str) -> None:
    db.execute("PRAGMA journal_mode=OFF")  # a scratch table: no crash safety needed
    db.execute("PRAGMA synchronous=OFF")
    db.execute("CREATE TABLE q (seq INTEGER PRIMARY KEY, id TEXT, title TEXT, body TEXT)")
    db.execute("CREATE TABLE a (seq INTEGER PRIMARY KEY, parent TEXT, score INTEGER, body TEXT)")
    rows = 0
    try:
        with open_text(path) as f:
            root = None
            for event, el in ET.iterparse(f, events=("start", "end")):
                if root is None:
                    root = el  # the first start event: without clearing it, it keeps every row
                if event != "end" or el.tag != "row":
                    continue
                a = el.attrib
                kind, pid = a.get("PostTypeId"), a.get("Id")
                if kind == "1" and pid:
                    db.execute("INSERT INTO q VALUES (?, ?, ?, ?)", (rows, pid, a.get("Title", ""), a.get("Body", "")))
                elif kind == "2" and a.get("ParentId"):
                    db.execute("INSERT INTO a VALUES (?, ?, ?, ?)",
                               (rows, a["ParentId"], int(a.get("Score", "0") or 0), a.get("Body", "")))
                rows += 1
                el.clear()
                root.clear()
    except ET.ParseError as e:  # keep the questions read before the error
        report.error(CorruptInputError(path, e.position[0], f"malformed XML: {e}"), on_error)
    except (OSError, EOFError) as e:
        report.error(CorruptInputError(path, None, f"truncated or unreadable ({e})"), on_error)
    db.execute("CREATE INDEX a_parent ON a (parent, score DESC, seq)")
    db.commit()


def _questions(db: sqlite3.Connection, source: str, path: Path) -> Iterator[dict]:
    """Questions in file order, each with its answers by score (ties in file order)."""
    for _, qid, title, body in db.execute("SELECT seq, id, title, body FROM q ORDER BY seq"):
        answers = [b for (b,) in db.execute("SELECT body FROM a WHERE parent = ? ORDER BY score DESC, seq", (qid,))]
        parts = [title, html_to_text(body)] + [html_to_text(b) for b in answers]
        yield doc(source, f"{path.parent.name}#{qid}", "\n\n".join(p for p in parts if p), answers=len(answers))


READERS: dict[str, Callable[..., Iterator[dict]]] = {
    "text": read_text, "gutenberg": read_gutenberg, "jsonl": read_jsonl, "parquet": read_parquet,
    "mediawiki": read_mediawiki, "code": read_code, "stackexchange": read_stackexchange,
}


def read_source(src: SourceConfig, on_error: str = "skip", report: ReadReport | None = None,
                base: Path | None = None) -> Iterator[dict]:
    """Documents of one configured source; problems go to `report`."""
    report = report if report is not None else ReadReport()
    files = expand_paths(src.paths, base)
    if not files:
        raise FileNotFoundError(f"source {src.name!r}: no file matches {src.paths}"
                                + (f" (relative to {base})" if base else ""))
    report.files += len(files)
    n = 0
    for d in READERS[src.kind](src, files, report, on_error):
        yield d
        n += 1
        if src.max_docs and n >= src.max_docs:
            return
