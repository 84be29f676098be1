"""C4's heuristics (Raffel et al. 2020): line rules that remove lines (no terminal punctuation, too
few words, javascript), then document rules (lorem ipsum, curly brackets, too few sentences)."""

from __future__ import annotations

import re

from raylm.actors.data.text_cleanup import BLANK_LINES
from raylm.config import Section

TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", ":", ";", ")", "”", "’")


class C4Config(Section):
    enabled: bool = True  # apply C4's rules (before the other filters: its line removal changes what they see)
    # line rules: a line is removed (not the document) unless it ends in terminal punctuation and has
    # enough words; lines mentioning javascript or cookie policies are removed
    line_terminal_punctuation: bool = True
    min_words_per_line: int = 3  # remove lines with fewer whitespace-separated words
    remove_javascript_lines: bool = True  # remove lines that mention "javascript"
    # document rules
    min_sentences: int = 5  # drop documents with fewer sentence ends (. ! ? before a space or the end)
    drop_lorem_ipsum: bool = True  # drop documents containing "lorem ipsum"
    drop_curly_bracket: bool = True  # drop documents containing "{" (code)
    max_word_length: int = 1000  # drop documents with a kept line holding a longer word (characters)


SENTENCE_END_RE = re.compile(r"[.!?]+(?:\s|$)")


def c4_filter(text: str, cfg: C4Config) -> tuple[str, str | None]:
    """(text with C4's line rules applied, reason the document is dropped or None)."""
    lower = text.lower()
    if cfg.drop_lorem_ipsum and "lorem ipsum" in lower:
        return text, "lorem_ipsum"
    if cfg.drop_curly_bracket and "{" in text:
        return text, "curly_bracket"
    kept = []
    for line in text.split("\n"):
        stripped = line.strip()
        if not stripped:
            kept.append(line)
            continue
        if cfg.line_terminal_punctuation and not stripped.endswith(TERMINAL_PUNCTUATION):
            continue
        if len(stripped.split()) < cfg.min_words_per_line:
            continue
        if cfg.remove_javascript_lines and "javascript" in stripped.lower():
            continue
        if any(len(w) > cfg.max_word_length for w in stripped.split()):
            return text, "max_word_length"
        kept.append(line)
    text = BLANK_LINES.sub("\n\n", "\n".join(kept)).strip()
    if not text:
        return text, "no_lines_left"
    if len(SENTENCE_END_RE.findall(text)) < cfg.min_sentences:
        return text, "min_sentences"
    return text, None
