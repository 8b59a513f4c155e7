"""Per-source cleaning (RECIPE.md section 1): quality heuristics, boilerplate, language, PII.

Which rules apply depends on the source kind, as in the LLaMA papers:
    web (jsonl/parquet)   C4 line filter, then Gopher document rules, language ID
    mediawiki / text      Gopher document rules, language ID (markup is stripped by the reader)
    gutenberg (books)     Gopher rules without the line-level C4 filter (verse is not web spam)
    stackexchange         Gopher rules, language ID
    code                  GitHub heuristics: line lengths and alphanumeric share
Thresholds live in QualityConfig. `clean_batch` is the Ray Data `map_batches` function: it
returns every document with its cleaned text, a drop `reason` ("" when kept) and PII counts,
so the step can both filter and report why each document went.
"""

from __future__ import annotations

import re

from steps.data.config import QualityConfig
from steps.data.langid import detect
from steps.data.pii import KINDS, scrub_pii

# Gopher's stop-word rule: a real English page contains at least two of these.
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
# C4's "bad line" markers: cookie banners, terms links, javascript warnings.
C4_BAD_LINE = re.compile(r"javascript|lorem ipsum|cookie|terms of use|privacy policy|use cookies", re.I)
TERMINAL_PUNCT = (".", "!", "?", '"', "'", "”", "’")
WORD = re.compile(r"\S+")
ALPHA = re.compile(r"[^\W\d_]", re.UNICODE)
SYMBOLS = ("#", "...", "…")
BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "*", "-", "–", "‣")


def c4_lines(text: str, qcfg: QualityConfig) -> tuple[str, str]:
    """C4 line filter; returns (kept text, reason if the whole page goes)."""
    if "{" in text and "}" in text and re.search(r"\{[^{}]*\}", text):
        return text, "c4_curly_brace"  # code or templates on a web page
    kept = []
    for line in text.split("\n"):
        s = line.strip()
        if not s or C4_BAD_LINE.search(s):
            continue
        if qcfg.c4_require_terminal_punct and not s.endswith(TERMINAL_PUNCT):
            continue
        if len(s.split()) < qcfg.c4_min_words_per_line:
            continue
        kept.append(s)
    out = "\n".join(kept)
    sentences = len(re.findall(r"[.!?](?:\s|$)", out))
    if sentences < qcfg.c4_min_sentences:
        return out, "c4_too_few_sentences"
    return out, ""


def gopher_reason(text: str, qcfg: QualityConfig) -> str:
    """The first Gopher quality rule the document breaks, or ""."""
    words = WORD.findall(text)
    n = len(words)
    if n < qcfg.min_words:
        return "gopher_too_few_words"
    if n > qcfg.max_words:
        return "gopher_too_many_words"
    mean_len = sum(map(len, words)) / n
    if not qcfg.min_mean_word_len <= mean_len <= qcfg.max_mean_word_len:
        return "gopher_mean_word_length"
    symbols = sum(text.count(s) for s in SYMBOLS)
    if symbols / n > qcfg.max_symbol_word_ratio:
        return "gopher_symbol_ratio"
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if lines:
        if sum(ln.lstrip().startswith(BULLETS) for ln in lines) / len(lines) > qcfg.max_bullet_lines_ratio:
            return "gopher_bullet_lines"
        if sum(ln.rstrip().endswith(("...", "…")) for ln in lines) / len(lines) > qcfg.max_ellipsis_lines_ratio:
            return "gopher_ellipsis_lines"
        if len(lines) >= 4 and 1 - len(set(lines)) / len(lines) > qcfg.max_dup_line_ratio:
            return "gopher_duplicate_lines"
    if sum(1 for w in words if ALPHA.search(w)) / n < qcfg.min_alpha_words_ratio:
        return "gopher_alpha_words"
    if len(STOP_WORDS.intersection(w.lower() for w in words)) < qcfg.min_stop_words:
        return "gopher_stop_words"
    return ""


def language_reason(text: str, qcfg: QualityConfig) -> str:
    if not qcfg.languages:
        return ""
    lang, prob = detect(text)
    if lang not in qcfg.languages or prob < qcfg.min_language_score:
        return f"language_{lang}"
    return ""


def code_reason(text: str, max_line: int = 1000, max_mean_line: float = 100.0,
                min_alnum: float = 0.25) -> str:
    """LLaMA's GitHub heuristics: very long lines and low alphanumeric share mean generated code."""
    lines = text.split("\n")
    if not text.strip():
        return "code_empty"
    if max(map(len, lines)) > max_line:
        return "code_long_line"
    if sum(map(len, lines)) / len(lines) > max_mean_line:
        return "code_mean_line_length"
    if sum(c.isalnum() for c in text) / len(text) < min_alnum:
        return "code_alnum_fraction"
    return ""


def clean_text(text: str, kind: str, qcfg: QualityConfig, quality_filter: bool = True) -> tuple[str, str]:
    """Cleaned text and drop reason ("" = keep) for one document of a source `kind`."""
    if kind == "code":
        return text, code_reason(text) if quality_filter else ""
    if kind in ("jsonl", "parquet"):
        text, reason = c4_lines(text, qcfg)
        if reason:
            return text, reason
    if not quality_filter:
        return text, ""
    reason = gopher_reason(text, qcfg) or language_reason(text, qcfg)
    return text, reason


def clean_batch(batch: dict, kinds: dict[str, str], quality: dict[str, bool], qcfg: QualityConfig,
                pii: bool) -> dict[str, list]:
    """Ray Data map_batches: adds `reason` ("" = kept) and `pii_<kind>` counts per document.

    `kinds` / `quality` map a source name to its reader kind / whether quality rules apply.
    """
    texts, reasons = [], []
    counts: dict[str, list[int]] = {k: [] for k in KINDS}
    for text, source in zip(batch["text"], batch["source"]):
        text, reason = clean_text(str(text), kinds[source], qcfg, quality[source])
        found = dict.fromkeys(KINDS, 0)
        if pii and not reason:
            text, found = scrub_pii(text)
        texts.append(text)
        reasons.append(reason)
        for k in KINDS:
            counts[k].append(found[k])
    out = {k: list(v) for k, v in batch.items() if k != "text"}  # pass other columns through
    out.update(text=texts, reason=reasons, **{f"pii_{k}": v for k, v in counts.items()})
    return out

