"""Readers on real demo samples and on small files written here; corrupt input is never lost."""

import bz2
import gzip
import html
import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.fetch_demo_data import DEFAULT_DEST, ensure
from steps.data.config import SourceConfig
from steps.data.readers import CorruptInputError, ReadReport, read_source, strip_gutenberg
from steps.data.wikitext import strip_wiki_markup

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo():
    return ensure(DEFAULT_DEST, verbose=False)


def src(kind, paths, **kw):
    return SourceConfig(name=kw.pop("name", kind), kind=kind, paths=[str(p) for p in paths], epochs=1.0, **kw)


def test_real_c4_jsonl(demo):
    docs = list(read_source(src("jsonl", [demo / "web" / "*.jsonl"])))
    assert len(docs) == 300 and all(d["text"] for d in docs)
    assert docs[0]["id"] == "jsonl/c4_demo.jsonl#1" and json.loads(docs[0]["metadata"]) is not None


def test_real_mediawiki_dump_strips_markup(demo):
    report = ReadReport()
    docs = list(read_source(src("mediawiki", [demo / "wikixml" / "*.bz2"]), report=report))
    assert len(docs) > 50 and report.skipped["wiki_redirect"] > 50  # redirects are counted, not lost
    text = "\n".join(d["text"] for d in docs)
    assert "{{" not in text and "[[" not in text and "<ref" not in text and "'''" not in text
    anarchism = next(d for d in docs if d["text"].startswith("Anarchism"))
    assert "political philosophy" in anarchism["text"]


def test_real_gutenberg_books_lose_their_licence(demo):
    docs = list(read_source(src("gutenberg", [demo / "books" / "*_gut.txt"])))
    assert len(docs) > 20
    assert not any("*** START OF" in d["text"] or "*** END OF" in d["text"] for d in docs)
    assert all("\r\n" not in d["text"] for d in docs)


def test_real_stdlib_code_with_tree_licence(demo):
    docs = list(read_source(src("code", [demo / "code"])))
    assert len(docs) > 10
    meta = json.loads(docs[0]["metadata"])
    assert meta["license"] == "PSF-2.0" and meta["language"] == "python"


def test_text_line_documents(demo):
    docs = list(read_source(src("text", [demo / "wiki" / "*.txt"], line_documents=True)))
    assert len(docs) == 30


def test_gutenberg_header_and_footer():
    text = ("The Project Gutenberg EBook of X\nlicence blah\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n"
            "Chapter one.\nIt was a dark night.\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nmore licence")
    assert strip_gutenberg(text) == "Chapter one.\nIt was a dark night.\n"


def test_wiki_markup_rules():
    raw = ("{{Infobox|name={{nested|x}}}}'''Foo''' is a [[bar|baz]] and a [[qux]].<ref>cite</ref>"
           "<!-- hidden -->\n== History ==\n[[File:X.png|thumb|a [[link]] caption]]* item one\n"
           "{| class=wikitable\n| cell\n|}\n[https://example.org site] [[Category:Things]]")
    out = strip_wiki_markup(raw)
    assert out == "Foo is a baz and a qux.\nHistory\nitem one\n\nsite"


def test_stackexchange_answers_sorted_by_score(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "Posts.xml").write_text(
        '<?xml version="1.0" encoding="utf-8"?>\n<posts>\n'
        '<row Id="1" PostTypeId="1" Score="5" Title="How do I boil an egg?" Body="&lt;p&gt;I want it &lt;b&gt;soft&lt;/b&gt;.&lt;/p&gt;" />\n'
        '<row Id="2" PostTypeId="2" ParentId="1" Score="1" Body="&lt;p&gt;Low answer.&lt;/p&gt;" />\n'
        '<row Id="3" PostTypeId="2" ParentId="1" Score="9" Body="&lt;p&gt;Top answer: &lt;code&gt;6 min&lt;/code&gt;.&lt;/p&gt;" />\n'
        '</posts>\n')
    docs = list(read_source(src("stackexchange", [tmp_path / "*" / "Posts.xml"])))
    assert len(docs) == 1
    text = docs[0]["text"]
    assert "<p>" not in text and "soft" in text and "6 min" in text
    assert text.index("Top answer") < text.index("Low answer")


def test_code_without_allowed_licence_is_skipped_and_counted(tmp_path):
    (tmp_path / "gpl.py").write_text("# SPDX-License-Identifier: GPL-3.0\nx = 1\n")
    (tmp_path / "mit.py").write_text("# Copyright 2020 Someone\n# SPDX-License-Identifier: MIT\n\ndef f():\n    return 1\n")
    (tmp_path / "none.py").write_text("y = 2\n")
    report = ReadReport()
    docs = list(read_source(src("code", [tmp_path]), report=report))
    assert [json.loads(d["metadata"])["path"] for d in docs] == ["mit.py"]
    assert docs[0]["text"].startswith("def f():")  # licence header removed
    assert report.skipped == {"license_GPL-3.0": 1, "license_unknown": 1}


def test_broken_json_line_is_reported_and_the_rest_kept(tmp_path):
    f = tmp_path / "web.jsonl"
    f.write_text('{"text": "first"}\n{"text": "sec\n{"text": "third"}\n{"other": 1}\n')
    report = ReadReport()
    docs = list(read_source(src("jsonl", [f]), report=report))
    assert [d["text"] for d in docs] == ["first", "third"]
    assert [(e["line"], e["reason"].split(":")[0]) for e in report.errors] == [(2, "invalid JSON"), (4, "field 'text' missing or not a string")]
    with pytest.raises(CorruptInputError, match=r"web\.jsonl:2: invalid JSON"):
        list(read_source(src("jsonl", [f]), on_error="fail"))


def test_invalid_utf8_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "bad \xff byte"}\n{"text": "after"}\n')
    report = ReadReport()
    assert [d["text"] for d in read_source(src("jsonl", [f]), report=report)] == ["ok", "after"]
    assert report.errors[0]["line"] == 2 and "invalid UTF-8" in report.errors[0]["reason"]
    t = tmp_path / "bad.txt"
    t.write_bytes(b"line one\nline two \xfe\n")
    with pytest.raises(CorruptInputError, match=r"bad\.txt:2: invalid UTF-8"):
        list(read_source(src("text", [t]), on_error="fail"))


def test_truncated_compressed_streams_keep_what_was_read(tmp_path, demo):
    lines = "".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(2000)).encode()
    gz = gzip.compress(lines)
    f = tmp_path / "cut.jsonl.gz"
    f.write_bytes(gz[: len(gz) // 2])
    report = ReadReport()
    docs = list(read_source(src("jsonl", [f]), report=report))
    assert 0 < len(docs) < 2000 and len(report.errors) == 1
    assert report.errors[0]["path"].endswith("cut.jsonl.gz") and "unreadable" in report.errors[0]["reason"]

    dump = (demo / "wikixml").glob("*.bz2").__next__().read_bytes()
    cut = tmp_path / "cut.xml.bz2"
    cut.write_bytes(dump[: len(dump) // 2])
    report = ReadReport()
    docs = list(read_source(src("mediawiki", [cut]), report=report))
    assert len(docs) > 10 and len(report.errors) == 1 and "cut.xml.bz2" in report.errors[0]["path"]
    with pytest.raises(CorruptInputError, match="cut.xml.bz2"):
        list(read_source(src("mediawiki", [cut]), on_error="fail"))


def test_malformed_xml_is_reported_with_line(tmp_path):
    f = tmp_path / "bad.xml"
    f.write_text("<mediawiki>\n<page><title>A</title><ns>0</ns><revision><text>Alpha text.</text></revision></page>\n"
                 "<page><title>B</title><ns>0</ns><revision><text>Broken</revision></page>\n</mediawiki>\n")
    report = ReadReport()
    docs = list(read_source(src("mediawiki", [f]), report=report))
    assert [d["text"].split("\n")[0] for d in docs] == ["A"]
    assert report.errors[0]["line"] == 3 and "malformed XML" in report.errors[0]["reason"]


def test_missing_source_files_name_the_source():
    with pytest.raises(FileNotFoundError, match="source 'web'"):
        list(read_source(src("jsonl", ["/nonexistent/*.jsonl"], name="web")))


def test_bz2_plain_text(tmp_path):
    f = tmp_path / "a.txt.bz2"
    f.write_bytes(bz2.compress(b"hello\nworld\n"))
    assert [d["text"] for d in read_source(src("text", [f]))] == ["hello\nworld\n"]


def test_parquet_reader_and_null_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "web.parquet"
    pq.write_table(pa.table({"content": ["first page", None, "third page"]}), f)
    report = ReadReport()
    docs = list(read_source(src("parquet", [f], text_field="content"), report=report))
    assert [d["text"] for d in docs] == ["first page", "third page"]
    assert report.errors[0]["line"] == 2 and "null" in report.errors[0]["reason"]
    with pytest.raises(CorruptInputError, match="no column 'text'"):
        list(read_source(src("parquet", [f]), on_error="fail"))


def write_posts(path, megabytes: int) -> int:
    """A Posts.xml of ~megabytes: questions each followed by two answers; returns the questions."""
    body = html.escape("<p>" + " ".join(f"word{i % 97}" for i in range(150)) + "</p>", quote=True)
    path.parent.mkdir(parents=True)
    q, size = 0, 0
    with open(path, "w") as f:
        f.write('<?xml version="1.0" encoding="utf-8"?>\n<posts>\n')
        while size < megabytes * 2**20:
            f.write(f'<row Id="{3 * q}" PostTypeId="1" Score="1" Title="Question {q}" Body="{body}" />\n')
            for k in (1, 2):
                f.write(f'<row Id="{3 * q + k}" PostTypeId="2" ParentId="{3 * q}" Score="{k}" Body="{body}" />\n')
            q += 1
            size += 3 * len(body) + 200
        f.write("</posts>\n")
    return q


READ_AND_MEASURE = """
import gc, sys, threading, time
import psutil
from steps.data.config import SourceConfig
from steps.data.readers import read_source
proc, peak, done = psutil.Process(), [0], threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.01)
gc.collect()
before = proc.memory_info().rss
threading.Thread(target=watch, daemon=True).start()
src = SourceConfig(name="se", kind="stackexchange", paths=[sys.argv[1]], epochs=1.0)
n = sum(1 for _ in read_source(src))
done.set()
print(n, max(peak[0], proc.memory_info().rss) - before)
"""


def test_stackexchange_reader_memory_is_flat_as_the_dump_grows(tmp_path):
    """Resident memory gained while reading, each size in a fresh process. Holding the dump's
    rows (a dict of questions and answers, as before streaming) gained ~1.2x the file's size."""
    growth = {}
    for mb in (1, 20):
        posts = tmp_path / str(mb) / "site" / "Posts.xml"
        questions = write_posts(posts, mb)
        out = subprocess.run([sys.executable, "-c", READ_AND_MEASURE, str(posts)],
                             capture_output=True, text=True, check=True, cwd=REPO).stdout.split()
        assert int(out[0]) == questions
        growth[mb] = int(out[1]) / 2**20
    assert growth[20] - growth[1] < 6, f"resident memory gained while reading: {growth} MB"


def test_stackexchange_malformed_xml_keeps_the_questions_before_it(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "Posts.xml").write_text(
        '<posts>\n<row Id="1" PostTypeId="1" Title="First" Body="&lt;p&gt;Body one.&lt;/p&gt;" />\n'
        '<row Id="2" PostTypeId="2" ParentId="1" Score="3" Body="&lt;p&gt;An answer.&lt;/p&gt;" />\n'
        '<row Id="3" PostTypeId="1" Title="Broken\n')
    report = ReadReport()
    docs = list(read_source(src("stackexchange", [tmp_path / "site" / "Posts.xml"]), report=report))
    assert [d["text"] for d in docs] == ["First\n\nBody one.\n\nAn answer."]
    assert "malformed XML" in report.errors[0]["reason"]
