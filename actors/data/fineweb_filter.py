"""FineWeb's heuristics (Penedo et al. 2024): line punctuation, short lines, duplicated line
characters and newlines per word."""

from __future__ import annotations

from raylm.actors.data.c4_filter import TERMINAL_PUNCTUATION
from raylm.actors.data.gopher_filters import duplicate_lines
from raylm.config import Section


class FineWebConfig(Section):
    enabled: bool = True  # apply FineWeb's rules
    # drop documents with a smaller fraction of non-blank lines ending in terminal punctuation
    min_line_punctuation_ratio: float = 0.12
    # drop documents with a larger fraction of short lines (see short_line_chars)
    max_short_line_ratio: float = 0.67
    short_line_chars: int = 30  # a line of at most this many characters (stripped) is short
    # drop documents whose repeated lines hold a larger fraction of the characters (newlines excluded)
    max_duplicate_line_chars_ratio: float = 0.1
    max_newline_word_ratio: float = 0.3  # drop documents with more newlines per word


def fineweb_filter(text: str, words: list[str], cfg: FineWebConfig) -> str | None:
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if not lines:
        return "empty"
    if sum(line.endswith(TERMINAL_PUNCTUATION) for line in lines) / len(lines) < cfg.min_line_punctuation_ratio:
        return "line_punctuation_ratio"
    if sum(len(line) <= cfg.short_line_chars for line in lines) / len(lines) > cfg.max_short_line_ratio:
        return "short_line_ratio"
    if duplicate_lines(lines)[1] / len(text.replace("\n", "")) > cfg.max_duplicate_line_chars_ratio:
        return "duplicate_line_chars_ratio"
    if words and text.count("\n") / len(words) > cfg.max_newline_word_ratio:
        return "newline_word_ratio"
    return None
