"""Normalisation, PII redaction and the heuristic quality filters, as one Ray Data actor stage.

Each filter returns ``None`` (keep) or a reason such as ``"gopher_quality:mean_word_length"``; a
document is dropped by the first filter that rejects it, and the reason travels with the row so the
driver can count drops per filter and rule. Thresholds default to the published values (Gopher: Rae
et al. 2021; C4: Raffel et al. 2020; FineWeb: Penedo et al. 2024); every one is a config key.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Literal

import pyarrow as pa
from pydantic import Field

from raylm.actors.data.language_id import LanguageIdConfig, LanguageIdentifier
from raylm.actors.data.quality_classifier import ClassifierConfig, ClassifierFilter
from raylm.config import Section

STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])
TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", ":", ";", ")", "”", "’")
BULLETS = ("•", "*", "-", "–", "‣", "◦", "⁃")  # raylm's own bullet rule ("raylm")
REFERENCE_BULLETS = ("•", "-")  # the reference implementation's (datatrove's GopherQualityFilter)
WORD_RE = re.compile(r"\w+(?:['’]\w+)*")

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


class NormalizeConfig(Section):
    unicode_form: str = Field(default="NFC", pattern="^(NFC|NFKC|NFD|NFKD)$")
    collapse_whitespace: bool = True  # runs of spaces/tabs -> one space; 3+ newlines -> 2; strip lines


class PIIConfig(Section):
    enabled: bool = True
    email: bool = True
    phone: bool = True
    ip_address: bool = True


class GopherQualityConfig(Section):
    """Rae et al. 2021's rules with the reference implementation's definitions (datatrove's
    GopherQualityFilter) by default; each of raylm's earlier rules is a named option."""

    enabled: bool = True
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
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1  # "#" and "..." per word
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2


class GopherRepetitionConfig(Section):
    """Rae et al. 2021's Table A1, with the reference implementation's definitions (datatrove's
    GopherRepetitionFilter) by default: n-grams of its word tokens, characters over the text's."""

    enabled: bool = True
    # "reference": paragraphs too; n-gram characters over len(text), the top n-gram counted even
    # once, repeated n-grams skipped over; "raylm": raylm's earlier rule (no paragraph rules, \w+
    # words, characters over the words', a word counted once however many repeats cover it)
    rule: Literal["reference", "raylm"] = "reference"
    max_duplicate_paragraphs_ratio: float = 0.3
    max_duplicate_paragraph_chars_ratio: float = 0.2
    max_duplicate_lines_ratio: float = 0.3
    max_duplicate_line_chars_ratio: float = 0.2
    # fraction of characters in the most frequent n-gram, n = 2, 3, 4
    max_top_ngram_chars_ratio: dict[int, float] = {2: 0.2, 3: 0.18, 4: 0.16}
    # fraction of characters in n-grams that occur more than once, n = 5..10
    max_duplicate_ngram_chars_ratio: dict[int, float] = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


class C4Config(Section):
    enabled: bool = True
    # line rules: a line is removed (not the document) unless it ends in terminal punctuation and has
    # enough words; lines mentioning javascript or cookie policies are removed
    line_terminal_punctuation: bool = True
    min_words_per_line: int = 3
    remove_javascript_lines: bool = True
    # document rules
    min_sentences: int = 5
    drop_lorem_ipsum: bool = True
    drop_curly_bracket: bool = True
    max_word_length: int = 1000


class FineWebConfig(Section):
    enabled: bool = True
    min_line_punctuation_ratio: float = 0.12
    max_short_line_ratio: float = 0.67
    short_line_chars: int = 30
    max_duplicate_line_chars_ratio: float = 0.1
    max_newline_word_ratio: float = 0.3


class BadWordsConfig(Section):
    enabled: bool = True
    words: list[str] = []  # whole-word, case-insensitive; a document containing any is dropped


class FilterConfig(Section):
    normalize: NormalizeConfig = NormalizeConfig()
    pii: PIIConfig = PIIConfig()
    gopher_quality: GopherQualityConfig = GopherQualityConfig()
    gopher_repetition: GopherRepetitionConfig = GopherRepetitionConfig()
    c4: C4Config = C4Config()
    fineweb: FineWebConfig = FineWebConfig()
    bad_words: BadWordsConfig = BadWordsConfig()
    language_id: LanguageIdConfig = LanguageIdConfig()
    classifier: ClassifierConfig = ClassifierConfig()


_SPACES = re.compile(r"[ \t\f\v\u00a0\u2000-\u200a\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize(text: str, cfg: NormalizeConfig) -> str:
    text = unicodedata.normalize(cfg.unicode_form, text)
    if cfg.collapse_whitespace:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
        text = _BLANK_LINES.sub("\n\n", text).strip()
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


def _duplicate_lines(lines: list[str]) -> tuple[int, int]:
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
    dup, dup_chars = _duplicate_lines(paragraphs)
    if dup / len(paragraphs) > cfg.max_duplicate_paragraphs_ratio:
        return "duplicate_paragraphs_ratio"
    if dup_chars / len(text) > cfg.max_duplicate_paragraph_chars_ratio:
        return "duplicate_paragraph_chars_ratio"
    lines = _LINE_BREAK.split(text)
    dup, dup_chars = _duplicate_lines(lines)
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
        dup, dup_chars = _duplicate_lines(lines)
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
    text = _BLANK_LINES.sub("\n\n", "\n".join(kept)).strip()
    if not text:
        return text, "no_lines_left"
    if len(SENTENCE_END_RE.findall(text)) < cfg.min_sentences:
        return text, "min_sentences"
    return text, None


def fineweb_filter(text: str, words: list[str], cfg: FineWebConfig) -> str | None:
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if not lines:
        return "empty"
    if sum(line.endswith(TERMINAL_PUNCTUATION) for line in lines) / len(lines) < cfg.min_line_punctuation_ratio:
        return "line_punctuation_ratio"
    if sum(len(line) <= cfg.short_line_chars for line in lines) / len(lines) > cfg.max_short_line_ratio:
        return "short_line_ratio"
    if _duplicate_lines(lines)[1] / len(text.replace("\n", "")) > cfg.max_duplicate_line_chars_ratio:
        return "duplicate_line_chars_ratio"
    if words and text.count("\n") / len(words) > cfg.max_newline_word_ratio:
        return "newline_word_ratio"
    return None


class DocumentFilter:
    """Ray Data actor: normalise, apply the filters in order, redact PII in what is kept.

    Takes and returns Arrow tables with the reader's schema; rows already carrying a ``reason``
    (bad input) pass through untouched. Dropped rows keep their key and reason but lose their text,
    so the stream stays small while the driver can still count why each document went."""

    def __init__(self, cfg: FilterConfig):
        self.cfg = cfg
        words = [re.escape(w) for w in cfg.bad_words.words if w.strip()]
        self.bad_words = re.compile(r"\b(?:" + "|".join(words) + r")\b", re.IGNORECASE) if words else None
        # model-backed filters, loaded once per actor; last in line, as the costliest per document
        self.model_filters = ([LanguageIdentifier(cfg.language_id)] if cfg.language_id.enabled else []) + \
                             ([ClassifierFilter(cfg.classifier)] if cfg.classifier.enabled else [])

    def filter_one(self, text: str) -> tuple[str, str, Counter]:
        """(text, reason or "", PII counts)."""
        cfg = self.cfg
        text = normalize(text, cfg.normalize)
        if not text:
            return "", "empty_after_normalize", Counter()
        if cfg.c4.enabled:  # first: its line rules change what the document-level rules see
            text, reason = c4_filter(text, cfg.c4)
            if reason:
                return "", f"c4:{reason}", Counter()
        words = WORD_RE.findall(text)
        tokens = reference_words(text) if (
            (cfg.gopher_quality.enabled and cfg.gopher_quality.words == "reference")
            or (cfg.gopher_repetition.enabled and cfg.gopher_repetition.rule == "reference")) else words
        if cfg.gopher_quality.enabled and (reason := gopher_quality(
                text, tokens if cfg.gopher_quality.words == "reference" else words, cfg.gopher_quality)):
            return "", f"gopher_quality:{reason}", Counter()
        if cfg.gopher_repetition.enabled and (reason := gopher_repetition(
                text, tokens if cfg.gopher_repetition.rule == "reference" else words, cfg.gopher_repetition)):
            return "", f"gopher_repetition:{reason}", Counter()
        if cfg.fineweb.enabled and (reason := fineweb_filter(text, words, cfg.fineweb)):
            return "", f"fineweb:{reason}", Counter()
        if self.bad_words is not None and self.bad_words.search(text):
            return "", "bad_words", Counter()
        for model_filter in self.model_filters:
            if reason := model_filter.reason(text):
                return "", reason, Counter()
        pii: Counter = Counter()
        if cfg.pii.enabled:
            text, pii = redact_pii(text, cfg.pii)
        return text, "", pii

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts, reasons = batch.column("text").to_pylist(), batch.column("reason").to_pylist()
        pii_counts = {name: [0] * len(texts) for name in ("email", "phone", "ip_address")}
        for i, (text, reason) in enumerate(zip(texts, reasons)):
            if reason:
                continue
            texts[i], reasons[i], pii = self.filter_one(text)
            for name, n in pii.items():
                pii_counts[name][i] = n
        batch = batch.set_column(batch.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
        batch = batch.set_column(batch.schema.get_field_index("reason"), "reason", pa.array(reasons, pa.string()))
        for name, counts in pii_counts.items():
            batch = batch.append_column(f"pii_{name}", pa.array(counts, pa.int32()))
        return batch
