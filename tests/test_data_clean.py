"""Each quality rule, each PII rule (with Luhn negatives), language ID."""

import pytest

from steps.data.clean import c4_lines, clean_batch, clean_text, code_reason, gopher_reason
from steps.data.config import QualityConfig
from steps.data.langid import detect
from steps.data.pii import luhn_ok, scrub_pii

Q = QualityConfig(min_words=20)
GOOD = ("The river runs through the old town and the bridge connects the two halves of the market. "
        "People have crossed it with their goods for many centuries, and the stones show the wear of that "
        "long history. In the evening the lamps are lit and the water reflects the light of the houses.")


def test_good_document_is_kept_everywhere():
    for kind in ("jsonl", "mediawiki", "gutenberg", "text", "stackexchange"):
        assert clean_text(GOOD, kind, Q) == (GOOD, "")


@pytest.mark.parametrize("text, reason", [
    ("the and of to " * 3, "gopher_too_few_words"),
    ("the and " + "supercalifragilisticexpialidocious " * 30, "gopher_mean_word_length"),
    (GOOD + " #tag" * 30, "gopher_symbol_ratio"),
    ("\n".join([f"- gather lantern number {i} with the baskets and candles" for i in range(10)]), "gopher_bullet_lines"),
    ("\n".join([f"the story {i} goes onward with the weary travellers across the hills and valleys of the north..." for i in range(10)]), "gopher_ellipsis_lines"),
    ("\n".join(["The same line of the text, and with it."] * 4 + ["The other line with the end of it."] * 2), "gopher_duplicate_lines"),
    ("the and " + "1234 5678 9012 " * 20, "gopher_alpha_words"),
    ("river runs through old town bridge connects halves market people crossed goods many centuries stones "
     "show wear long history evening lamps lit water reflects light houses", "gopher_stop_words"),
])
def test_each_gopher_rule_drops_with_its_reason(text, reason):
    assert gopher_reason(text, Q) == reason


def test_c4_line_filter():
    page = GOOD + "\nAccept our cookie policy to continue.\nShort line\nMenu Home About\n" + GOOD
    kept, reason = c4_lines(page, Q)
    assert reason == "" and "cookie" not in kept and "Menu" not in kept and "Short line" not in kept
    assert c4_lines("One sentence only.", Q)[1] == "c4_too_few_sentences"
    assert c4_lines(GOOD + " function() { return 1; }", Q)[1] == "c4_curly_brace"


def test_books_skip_the_c4_line_filter():
    verse = "\n".join(["Of man's first disobedience, and the fruit", "Of that forbidden tree, whose mortal taste",
                       "Brought death into the world, and all our woe,", "With loss of Eden, till one greater Man",
                       "Restore us, and regain the blissful seat,", "Sing, heavenly Muse, that on the secret top"])
    assert clean_text(verse, "gutenberg", Q)[1] == ""
    assert clean_text(verse, "jsonl", Q)[1] != ""


def test_language_filter_drops_other_languages():
    french = ("Le fleuve traverse la vieille ville et le pont relie les deux moitiés du marché. Les gens "
              "l'ont traversé avec leurs marchandises pendant des siècles, et les pierres montrent l'usure.")
    assert detect(GOOD)[0] == "en" and detect(GOOD)[1] > 0.9
    assert detect(french)[0] == "fr"
    german = "Der Fluss fließt durch die Altstadt und die Brücke verbindet die beiden Hälften des Marktes."
    assert detect(german)[0] == "de"
    assert clean_text(french * 2, "text", QualityConfig(min_words=5, min_stop_words=0))[1] == "language_fr"


def test_code_heuristics():
    assert code_reason("def f(x):\n    return x + 1\n") == ""
    assert code_reason("x = '" + "a" * 2000 + "'\n") == "code_long_line"
    assert code_reason("{}[]();,.\n" * 50) == "code_alnum_fraction"


def test_pii_rules():
    text = ("Write to jane.roe@mail.example.org or call +44 20 7946 0958, (415) 555-0132 or 415-555-0132. "
            "Hosts 10.0.0.1 and 2001:db8::8a2e:370:7334. Card 4111-1111-1111-1111.")
    out, counts = scrub_pii(text)
    assert counts == {"email": 1, "phone": 3, "ip": 2, "card": 1}
    for leaked in ("jane.roe", "7946", "555-0132", "10.0.0.1", "2001:db8", "4111"):
        assert leaked not in out


def test_pii_leaves_ordinary_numbers_alone():
    text = "ISBN 9780306406157, order 4111111111111112, version 1.2.3, at 10:30:00, year 2024, ratio 3:2."
    out, counts = scrub_pii(text)
    assert out == text and sum(counts.values()) == 0
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")


def test_clean_batch_keeps_every_document_with_a_reason():
    batch = {"id": ["a", "b"], "source": ["web", "web"], "metadata": ["{}", "{}"], "order": ["0", "1"],
             "text": [GOOD + "\nMail me: a.b@example.com.", "too short."]}
    out = clean_batch(batch, {"web": "jsonl"}, {"web": True}, Q, pii=True)
    assert out["reason"] == ["", "c4_too_few_sentences"] and out["order"] == ["0", "1"]
    assert "<EMAIL>" in out["text"][0] and out["pii_email"] == [1, 0]
