"""Language identification for the quality filters, with py3langid: its naive-Bayes model (97
languages) ships inside the wheel, so nothing is downloaded. One identifier per actor."""

from __future__ import annotations

from pydantic import Field

from raylm.config import Section


class LanguageIdConfig(Section):
    enabled: bool = False  # drop documents not in languages (py3langid's naive-Bayes identifier)
    languages: list[str] = ["en"]  # ISO 639-1 codes a document may be in
    min_confidence: float = Field(default=0.65, ge=0.0, le=1.0)  # FineWeb keeps English at >= 0.65
    max_chars: int = Field(default=4000, ge=1)  # the first N characters decide (long documents are uniform)


class LanguageIdentifier:
    def __init__(self, cfg: LanguageIdConfig):
        from py3langid.langid import MODEL_FILE
        from py3langid.langid import LanguageIdentifier as Model

        self.cfg = cfg
        self.model = Model.from_model_file(MODEL_FILE, norm_probs=True)

    def classify(self, text: str) -> tuple[str, float]:
        language, confidence = self.model.classify(text[: self.cfg.max_chars])
        return language, float(confidence)

    def reason(self, text: str) -> str | None:
        """None to keep; "language:<lang>" or "language:low_confidence" to drop."""
        language, confidence = self.classify(text)
        if language not in self.cfg.languages:
            return f"language:{language}"
        if confidence < self.cfg.min_confidence:
            return "language:low_confidence"
        return None
