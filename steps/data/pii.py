"""PII scrubbing: emails, phone numbers, IP addresses and payment-card numbers.

Each match is replaced by a placeholder (<EMAIL>, <PHONE>, <IP>, <CARD>) and counted. Card
numbers must pass the Luhn check, so ordinary long numbers (ISBNs, ids) survive; phone
numbers need a phone-like shape (separators or a leading +), not just any digit run.
"""

from __future__ import annotations

import ipaddress
import re

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.])")
IPV6 = re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")  # validated below
PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){1,4}"  # international: +44 20 7946 0958
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}"  # US: (415) 555-0132
    r"|\b\d{3}[.-]\d{3}[.-]\d{4}"  # US: 415-555-0132
    r")(?!\w)")
KINDS = ("email", "phone", "ip", "card")


def luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = ord(ch) - 48
        if i % 2 == parity:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(m: re.Match) -> str:
    digits = re.sub(r"\D", "", m.group(0))
    return "<CARD>" if 13 <= len(digits) <= 19 and luhn_ok(digits) else m.group(0)


def _ipv6(m: re.Match) -> str:
    try:
        ipaddress.IPv6Address(m.group(0))
        return "<IP>"
    except ValueError:
        return m.group(0)


def scrub_pii(text: str) -> tuple[str, dict[str, int]]:
    """Replace PII with placeholders; returns the new text and counts per kind."""
    counts = dict.fromkeys(KINDS, 0)
    if "@" in text:
        text, counts["email"] = EMAIL.subn("<EMAIL>", text)
    before = text.count("<CARD>")
    text = CARD.sub(_card, text)  # before phones: a card number also looks like digit groups
    counts["card"] = text.count("<CARD>") - before
    text, counts["ip"] = IPV4.subn("<IP>", text)
    if text.count(":") >= 2:
        before = text.count("<IP>")
        text = IPV6.sub(_ipv6, text)
        counts["ip"] += text.count("<IP>") - before
    text, counts["phone"] = PHONE.subn("<PHONE>", text)
    return text, counts
