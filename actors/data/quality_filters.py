"""The data stage's filter actor: normalisation, the heuristic quality filters, bad words, the
model-backed filters (language id, quality classifier) and PII redaction, as one Ray Data actor
stage. Each filter family lives in its own module: ``text_cleanup`` (normalisation, PII),
``gopher_filters``, ``c4_filter``, ``fineweb_filter``, ``language_id``, ``quality_classifier``.

Each filter returns ``None`` (keep) or a reason such as ``"gopher_quality:mean_word_length"``; a
document is dropped by the first filter that rejects it, and the reason travels with the row so the
driver can count drops per filter and rule. Thresholds default to the published values (Gopher: Rae
et al. 2021; C4: Raffel et al. 2020; FineWeb: Penedo et al. 2024); every one is a config key.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pyarrow as pa

from raylm.actors.data.document_reader import RECORD_BITS
from raylm.actors.data.c4_filter import C4Config, c4_filter
from raylm.actors.data.fineweb_filter import FineWebConfig, fineweb_filter
from raylm.actors.data.gopher_filters import (GopherQualityConfig, GopherRepetitionConfig, gopher_quality,
                                              gopher_repetition, reference_words)
from raylm.actors.data.language_id import LanguageIdConfig, LanguageIdentifier
from raylm.actors.data.quality_classifier import ClassifierConfig, ClassifierFilter
from raylm.actors.data.text_cleanup import NormalizeConfig, PIIConfig, normalize, redact_pii
from raylm.config import Section

WORD_RE = re.compile(r"\w+(?:['’]\w+)*")


class BadWordsConfig(Section):
    enabled: bool = True  # false: keep documents whatever words they contain
    words: list[str] = []  # whole-word, case-insensitive; a document containing any is dropped


class FilterConfig(Section):
    normalize: NormalizeConfig = NormalizeConfig()  # Unicode and whitespace normalisation, first of all
    pii: PIIConfig = PIIConfig()  # redaction of e-mail addresses, phone numbers and IPv4 addresses, last of all
    gopher_quality: GopherQualityConfig = GopherQualityConfig()  # Gopher's quality rules (Rae et al. 2021)
    gopher_repetition: GopherRepetitionConfig = GopherRepetitionConfig()  # Gopher's repetition rules (Rae et al. 2021)
    c4: C4Config = C4Config()  # C4's line and document rules (lines removed before the other filters)
    fineweb: FineWebConfig = FineWebConfig()  # FineWeb's line-punctuation, short-line and repetition rules
    bad_words: BadWordsConfig = BadWordsConfig()  # a list of words that drops a document
    language_id: LanguageIdConfig = LanguageIdConfig()  # keep only documents in the listed languages
    classifier: ClassifierConfig = ClassifierConfig()  # drop documents a trained quality classifier scores low


class DocumentFilter:
    """Ray Data actor: normalise, apply the filters in order, redact PII in what is kept.

    Takes and returns Arrow tables with the reader's schema; rows already carrying a ``reason``
    (bad input) pass through untouched. Dropped rows keep their key and reason but lose their text,
    so the stream stays small while the driver can still count why each document went. Rows of the
    ``curated_files`` (file indexes of inputs with ``quality_filters: false``) skip the quality
    filters, heuristic and model-backed; normalisation, bad words and PII redaction still apply."""

    def __init__(self, cfg: FilterConfig, curated_files: list[int] = ()):
        self.cfg = cfg
        self.curated_files = np.asarray(sorted(curated_files), dtype=np.int64)
        words = [re.escape(w) for w in cfg.bad_words.words if w.strip()] if cfg.bad_words.enabled else []
        self.bad_words = re.compile(r"\b(?:" + "|".join(words) + r")\b", re.IGNORECASE) if words else None
        # model-backed filters, loaded once per actor; last in line, as the costliest per document
        self.model_filters = ([LanguageIdentifier(cfg.language_id)] if cfg.language_id.enabled else []) + \
                             ([ClassifierFilter(cfg.classifier)] if cfg.classifier.enabled else [])

    def filter_one(self, text: str, quality: bool = True) -> tuple[str, str, Counter]:
        """(text, reason or "", PII counts); ``quality=False``: a curated document, no quality filters."""
        cfg = self.cfg
        text = normalize(text, cfg.normalize)
        if not text:
            return "", "empty_after_normalize", Counter()
        if quality:
            text, reason = self.quality_reason(text)
            if reason:
                return "", reason, Counter()
        if self.bad_words is not None and self.bad_words.search(text):
            return "", "bad_words", Counter()
        for model_filter in self.model_filters if quality else ():
            if reason := model_filter.reason(text):
                return "", reason, Counter()
        pii: Counter = Counter()
        if cfg.pii.enabled:
            text, pii = redact_pii(text, cfg.pii)
        return text, "", pii

    def quality_reason(self, text: str) -> tuple[str, str]:
        """(text after C4's line removal, the first heuristic filter's reason or "")."""
        cfg = self.cfg
        if cfg.c4.enabled:  # first: its line rules change what the document-level rules see
            text, reason = c4_filter(text, cfg.c4)
            if reason:
                return text, f"c4:{reason}"
        words = WORD_RE.findall(text)
        tokens = reference_words(text) if (
            (cfg.gopher_quality.enabled and cfg.gopher_quality.words == "reference")
            or (cfg.gopher_repetition.enabled and cfg.gopher_repetition.rule == "reference")) else words
        if cfg.gopher_quality.enabled and (reason := gopher_quality(
                text, tokens if cfg.gopher_quality.words == "reference" else words, cfg.gopher_quality)):
            return text, f"gopher_quality:{reason}"
        if cfg.gopher_repetition.enabled and (reason := gopher_repetition(
                text, tokens if cfg.gopher_repetition.rule == "reference" else words, cfg.gopher_repetition)):
            return text, f"gopher_repetition:{reason}"
        if cfg.fineweb.enabled and (reason := fineweb_filter(text, words, cfg.fineweb)):
            return text, f"fineweb:{reason}"
        return text, ""

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts, reasons = batch.column("text").to_pylist(), batch.column("reason").to_pylist()
        curated = np.isin(np.asarray(batch.column("key").to_numpy(zero_copy_only=False)) >> RECORD_BITS,
                          self.curated_files)
        pii_counts = {name: [0] * len(texts) for name in ("email", "phone", "ip_address")}
        for i, (text, reason) in enumerate(zip(texts, reasons)):
            if reason:
                continue
            texts[i], reasons[i], pii = self.filter_one(text, quality=not curated[i])
            for name, n in pii.items():
                pii_counts[name][i] = n
        batch = batch.set_column(batch.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
        batch = batch.set_column(batch.schema.get_field_index("reason"), "reason", pa.array(reasons, pa.string()))
        for name, counts in pii_counts.items():
            batch = batch.append_column(f"pii_{name}", pa.array(counts, pa.int32()))
        return batch
