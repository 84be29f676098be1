"""Text clean-up of the data stage: Unicode and whitespace normalisation, and PII redaction (e-mail
addresses, phone numbers, IPv4 addresses replaced by ``<EMAIL>``, ``<PHONE>``, ``<IP_ADDRESS>``)."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

from pydantic import Field

from raylm.config import Section


class NormalizeConfig(Section):
    # Unicode normalisation form applied to every document
    unicode_form: str = Field(default="NFC", pattern="^(NFC|NFKC|NFD|NFKD)$")
    collapse_whitespace: bool = True  # runs of spaces/tabs -> one space; 3+ newlines -> 2; strip lines


class PIIConfig(Section):
    enabled: bool = True  # redact PII in kept documents (the kinds below)
    email: bool = True  # replace e-mail addresses with <EMAIL>
    phone: bool = True  # replace phone numbers (with separators) with <PHONE>
    ip_address: bool = True  # replace IPv4 addresses with <IP_ADDRESS>


_SPACES = re.compile(r"[ \t\f\v\u00a0\u2000-\u200a\u3000]+")
BLANK_LINES = re.compile(r"\n{3,}")


def normalize(text: str, cfg: NormalizeConfig) -> str:
    text = unicodedata.normalize(cfg.unicode_form, text)
    if cfg.collapse_whitespace:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
        text = BLANK_LINES.sub("\n\n", text).strip()
    return text


EMAIL_RE = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# North-American and international forms with separators; bare digit runs are left alone
PHONE_RE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?![\w])")
IPV4_RE = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\d|\.\d)")


def redact_pii(text: str, cfg: PIIConfig) -> tuple[str, Counter]:
    counts: Counter = Counter()
    for enabled, pattern, token, name in ((cfg.email, EMAIL_RE, "<EMAIL>", "email"),
                                          (cfg.ip_address, IPV4_RE, "<IP_ADDRESS>", "ip_address"),
                                          (cfg.phone, PHONE_RE, "<PHONE>", "phone")):
        if enabled:
            text, n = pattern.subn(token, text)
            counts[name] += n
    return text, counts
