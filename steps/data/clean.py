"""Per-source cleaning (RECIPE.md section 1): quality rules, boilerplate, language, PII.

Which rules apply depends on the source kind, as in the LLaMA papers:
    web (jsonl/parquet)   C4 page and line rules, then Gopher quality + repetition rules, language ID
    mediawiki / text      Gopher rules, language ID (markup is stripped by the reader)
    gutenberg (books)     Gopher rules without C4's line filter (verse is not web spam)
    stackexchange         Gopher rules, language ID
    code                  GitHub heuristics: line lengths and alphanumeric share
Thresholds live in QualityConfig. Every rule returns (reason, measured value), so a dropped
document is written with the number that decided it (the audit in `dropped/`).

C4 (Raffel et al. 2020, section 2.2): a page containing "lorem ipsum" or a curly bracket goes;
lines without terminal punctuation (a period, exclamation or question mark, or an end quotation
mark; an ellipsis is not one), with fewer than 3 words, with a word over 1000 characters,
mentioning javascript, or cookie/terms-of-use/privacy-policy notices go; citation markers ([1],
[citation needed], [edit]) are removed; a page with fewer than 5 sentences goes. Gopher (Rae et
al. 2021, appendix A1.1): the quality and repetition rules of QualityConfig, measured as in the
paper (characters of the document in duplicated lines, paragraphs and n-grams, a character in
overlapping duplicated n-grams counted once; the most frequent 2-4-gram's character share).

Where the papers leave a detail open, the rules do what datatrove (and TFDS's c4_utils before
it) does, so that benchmarks/data_throughput.py compares equal results: lines are str.splitlines(),
a line's word count is taken before citation markers go and the line is not stripped again after;
Gopher's word count and mean word length skip words made only of punctuation and symbols; bullets
are "•" and "-" at the start of any line (blank ones included); stop words are matched as written
(case-sensitive); paragraphs split at 2+ newlines, lines at 1+; character fractions are over the
whole text (len(text)), and an n-gram's characters include the spaces between its words.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from steps.data.config import QualityConfig
from steps.data.langid import detect
from steps.data.pii import KINDS, scrub_pii

# Gopher's stop-word rule: a real English page contains at least two of these.
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
C4_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
C4_CITATION = re.compile(r"\[\d*\]|\[citation needed\]|\[edit\]")
# the paper's "end quotation mark": straight and curly, double and single
TERMINAL_PUNCT = (".", "!", "?", '"', "'", "”", "’")
ELLIPSIS = ("...", "…")
SENTENCE_END = re.compile(r"[.!?][\"”’')\]]*(?=\s|$)")
ALPHA = re.compile(r"[^\W\d_]", re.UNICODE)
# a whitespace-separated word without a letter (digits, "_" and symbols only), found by one
# regex pass over " " + page + " " instead of a search per word (a leading \s instead of a
# look-behind: a third faster); the words of punctuation and symbols only are those of them
# without a digit (Gopher's word count skips them)
NON_ALPHA_WORD = re.compile(r"\s((?:[\d_]|[^\w\s])+)(?=\s)", re.UNICODE)
DIGIT = re.compile(r"\d")
# ALPHA also matches numeric characters that are not letters (², ½, Ⅻ): words holding a
# non-ASCII character are checked again with str.isalpha (see _non_alpha_count)
NON_ASCII_WORD = re.compile(r"\S*[^\x00-\x7f]\S*")
BULLETS = ("•", "-")
PARAGRAPH = re.compile(r"\n{2,}")
LINE_BREAKS = re.compile(r"\n+")


def c4_lines(text: str, qcfg: QualityConfig) -> tuple[str, str, float]:
    """C4 page and line rules; returns (kept text, reason if the page goes, measured value)."""
    low = text.lower()
    if "lorem ipsum" in low:
        return text, "c4_lorem_ipsum", 1.0
    if "{" in text:
        return text, "c4_curly_bracket", 1.0
    kept, sentences = [], 0
    for line in text.splitlines():
        s = line.strip()
        # only a line longer than the limit can hold a word longer than it (a cheap test first)
        if len(s) > qcfg.c4_max_word_len and any(len(w) > qcfg.c4_max_word_len for w in s.split()):
            continue
        n_words = -1
        if "[" in s:  # words are counted before the markers go, and the line is not stripped again
            n_words = len(s.split())
            s = C4_CITATION.sub("", s)
        if qcfg.c4_require_terminal_punct and (not s.endswith(TERMINAL_PUNCT) or s.endswith(ELLIPSIS)):
            continue
        if (n_words if n_words >= 0 else len(s.split())) < qcfg.c4_min_words_per_line:
            continue
        s_low = s.lower()
        if "javascript" in s_low or any(p in s_low for p in C4_POLICY):
            continue
        sentences += max(1, len(SENTENCE_END.findall(s)))
        kept.append(s)
    out = "\n".join(kept).strip()
    if sentences < qcfg.c4_min_sentences:
        return out, "c4_too_few_sentences", float(sentences)
    return out, "", 0.0


def gopher_quality(text: str, qcfg: QualityConfig) -> tuple[str, float]:
    """The first Gopher quality rule the document breaks and its value, or ("", 0)."""
    words = text.split()
    n_all = len(words) or 1
    letterless = NON_ALPHA_WORD.findall(f" {text} ")
    symbol_words = symbol_only(letterless)  # "-", "|", "..." are not words to count or measure
    n = len(words) - len(symbol_words)
    if n < qcfg.min_words:
        return "gopher_too_few_words", float(n)
    if n > qcfg.max_words:
        return "gopher_too_many_words", float(n)
    mean_len = (sum(map(len, words)) - sum(map(len, symbol_words))) / max(n, 1)
    if not qcfg.min_mean_word_len <= mean_len <= qcfg.max_mean_word_len:
        return "gopher_mean_word_length", mean_len
    symbols = max(text.count("#"), text.count("...") + text.count("…")) / n_all
    if symbols > qcfg.max_symbol_word_ratio:
        return "gopher_symbol_ratio", symbols
    lines = text.splitlines() or [""]
    bullets = sum(ln.lstrip().startswith(BULLETS) for ln in lines) / len(lines)
    if bullets > qcfg.max_bullet_lines_ratio:
        return "gopher_bullet_lines", bullets
    ellipsis = sum(ln.rstrip().endswith(ELLIPSIS) for ln in lines) / len(lines)
    if ellipsis > qcfg.max_ellipsis_lines_ratio:
        return "gopher_ellipsis_lines", ellipsis
    alpha = (len(words) - _non_alpha_count(text, letterless)) / n_all
    if alpha < qcfg.min_alpha_words_ratio:
        return "gopher_alpha_words", alpha
    stops = len(STOP_WORDS.intersection(words))
    if stops < qcfg.min_stop_words:
        return "gopher_stop_words", float(stops)
    return "", 0.0


def symbol_only(letterless: list[str]) -> list[str]:
    """The words made only of punctuation and symbols among NON_ALPHA_WORD's matches."""
    return [w for w in letterless if not DIGIT.search(w)]


def _non_alpha_count(text: str, letterless: list[str]) -> int:
    """Words without an alphabetic character (str.isalpha): NON_ALPHA_WORD's matches on the page
    (`letterless`), plus the words whose only "letters" are numeric characters."""
    count = len(letterless)
    if not text.isascii():  # the regex takes ² or ½ for a letter: check words with such characters
        count += sum(1 for w in NON_ASCII_WORD.findall(text)
                     if ALPHA.search(w) and not any(c.isalpha() for c in w))
    return count


def _dup_fractions(items: list[str], total_chars: int) -> tuple[float, float]:
    """(share of items that repeat an earlier one, share of the text's characters in those repeats)."""
    seen, dup, dup_chars = set(), 0, 0
    for x in items:
        if x in seen:
            dup += 1
            dup_chars += len(x)
        seen.add(x)
    return dup / max(1, len(items)), dup_chars / max(1, total_chars)


def _top_ngram_chars(words: list[str], n: int, total: int) -> float:
    """Characters of the most frequent n-gram (its words and the spaces between them) times its
    count, over the text's characters (reference implementation; gopher_repetition uses
    NgramStats, which gives the same values)."""
    grams = Counter(zip(*(words[i:] for i in range(n))))
    if not grams:
        return 0.0
    gram, count = grams.most_common(1)[0]
    return (sum(map(len, gram)) + n - 1) * count / total


def _dup_ngram_chars(words: list[str], n: int) -> int:
    """Characters of the words covered by n-grams that occur more than once, each counted once
    however many duplicated n-grams overlap it (reference implementation, as above)."""
    counts = Counter(zip(*(words[i:] for i in range(n))))
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        if counts[tuple(words[i:i + n])] > 1:
            covered[i:i + n] = [True] * n
    return sum(len(w) for w, c in zip(words, covered) if c)


class NgramStats:
    """Both n-gram measures for every n with numpy, exactly (no hashing): words become integer
    ids, and the n-grams' ids come from the (n-1)-grams' ids paired with the next word (packed
    into one int64, ranked by np.unique). The Counter versions above spent about half the
    stage's CPU time on web text."""

    def __init__(self, words: list[str], total: int):
        ids: dict[str, int] = {}
        self.ids = np.array([ids.setdefault(w, len(ids)) for w in words], dtype=np.int64)
        self.lens = np.array([len(w) for w in words], dtype=np.int64)
        self.total = max(1, total)  # the text's characters
        self._levels = {1: (np.arange(len(words)), self.ids, np.ones(len(words), np.int64))}

    def _grams(self, n: int):
        """(first position of each distinct n-gram, its id at every position, counts)."""
        if n not in self._levels:
            rank = self._grams(n - 1)[1]
            packed = (rank[:len(self.ids) - n + 1] << 32) | self.ids[n - 1:]
            self._levels[n] = np.unique(packed, return_index=True, return_inverse=True, return_counts=True)[1:]
        return self._levels[n]

    def top(self, n: int) -> float:
        """_top_ngram_chars: ties between equally frequent n-grams go to the first in the text."""
        if len(self.ids) < n:
            return 0.0
        first, _, counts = self._grams(n)
        best = counts.max()
        start = first[counts == best].min()
        return float(self.lens[start:start + n].sum() + n - 1) * int(best) / self.total

    def dup(self, n: int) -> float:
        """_dup_ngram_chars over the text's characters."""
        if len(self.ids) < n:
            return 0.0
        _, inverse, counts = self._grams(n)
        starts = np.flatnonzero(counts[inverse] > 1)
        size = len(self.ids) + 1  # +1 at each covering n-gram's start, -1 past its end
        cover = np.cumsum(np.bincount(starts, minlength=size) - np.bincount(starts + n, minlength=size))
        return float(self.lens[cover[:-1] > 0].sum()) / self.total


def gopher_repetition(text: str, qcfg: QualityConfig) -> tuple[str, float]:
    """Gopher's repetition rules (table A1) with the measured fraction."""
    lines = LINE_BREAKS.split(text)
    paras = PARAGRAPH.split(text.strip())
    line_dup, line_chars = _dup_fractions(lines, len(text))
    para_dup, para_chars = _dup_fractions(paras, len(text))
    for reason, value, limit in (("gopher_dup_para_fraction", para_dup, qcfg.max_dup_para_ratio),
                                 ("gopher_dup_para_char_fraction", para_chars, qcfg.max_dup_para_char_ratio),
                                 ("gopher_dup_line_fraction", line_dup, qcfg.max_dup_line_ratio),
                                 ("gopher_dup_line_char_fraction", line_chars, qcfg.max_dup_line_char_ratio)):
        if value > limit:
            return reason, value
    stats = NgramStats(text.split(), len(text))
    for n, limit in sorted(qcfg.max_top_ngram_char_ratio.items()):
        value = stats.top(n)
        if value > limit:
            return f"gopher_top_{n}gram", value
    dup_limits = sorted(qcfg.max_dup_ngram_char_ratio.items())
    for k, (n, limit) in enumerate(dup_limits):
        value = stats.dup(n)
        if value > limit:
            return f"gopher_dup_{n}gram", value
        # the words covered by duplicated (n+1)-grams are covered by duplicated n-grams too, so
        # the fraction only falls with n: under every larger n's limit, no larger n can fire
        # (most pages stop here at n = 5 instead of building 6- to 10-grams)
        if all(value <= later for m, later in dup_limits[k + 1:] if m > n):
            break
    return "", 0.0


def language_reason(text: str, qcfg: QualityConfig) -> tuple[str, float]:
    if not qcfg.languages:
        return "", 0.0
    lang, prob = detect(text)
    if lang not in qcfg.languages or prob < qcfg.min_language_score:
        return f"language_{lang}", prob
    return "", 0.0


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


def clean_doc(text: str, kind: str, qcfg: QualityConfig, quality_filter: bool = True) -> tuple[str, str, float]:
    """(cleaned text, drop reason or "", the rule's measured value) for one document."""
    if kind == "code":
        return text, (code_reason(text) if quality_filter else ""), 0.0
    if kind in ("jsonl", "parquet"):
        text, reason, value = c4_lines(text, qcfg)
        if reason:
            return text, reason, value
    if not quality_filter:
        return text, "", 0.0
    for rule in (gopher_quality, gopher_repetition, language_reason):
        reason, value = rule(text, qcfg)
        if reason:
            return text, reason, value
    return text, "", 0.0


def clean_text(text: str, kind: str, qcfg: QualityConfig, quality_filter: bool = True) -> tuple[str, str]:
    """(cleaned text, drop reason or "")."""
    return clean_doc(text, kind, qcfg, quality_filter)[:2]


def clean_batch(batch: dict, kinds: dict[str, str], quality: dict[str, bool], qcfg: QualityConfig,
                pii: bool) -> dict[str, list]:
    """Columns in, columns out: adds `reason` ("" = kept), `value` and `pii_<kind>` counts.

    `kinds` / `quality` map a source name to its reader kind / whether quality rules apply.
    """
    texts, reasons, values = [], [], []
    counts: dict[str, list[int]] = {k: [] for k in KINDS}
    for text, source in zip(batch["text"], batch["source"]):
        text, reason, value = clean_doc(str(text), kinds[source], qcfg, quality[source])
        found = dict.fromkeys(KINDS, 0)
        if pii and not reason:
            text, found = scrub_pii(text)
        texts.append(text)
        reasons.append(reason)
        values.append(value)
        for k in KINDS:
            counts[k].append(found[k])
    out = {k: list(v) for k, v in batch.items() if k != "text"}  # pass other columns through
    out.update(text=texts, reason=reasons, value=values, **{f"pii_{k}": v for k, v in counts.items()})
    return out
