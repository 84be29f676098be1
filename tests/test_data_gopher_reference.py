"""The Gopher filters count as the reference implementation does (datatrove's GopherQualityFilter and
GopherRepetitionFilter, which tokenize with spaCy's English rules): punctuation tokens count in the
alpha-word and symbol ratios but not as words, stop words are counted distinct and case-sensitive,
every line (blank ones too) is in the line ratios, and only "•" and "-" start a bullet. Each document
below is built so that the reference's counting and raylm's earlier rules (still named options)
decide differently; the expected decisions were worked out by hand from the reference's definitions
(and agree with datatrove 0.10.1 with spaCy 3.8, checked when this test was written)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from raylm.actors.data.gopher_filters import GopherQualityConfig, reference_words
from raylm.actors.data.quality_filters import DocumentFilter, FilterConfig

pytestmark = pytest.mark.timeout(120)

VOCABULARY = ("river stone garden window market letter silver morning thunder harvest village candle "
              "meadow lantern orchard bridge kitchen summer painter journey").split()


def words(n: int, start: int = 0) -> list[str]:
    return [f"{VOCABULARY[(start + i) % len(VOCABULARY)]}{'s' * ((start + i) // len(VOCABULARY) % 3)}" for i in range(n)]


def sentence_lines(n_lines: int, per_line: int = 6) -> list[str]:
    return [" ".join(["the"] + words(per_line - 2, 7 * i) + ["with"]) for i in range(n_lines)]


CLEAN = "\n".join(line + "." for line in sentence_lines(10))
# 60 words, each followed by a ";" token: the reference's alpha-word ratio is 60/120 = 0.5 < 0.8;
# \w+ words never see the semicolons (ratio 1.0)
SEMICOLONS = "The and with " + " ".join(w + " ;" for w in words(60))
# "the" ten times is one distinct stop word (reference: < 2); ten occurrences for the earlier rule
ONE_STOP_WORD = " ".join(" ".join(["the"] + words(6, 6 * i)) for i in range(10))
# "The" and "With" capitalised only: no stop word at all for the case-sensitive reference
CAPITALISED = " ".join(" ".join(["The"] + words(5, 5 * i) + ["With"]) for i in range(10))
# 4 of 10 text lines end in "...", with a blank line between lines: 4 / 19 lines (reference, blank
# lines counted) <= 0.3; 4 / 10 non-blank lines > 0.3 for the earlier rule
ELLIPSES = "\n\n".join(line + ("..." if i < 4 else ".") for i, line in enumerate(sentence_lines(10, 8)))
# every line starts with "*": a bullet for raylm's earlier rule (10/10 > 0.9), not for the reference;
# the "*" tokens leave the reference's alpha ratio at 9/10
STARS = "\n".join("* " + line for line in sentence_lines(10, 9))
# possessives: the reference splits "ox's" into "ox" + "'s" (mean word length 2.4 < 3)
POSSESSIVES = " ".join(["the", "and"] + ["ox's"] * 60)

DOCUMENTS = {  # text: (reference decision, earlier rules' decision); None keeps the document
    "clean": (CLEAN, None, None),
    "semicolons": (SEMICOLONS, "alpha_words_ratio", None),
    "one_stop_word": (ONE_STOP_WORD, "stop_words", None),
    "capitalised": (CAPITALISED, "stop_words", None),
    "ellipses": (ELLIPSES, None, "ellipsis_lines_ratio"),
    "stars": (STARS, None, "bullet_lines_ratio"),
    "possessives": (POSSESSIVES, "min_mean_word_length", None),
}


def only_gopher_quality(**quality) -> FilterConfig:
    return FilterConfig(gopher_quality=GopherQualityConfig(**quality), gopher_repetition={"enabled": False},
                        c4={"enabled": False}, fineweb={"enabled": False}, pii={"enabled": False})


def decisions(cfg: FilterConfig) -> dict[str, str | None]:
    names = list(DOCUMENTS)
    table = pa.table({"key": list(range(len(names))), "text": [DOCUMENTS[n][0] for n in names],
                      "reason": [""] * len(names)})
    reasons = DocumentFilter(cfg)(table).column("reason").to_pylist()
    return {n: (r.removeprefix("gopher_quality:") or None) for n, r in zip(names, reasons)}


def test_reference_counting_is_the_default():
    assert decisions(only_gopher_quality()) == {name: ref for name, (_, ref, _) in DOCUMENTS.items()}


def test_earlier_rules_are_named_options():
    earlier = only_gopher_quality(words="word_chars", stop_words_count="occurrences", line_rules="raylm")
    assert decisions(earlier) == {name: old for name, (_, _, old) in DOCUMENTS.items()}


def test_reference_word_tokens():
    text = "Don't use os.path.join() here, e.g. for https://x.org/a?b=1 (etc.). It's 3.14 -- a/b $100 100% well-known"
    assert reference_words(text) == [
        "Do", "n't", "use", "os.path.join", "(", ")", "here", ",", "e.g.", "for", "https://x.org/a?b=1", "(", "etc",
        ".", ")", ".", "It", "'s", "3.14", "--", "a", "/", "b", "$", "100", "100", "%", "well", "-", "known"]
