"""MediaWiki markup -> plain text (RECIPE 1: "strip hyperlinks, comments, formatting boilerplate").

A small, linear-time stripper for article bodies: templates `{{...}}` (nested) and tables
`{|...|}` removed, `[[target|label]]` -> label, `[[File:..]]`/`[[Category:..]]` removed,
external links `[url label]` -> label, `<ref>`s, comments and HTML tags removed, bold/italic
quotes dropped, headings kept as plain lines.
"""

from __future__ import annotations

import re

_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_TAG_BLOCK = re.compile(r"<(math|gallery|timeline|score|syntaxhighlight)[^>]*>.*?</\1>", re.S | re.I)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_EXTERNAL = re.compile(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]")
_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)
_LIST = re.compile(r"^[*#:;]+\s*", re.M)
_DROP_LINK_PREFIXES = ("file:", "image:", "category:", "media:")


def _strip_balanced(text: str, open_: str, close: str) -> str:
    """Remove (possibly nested) spans from `open_` to the matching `close`."""
    out, depth, last = [], 0, 0
    for m in re.finditer(re.escape(open_) + "|" + re.escape(close), text):
        if m.group(0) == open_:
            if depth == 0:
                out.append(text[last:m.start()])
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                last = m.end()
    if depth == 0:
        out.append(text[last:])
    return "".join(out)


def _links(text: str) -> str:
    """[[target|label]] -> label; [[target]] -> target; files/categories (nested) removed."""
    out, i, n = [], 0, len(text)
    while i < n:
        start = text.find("[[", i)
        if start < 0:
            out.append(text[i:])
            break
        out.append(text[i:start])
        depth, j = 0, start
        while j < n:  # find the matching ]] (file captions nest links)
            if text.startswith("[[", j):
                depth, j = depth + 1, j + 2
            elif text.startswith("]]", j):
                depth, j = depth - 1, j + 2
                if depth == 0:
                    break
            else:
                j += 1
        inner = text[start + 2: j - 2]
        if not inner.lower().lstrip(":").startswith(_DROP_LINK_PREFIXES):
            out.append(_links(inner.split("|")[-1]))
        i = j
    return "".join(out)


def strip_wiki_markup(text: str) -> str:
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _TAG_BLOCK.sub("", text)
    text = _strip_balanced(text, "{{", "}}")
    text = _strip_balanced(text, "{|", "|}")
    text = _links(text)
    text = _EXTERNAL.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = _QUOTES.sub("", text)
    text = _HEADING.sub(r"\2", text)
    text = _LIST.sub("", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()
