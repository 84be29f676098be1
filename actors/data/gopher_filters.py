"""Gopher's quality and repetition rules (Rae et al. 2021), with the reference implementation's
definitions (datatrove's GopherQualityFilter / GopherRepetitionFilter) by default and raylm's earlier
rules as named options. Each returns ``None`` (keep) or the rule that rejects the document."""

from __future__ import annotations

import re
from collections import Counter
from typing import Literal

from raylm.config import Section

STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])
BULLETS = ("•", "*", "-", "–", "‣", "◦", "⁃")  # raylm's own bullet rule ("raylm")
REFERENCE_BULLETS = ("•", "-")  # the reference implementation's (datatrove's GopherQualityFilter)

# ---------------------------------------------------------------- the reference's word tokens
# datatrove's Gopher filters count the tokens of spaCy's blank English tokenizer: whitespace-split,
# then punctuation, quotes and brackets split off as tokens of their own ("word." -> "word", "."),
# contractions split ("don't" -> "do", "n't"), URLs, numbers ("3.14") and dotted abbreviations
# ("e.g.") kept whole. ``reference_words`` follows those rules without spaCy (raylm does not depend
# on it); benchmarks/data_pipeline.py measures the agreement on real text.
PUNCTUATION_CHARS = set("!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»")
PUNCTUATION_CHARS |= {chr(c) for a, b in ((0, 9), (11, 13), (13, 32), (127, 160)) for c in range(a, b)}
_QUOTES = "'\"”“`‘´’‚„»«「」『』（）〔〕【】《》〈〉"
_PUNCT = "…,:;!?¿¡()[]{}<>_#*&。？！，、；：～·"
_CURRENCY = "$£€¥฿₽₹₩₺₴₦₱"
_PREFIX_RE = re.compile(r"(?:\.\.+|…|[§%=—–]|\+(?![0-9])|[" + re.escape(_PUNCT + _QUOTES + _CURRENCY) + "])")
_SUFFIX_RE = re.compile(
    r"(?:\.\.+|…|['’][sS]|[—–]|(?<=[0-9])\+|(?<=[0-9])[" + re.escape(_CURRENCY) + r"%]"
    r"|(?<=[0-9a-z%²\-+" + re.escape(_PUNCT + _QUOTES) + r"])\.|(?<=[A-Z][A-Z])\.|[" + re.escape(_PUNCT + _QUOTES) + "])$")
_INFIX_RE = re.compile(
    r"\.\.+|…|(?<=[0-9])[+\-*^](?=[0-9-])|(?<=[a-z'\"])\.(?=[A-Z'\"])|(?<=[^\W\d_]),(?=[^\W\d_])"
    r"|(?<=[^\W_])(?:---|--|-|–|—|~)(?=[^\W\d_])|(?<=[^\W_])[:<>=/](?=[^\W\d_])")
_URL_RE = re.compile(r"(?:[a-zA-Z][a-zA-Z0-9+.-]*://|www\.)\S+?(?=[.,;:!?)\]'\"]*$)|\S+@\S+\.[a-zA-Z]{2,}")
_ABBREVIATION_RE = re.compile(r"^(?:[A-Za-z]\.){2,}$|^(?:Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|Inc|Ltd|Co|Corp|vs|Jan|Feb|Mar|Apr|Jun|"
                              r"Jul|Aug|Sep|Sept|Oct|Nov|Dec|Mt|Gen|Gov|Rev|Sen|Rep|Bros)\.$")
_CONTRACTION_RE = re.compile(r"^(.+?)(n['’]t|['’](?:re|ve|ll|d|m|s))$", re.IGNORECASE)


_WHOLE = {"and/or": ["and/or"], "''": ["''"], "cannot": ["can", "not"], "Cannot": ["Can", "not"]}


def _split_chunk(chunk: str, out: list[str]) -> None:
    suffixes: list[str] = []
    while chunk:
        if chunk in _WHOLE:
            out += _WHOLE[chunk]
            chunk = ""
            break
        if _ABBREVIATION_RE.match(chunk) or (_URL_RE.fullmatch(chunk) is not None):
            break
        m = _PREFIX_RE.match(chunk)
        if m:
            out.append(m.group())
            chunk = chunk[m.end():]
            continue
        m = _SUFFIX_RE.search(chunk)
        if m and m.start() > 0:
            suffixes.append(m.group())
            chunk = chunk[:m.start()]
            continue
        break
    if chunk:
        if _ABBREVIATION_RE.match(chunk) or _URL_RE.fullmatch(chunk):
            out.append(chunk)
        else:
            start = 0
            for m in _INFIX_RE.finditer(chunk):
                if m.start() > start:
                    _contraction(chunk[start:m.start()], out)
                out.append(m.group())
                start = m.end()
            if start < len(chunk):
                _contraction(chunk[start:], out)
    out.extend(reversed(suffixes))


def _contraction(word: str, out: list[str]) -> None:
    m = _CONTRACTION_RE.match(word)
    if m and m.group(1).isalpha():
        out += [m.group(1), m.group(2)]
    else:
        out.append(word)


def reference_words(text: str) -> list[str]:
    """The word tokens the reference Gopher filters count: words, numbers and punctuation tokens."""
    out: list[str] = []
    for chunk in text.split():
        _split_chunk(chunk, out)
    return out


def is_symbol_token(token: str) -> bool:
    """Only punctuation characters: not a word for the reference's word counts and mean length."""
    return all(c in PUNCTUATION_CHARS for c in token)


class GopherQualityConfig(Section):
    """Rae et al. 2021's rules with the reference implementation's definitions (datatrove's
    GopherQualityFilter) by default; each of raylm's earlier rules is a named option."""

    enabled: bool = True  # apply the Gopher quality rules
    # "reference": word tokens as the reference counts them (punctuation tokens count in the
    # alpha-word and symbol ratios; word count and mean length skip them). "word_chars": raylm's
    # \w+ words, punctuation never counted (keeps far more punctuation-heavy text).
    words: Literal["reference", "word_chars"] = "reference"
    # "distinct": how many of the stop words occur at all, case-sensitive (the reference);
    # "occurrences": every occurrence counted, case-insensitive (raylm's earlier rule).
    stop_words_count: Literal["distinct", "occurrences"] = "distinct"
    # "reference": lines beginning with "•" or "-", every line (blank ones too) in the ratio;
    # "raylm": also "*", "–", "‣", "◦", "⁃", over the non-blank lines.
    line_rules: Literal["reference", "raylm"] = "reference"
    min_words: int = 50  # drop documents with fewer words
    max_words: int = 100_000  # drop documents with more words
    min_mean_word_length: float = 3.0  # drop documents whose mean word length (characters) is below this
    max_mean_word_length: float = 10.0  # drop documents whose mean word length (characters) is above this
    max_symbol_word_ratio: float = 0.1  # "#" and "..." per word
    max_bullet_lines_ratio: float = 0.9  # drop documents with a larger fraction of lines starting with a bullet
    max_ellipsis_lines_ratio: float = 0.3  # drop documents with a larger fraction of lines ending in an ellipsis
    min_alpha_words_ratio: float = 0.8  # drop documents with a smaller fraction of words holding a letter
    min_stop_words: int = 2  # drop documents with fewer stop words ("the", "be", "to", ...; see stop_words_count)


class GopherRepetitionConfig(Section):
    """Rae et al. 2021's Table A1, with the reference implementation's definitions (datatrove's
    GopherRepetitionFilter) by default: n-grams of its word tokens, characters over the text's."""

    enabled: bool = True  # apply the Gopher repetition rules
    # "reference": paragraphs too; n-gram characters over len(text), the top n-gram counted even
    # once, repeated n-grams skipped over; "raylm": raylm's earlier rule (no paragraph rules, \w+
    # words, characters over the words', a word counted once however many repeats cover it)
    rule: Literal["reference", "raylm"] = "reference"
    # drop documents with a larger fraction of repeated paragraphs ("reference" rule only)
    max_duplicate_paragraphs_ratio: float = 0.3
    # drop documents whose repeated paragraphs hold a larger fraction of characters ("reference" only)
    max_duplicate_paragraph_chars_ratio: float = 0.2
    max_duplicate_lines_ratio: float = 0.3  # drop documents with a larger fraction of repeated lines
    # drop documents whose repeated lines hold a larger fraction of the text's characters
    max_duplicate_line_chars_ratio: float = 0.2
    # fraction of characters in the most frequent n-gram, n = 2, 3, 4
    max_top_ngram_chars_ratio: dict[int, float] = {2: 0.2, 3: 0.18, 4: 0.16}
    # fraction of characters in n-grams that occur more than once, n = 5..10
    max_duplicate_ngram_chars_ratio: dict[int, float] = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


def gopher_quality(text: str, words: list[str], cfg: GopherQualityConfig) -> str | None:
    """``words``: the document's tokens under ``cfg.words`` (``reference_words`` or ``WORD_RE``)."""
    reference_lines = cfg.line_rules == "reference"
    n_tokens = len(words)
    counted = [w for w in words if not is_symbol_token(w)] if cfg.words == "reference" else words
    n = len(counted)
    if n < cfg.min_words:
        return "min_words"
    if n > cfg.max_words:
        return "max_words"
    if n_tokens == 0:
        return "min_words"
    if n:
        mean = sum(map(len, counted)) / n
        if mean < cfg.min_mean_word_length:
            return "min_mean_word_length"
        if mean > cfg.max_mean_word_length:
            return "max_mean_word_length"
    if cfg.words == "reference":  # hashes and ellipses each against all tokens
        if (text.count("#") / n_tokens > cfg.max_symbol_word_ratio
                or (text.count("...") + text.count("…")) / n_tokens > cfg.max_symbol_word_ratio):
            return "symbol_word_ratio"
    elif (text.count("#") + text.count("...") + text.count("…")) / n_tokens > cfg.max_symbol_word_ratio:
        return "symbol_word_ratio"
    if reference_lines:
        lines, bullets = text.splitlines() or [""], REFERENCE_BULLETS
    else:
        lines, bullets = [line for line in text.split("\n") if line.strip()], BULLETS
    if lines and sum(line.lstrip().startswith(bullets) for line in lines) / len(lines) > cfg.max_bullet_lines_ratio:
        return "bullet_lines_ratio"
    if lines and sum(line.rstrip().endswith(("...", "…")) for line in lines) / len(lines) > cfg.max_ellipsis_lines_ratio:
        return "ellipsis_lines_ratio"
    if sum(any(c.isalpha() for c in w) for w in words) / n_tokens < cfg.min_alpha_words_ratio:
        return "alpha_words_ratio"
    if cfg.stop_words_count == "distinct":
        stop_words = len(STOP_WORDS.intersection(words))
    else:
        stop_words = sum(w.lower() in STOP_WORDS for w in words)
    if stop_words < cfg.min_stop_words:
        return "stop_words"
    return None


def duplicate_lines(lines: list[str]) -> tuple[int, int]:
    """(number of lines, characters in them) that repeat an earlier line."""
    seen: set[str] = set()
    count = chars = 0
    for line in lines:
        if line in seen:
            count += 1
            chars += len(line)
        seen.add(line)
    return count, chars


_PARAGRAPH_BREAK = re.compile(r"\n{2,}")
_LINE_BREAK = re.compile(r"\n+")


def gopher_repetition(text: str, words: list[str], cfg: GopherRepetitionConfig) -> str | None:
    """``words``: the document's tokens (``reference_words`` for the reference rule)."""
    if not text:
        return None
    if cfg.rule == "raylm":
        return _gopher_repetition_raylm(text, words, cfg)
    paragraphs = _PARAGRAPH_BREAK.split(text.strip())
    dup, dup_chars = duplicate_lines(paragraphs)
    if dup / len(paragraphs) > cfg.max_duplicate_paragraphs_ratio:
        return "duplicate_paragraphs_ratio"
    if dup_chars / len(text) > cfg.max_duplicate_paragraph_chars_ratio:
        return "duplicate_paragraph_chars_ratio"
    lines = _LINE_BREAK.split(text)
    dup, dup_chars = duplicate_lines(lines)
    if dup / len(lines) > cfg.max_duplicate_lines_ratio:
        return "duplicate_lines_ratio"
    if dup_chars / len(text) > cfg.max_duplicate_line_chars_ratio:
        return "duplicate_line_chars_ratio"
    for n, limit in sorted(cfg.max_top_ngram_chars_ratio.items()):
        if len(words) < n:
            continue
        # the most frequent n-gram, as its words joined by spaces, times its count (even once)
        gram, count = Counter(" ".join(words[i:i + n]) for i in range(len(words) - n + 1)).most_common(1)[0]
        if len(gram) * count / len(text) > limit:
            return f"top_{n}_gram_ratio"
    for n, limit in sorted(cfg.max_duplicate_ngram_chars_ratio.items()):
        # left to right; a repeat of an earlier n-gram counts its characters and jumps past itself
        seen: set[str] = set()
        repeated, i = 0, 0
        while i < len(words) - n + 1:
            gram = "".join(words[i:i + n])
            if gram in seen:
                repeated += len(gram)
                i += n
            else:
                seen.add(gram)
                i += 1
        if repeated / len(text) > limit:
            return f"duplicate_{n}_gram_ratio"
    return None


def _gopher_repetition_raylm(text: str, words: list[str], cfg: GopherRepetitionConfig) -> str | None:
    lines = [line for line in text.split("\n") if line.strip()]
    if lines:
        dup, dup_chars = duplicate_lines(lines)
        if dup / len(lines) > cfg.max_duplicate_lines_ratio:
            return "duplicate_lines_ratio"
        if dup_chars / len(text) > cfg.max_duplicate_line_chars_ratio:
            return "duplicate_line_chars_ratio"
    total_chars = sum(map(len, words)) or 1
    for n, limit in sorted(cfg.max_top_ngram_chars_ratio.items()):
        if len(words) < n:
            continue
        counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        gram, count = counts.most_common(1)[0]
        if count > 1 and count * sum(map(len, gram)) / total_chars > limit:
            return f"top_{n}_gram_ratio"
    for n, limit in sorted(cfg.max_duplicate_ngram_chars_ratio.items()):
        if len(words) < n:
            continue
        seen: set[tuple] = set()
        covered = [False] * len(words)  # a word counts once even when several repeated n-grams cover it
        for i in range(len(words) - n + 1):
            gram = tuple(words[i:i + n])
            if gram in seen:
                covered[i:i + n] = [True] * n
            seen.add(gram)
        if sum(len(w) for w, c in zip(words, covered) if c) / total_chars > limit:
            return f"duplicate_{n}_gram_ratio"
    return None
