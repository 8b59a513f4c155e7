"""PII scrubbing: emails, phone numbers, IP addresses and payment-card numbers.

Each match is replaced by a placeholder (<EMAIL>, <PHONE>, <IP>, <CARD>) and counted.

Digit runs are found once (groups of digits joined by single spaces, dots, dashes or
parentheses, with an optional leading +) and classified:
    card    13-19 digits, card-like words within 40 characters before it (card, visa, debit,
            payment, ...), an issuer prefix with a length that issuer uses (Visa, Mastercard,
            Amex, Discover, Diners, JCB, UnionPay, Maestro) and a valid Luhn checksum
    phone   "+" then 8-15 digits (E.164, any grouping); or a national number: NANP 10 digits
            (area code and exchange not starting with 0/1) as (415) 555-0132, 415-555-0132,
            415.555.0132, 415 555 0132, optionally after +1/1; or a trunk-prefixed number
            (0 then 8-11 digits, in 2-5 groups: 030 1234567, 020 7946 0958, 06 12 34 56 78)
    else    left alone: ISBNs (978/979 + 13 digits, or 10 in 4 groups), dates (yyyy-mm-dd,
            dd.mm.yyyy, ...), version numbers, times, order numbers, bare digit runs
IPv4 addresses preceded by "v"/"version" are version numbers and stay.
"""

from __future__ import annotations

import ipaddress
import re

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
DIGITS = re.compile(r"(?<![\w.+\-/:(])(?:\+|\(\+?)?\d+\)?(?:(?:[ .\-]|\) ?|[ .\-]?\()?\d+\)?)*(?![\w\-/:]|\.\d)")
IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.])")
IPV6 = re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")  # validated below
VERSION_BEFORE = re.compile(r"(?:\bv|version\s*|release\s*)$", re.I)
CARD_CONTEXT = re.compile(r"card|visa|master|amex|american express|discover|diners|jcb|unionpay|maestro|"
                          r"debit|credit|payment|\bcc\b|pay with|billing", re.I)
KINDS = ("email", "phone", "ip", "card")

# (prefix range start, end inclusive, number of prefix digits, allowed lengths)
ISSUERS = [
    (4, 4, 1, (13, 16, 19)),  # Visa
    (51, 55, 2, (16,)), (2221, 2720, 4, (16,)),  # Mastercard
    (34, 34, 2, (15,)), (37, 37, 2, (15,)),  # American Express
    (6011, 6011, 4, (16, 17, 18, 19)), (644, 649, 3, (16, 17, 18, 19)), (65, 65, 2, (16, 17, 18, 19)),  # Discover
    (300, 305, 3, (14, 15, 16, 17, 18, 19)), (36, 36, 2, (14, 15, 16, 17, 18, 19)), (38, 39, 2, (16, 17, 18, 19)),
    (3528, 3589, 4, (16, 17, 18, 19)),  # JCB
    (62, 62, 2, (16, 17, 18, 19)),  # UnionPay
    (50, 50, 2, (12, 13, 14, 15, 16, 17, 18, 19)), (56, 58, 2, (12, 13, 14, 15, 16, 17, 18, 19)),  # Maestro
]


def luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = ord(ch) - 48
        if i % 2 == parity:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def issuer_ok(digits: str) -> bool:
    return any(lo <= int(digits[:k]) <= hi and len(digits) in lengths for lo, hi, k, lengths in ISSUERS)


def is_card(digits: str, groups: list[str], before: str) -> bool:
    return (13 <= len(digits) <= 19 and all(len(g) >= 3 for g in groups) and CARD_CONTEXT.search(before) is not None
            and issuer_ok(digits) and luhn_ok(digits))


def is_phone(raw: str, digits: str, groups: list[str]) -> bool:
    if raw.startswith(("+", "(+")):
        return 8 <= len(digits) <= 15 and (len(groups) > 1 or len(digits) >= 10)
    if len(groups) < 2 or "." in raw and len(groups) != 3:
        return False  # one bare run is an id; dotted numbers are phones only as 3.3.4
    sizes = [len(g) for g in groups]
    if sizes and sizes[0] == 1 and groups[0] == "1" and len(digits) == 11:  # 1 415 555 0132
        groups, sizes, digits = groups[1:], sizes[1:], digits[1:]
    if len(digits) == 10 and sizes in ([3, 3, 4], [3, 7]) and digits[0] in "23456789" and digits[3] in "23456789":
        return True
    if digits[0] == "0" and 9 <= len(digits) <= 12 and 2 <= len(groups) <= 5 and 2 <= sizes[0] <= 5 \
            and not _date_like(sizes, groups) and max(sizes) >= 2:
        return True
    return False


def _date_like(sizes: list[int], groups: list[str]) -> bool:
    """yyyy-mm-dd, dd.mm.yyyy and friends (8 digits at most, so never a 9+ digit phone; kept
    explicit so that loosening the phone rules cannot start eating dates)."""
    return sizes in ([4, 2, 2], [2, 2, 4], [1, 2, 4], [2, 1, 4], [1, 1, 4], [4, 1, 1], [4, 1, 2], [4, 2, 1])


def _digit_run(m: re.Match, text: str, counts: dict) -> str:
    raw, tail = m.group(0), ""
    if raw.endswith(")") and raw.count("(") < raw.count(")"):  # the closing bracket of the prose
        raw, tail = raw[:-1], ")"
    groups = re.findall(r"\d+", raw)
    digits = "".join(groups)
    if len(digits) < 8:
        return m.group(0)
    if is_card(digits, groups, text[max(0, m.start() - 40): m.start()]):
        counts["card"] += 1
        return "<CARD>" + tail
    if is_phone(raw, digits, groups):
        counts["phone"] += 1
        return "<PHONE>" + tail
    return m.group(0)


def _ipv4(m: re.Match, text: str, counts: dict) -> str:
    if VERSION_BEFORE.search(text[max(0, m.start() - 10): m.start()]):
        return m.group(0)
    counts["ip"] += 1
    return "<IP>"


def _ipv6(m: re.Match, counts: dict) -> str:
    try:
        ipaddress.IPv6Address(m.group(0))
    except ValueError:
        return m.group(0)
    counts["ip"] += 1
    return "<IP>"


def scrub_pii(text: str) -> tuple[str, dict[str, int]]:
    """Replace PII with placeholders; returns the new text and counts per kind."""
    counts = dict.fromkeys(KINDS, 0)
    if "@" in text:
        text, counts["email"] = EMAIL.subn("<EMAIL>", text)
    if text.count(".") >= 3:
        src = text
        text = IPV4.sub(lambda m: _ipv4(m, src, counts), text)
    if text.count(":") >= 2:
        text = IPV6.sub(lambda m: _ipv6(m, counts), text)
    src = text
    return DIGITS.sub(lambda m: _digit_run(m, src, counts), text), counts
