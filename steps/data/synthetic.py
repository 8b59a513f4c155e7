"""A seeded test corpus with planted problems, and its ground truth (tests and the benchmark).

Composition of `planted_corpus(seed)` (all counts fixed; texts vary with the seed):
    good        400 English-like web pages (sentences of common words, 120-400 words each)
    exact       40 exact copies of good pages, with case, spacing and punctuation changed
    near        60 pairs: a good page and a copy with a share of words replaced, so that the
                pair's 5-gram Jaccard spreads over [0.80, 1.0)
    clusters    one family each of 2..10 copies (sizes 2, 3, ..., 10), built as chains: copy
                k+1 edits copy k, so neighbours are similar and the ends may not be
    low         for each C4 / Gopher rule that can decide a web page, 8 pages written to break it
                (the ellipsis-line and paragraph rules act on non-web text: C4's line filter
                removes ellipsis lines and blank lines first; tests/test_data_clean.py covers them)
    boilerplate 30 pages sharing navigation lines, of which 10 are only those lines
    pii         `pii_cases()`: 60 phone numbers (E.164 and national formats with spaces, dots,
                dashes, parentheses), 20 card numbers in card context, 20 emails; look-alikes:
                ISBN-10/13, dates, version numbers, times, order numbers (Luhn-valid too)

Ground truth for duplicates is the exact Jaccard of word 5-gram shingles (dedup.shingle_hashes),
computed over every pair within a family: the true clusters are the connected components of
the pairs at or above the threshold.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health person "
    "art war history party result change morning reason research girl guy moment air teacher force education "
    "river bridge market garden village winter summer letter music table window road field island mountain "
    "little great small large young important public bad same able long different early late old new good "
    "make know think take see come want look use find give tell work call try ask need feel become leave put "
    "mean keep let begin seem help talk turn start show hear play run move like live believe hold bring happen "
    "write provide sit stand lose pay meet include continue set learn lead understand watch follow stop create "
    "speak read allow add spend grow open walk win offer remember love consider appear buy wait serve die send "
    "expect build stay fall cut reach kill remain suggest raise pass sell require report decide pull"
).split()
GOPHER_STOP = {"the", "be", "to", "of", "and", "that", "have", "with"}
STOP = ["the", "the", "the", "of", "and", "to", "a", "in", "that", "with", "have", "be", "for", "on", "was"]


def sentence(rng: random.Random, n: int | None = None) -> str:
    n = n or rng.randint(8, 18)
    words = [rng.choice(STOP) if rng.random() < 0.35 else rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + rng.choice([".", ".", ".", "!", "?"])


def page(rng: random.Random, words: int) -> str:
    paras, count = [], 0
    while count < words:
        para = " ".join(sentence(rng) for _ in range(rng.randint(3, 6)))
        paras.append(para)
        count += len(para.split())
    return "\n".join(paras)


def edit_words(text: str, rng: random.Random, fraction: float) -> str:
    """Replace `fraction` of the words (line structure kept)."""
    lines = [ln.split(" ") for ln in text.split("\n")]
    slots = [(i, j) for i, ln in enumerate(lines) for j in range(len(ln))]
    for i, j in rng.sample(slots, max(1, int(len(slots) * fraction))):
        lines[i][j] = rng.choice(WORDS)
    return "\n".join(" ".join(ln) for ln in lines)


def shout(text: str) -> str:
    """An exact duplicate after normalisation: case, spacing and punctuation differ. Words are
    capitalised but Gopher's stop words stay as written (the rule matches them case-sensitively:
    an all-caps page has none, and language ID gives all caps a low English score)."""
    words = text.replace(".", "!").split(" ")
    return "  ".join(w if w.lower() in GOPHER_STOP else w[:1].upper() + w[1:] for w in words)


@dataclass
class Doc:
    id: str
    text: str
    kind: str  # good, exact, near, cluster, low:<rule>, boiler, boiler_only
    family: str = ""  # documents planted from the same original share a family


@dataclass
class Corpus:
    docs: list[Doc] = field(default_factory=list)

    def add(self, *args, **kw) -> Doc:
        d = Doc(f"d{len(self.docs):05d}", *args, **kw)
        self.docs.append(d)
        return d


LOW_QUALITY = {  # rule -> page breaking exactly that rule (web pages: C4 applies)
    "c4_lorem_ipsum": lambda r: page(r, 150) + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.",
    "c4_curly_bracket": lambda r: page(r, 150) + "\nThe function is called with {value: 3} as its options.",
    "c4_too_few_sentences": lambda r: "\n".join(" ".join(r.choice(WORDS) for _ in range(6)) for _ in range(30)),
    "gopher_too_few_words": lambda r: " ".join(sentence(r, 9) for _ in range(5)),
    "gopher_mean_word_length": lambda r: "\n".join(
        " ".join(r.choice(["incomprehensibilities", "counterrevolutionaries", "telecommunications",
                           "the", "and", "with"]) for _ in range(12)) + "." for _ in range(12)),
    "gopher_symbol_ratio": lambda r: "\n".join(sentence(r) + " " + " ".join(
        "#" + r.choice(WORDS) for _ in range(4)) + " ." for _ in range(15)),
    "gopher_bullet_lines": lambda r: "\n".join("- " + sentence(r) for _ in range(20)),
    "gopher_alpha_words": lambda r: "\n".join(" ".join(
        str(r.randint(10, 99999)) if r.random() < 0.5 else r.choice(STOP) for _ in range(12)) + "."
        for _ in range(12)),
    "gopher_stop_words": lambda r: "\n".join(" ".join(r.choice(WORDS) for _ in range(12)).capitalize() + "."
                                             for _ in range(12)),
    "gopher_dup_para_fraction": lambda r: "\n\n".join([sentence(r) + " " + sentence(r)] * 6 + [page(r, 30)]),
    "gopher_dup_line_fraction": lambda r: "\n".join(
        [sentence(r, 6) for _ in range(8)] + [sentence(r, 4)] * 6),
    "gopher_top_2gram": lambda r: "\n".join(
        " ".join(["best price"] * 4 + [r.choice(STOP), r.choice(WORDS)]) + "." for _ in range(15)),
    "gopher_dup_5gram": lambda r: _repeated_passage(r),
    "language_fr": lambda r: "\n".join(" ".join(r.choice(
        "le la les de des et est une un dans pour que qui avec sur pas plus nous vous ils elles maison "
        "rivière village marché jardin hiver été lettre musique fenêtre route champ montagne petit grand "
        "nouveau vieux bon faire savoir penser prendre voir venir vouloir regarder trouver donner".split())
        for _ in range(12)).capitalize() + "." for _ in range(12)),
}

def _repeated_passage(r: random.Random) -> str:
    """A passage said twice among fresh text: many 5-grams occur twice, no 2-4-gram dominates."""
    passage = sentence(r, 16) + " " + sentence(r, 16)
    return "\n".join([page(r, 60), passage, page(r, 60), passage])


NAV = [  # site furniture: long enough to pass the page rules alone, so only line dedup catches it
    "Welcome to the home page of the Example Media Group and all of its local news sites.",
    "Sign up for our weekly newsletter to get the best of the stories in your inbox.",
    "Copyright 2024 by the Example Media Group, with all of the rights reserved worldwide.",
    "Follow us on every social network that we use and share the stories with your friends.",
    "Read about the team that writes for the site and the values that guide our work.",
    "Send us a tip or a correction and the editors will get back to you within a day.",
]


def planted_corpus(seed: int = 0, threshold: float = 0.8) -> Corpus:
    rng = random.Random(seed)
    c = Corpus()
    good = [c.add(page(rng, rng.randint(120, 400)), "good") for _ in range(400)]
    for g in good:
        g.family = g.id
    for g in rng.sample(good, 40):
        c.add(shout(g.text), "exact", g.family)
    for g in rng.sample(good, 60):
        c.add(edit_words(g.text, rng, rng.uniform(0.005, 0.035)), "near", g.family)
    for size in range(2, 11):
        base = page(rng, rng.randint(250, 400))
        fam = f"cluster{size}"
        prev = c.add(base, "cluster", fam)
        for _ in range(size - 1):
            prev = c.add(edit_words(prev.text, rng, 0.02), "cluster", fam)
    for rule, make in LOW_QUALITY.items():
        for _ in range(8):
            c.add(make(rng), f"low:{rule}")
    for i in range(30):
        body = "" if i < 10 else page(rng, 120) + "\n"
        c.add(body + "\n".join(NAV), "boiler_only" if i < 10 else "boiler")
    rng.shuffle(c.docs)  # ids stay; the order of the corpus does not favour originals
    return c


def pii_cases(seed: int = 0) -> tuple[list[str], list[str]]:
    """(sentences each holding one piece of PII, look-alikes that must stay unchanged)."""
    rng = random.Random(seed)

    def d(n: int) -> str:
        return "".join(rng.choice("0123456789") for _ in range(n))

    def nanp() -> tuple[str, str, str]:
        return rng.choice("23456789") + d(2), rng.choice("23456789") + d(2), d(4)

    phones = []
    for _ in range(6):
        a, b, n = nanp()
        phones += [f"({a}) {b}-{n}", f"{a}-{b}-{n}", f"{a}.{b}.{n}", f"{a} {b} {n}", f"+1 {a} {b} {n}",
                   f"+1-{a}-{b}-{n}", f"+1{a}{b}{n}"]
    for _ in range(3):
        phones += [f"+49 30 {d(7)}", f"+44 20 {d(4)} {d(4)}", f"+33 6 {d(2)} {d(2)} {d(2)} {d(2)}",
                   f"030 {d(7)}", f"020 {d(4)} {d(4)}", f"06 {d(2)} {d(2)} {d(2)} {d(2)}"]
    cards = []
    for prefix, length in [("4", 16), ("51", 16), ("37", 15), ("6011", 16), ("2221", 16)] * 4:
        body = prefix + d(length - len(prefix) - 1)
        digits = body + str(_luhn_digit(body))
        groups = " ".join(digits[i:i + 4] for i in range(0, len(digits), 4))
        cards.append(rng.choice([f"my card number is {groups}", f"Visa card: {digits}",
                                 f"paid with credit card {groups.replace(' ', '-')}"]))
    emails = [f"{rng.choice(WORDS)}.{rng.choice(WORDS)}{rng.randint(1, 99)}@example.{rng.choice(['com', 'org'])}"
              for _ in range(20)]
    positives = [f"Please call {p} after noon." for p in phones] + [f"For the order, {c}." for c in cards] + \
        [f"Write to {e} for details." for e in emails]
    isbn13 = []
    for _ in range(10):
        body = "978" + d(9)
        isbn13.append(body + str((10 - sum(int(x) * (1 if i % 2 == 0 else 3) for i, x in enumerate(body)) % 10) % 10))
    lookalikes = [f"ISBN {x}" for x in isbn13] + [f"ISBN {x[:3]}-{x[3]}-{x[4:7]}-{x[7:12]}-{x[12]}" for x in isbn13] + \
        ["ISBN 0-306-40615-2", "ISBN 0306406152"] + \
        [f"on {rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}" for _ in range(10)] + \
        [f"on {rng.randint(1, 28):02d}.{rng.randint(1, 12):02d}.{rng.randint(1990, 2030)}" for _ in range(10)] + \
        [f"version {rng.randint(0, 20)}.{rng.randint(0, 30)}.{rng.randint(0, 300)}" for _ in range(10)] + \
        [f"v{rng.randint(1, 12)}.{rng.randint(0, 9)}.{rng.randint(1000, 30000)}.{rng.randint(1, 999)}"
         for _ in range(5)] + \
        [f"at {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}" for _ in range(5)] + \
        [f"order number {d(16)}" for _ in range(5)] + ["order 4111111111111111", "tracking 5555555555554444"]
    return positives, [f"See {x} for the record." for x in lookalikes]


def _luhn_digit(body: str) -> int:
    total = 0
    for i, ch in enumerate(reversed(body)):
        v = int(ch)
        if i % 2 == 0:
            v = v * 2 - 9 if v > 4 else v * 2
        total += v
    return (10 - total % 10) % 10
