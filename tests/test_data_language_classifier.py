"""Language identification (model shipped in the package) and the trainable quality classifier."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from raylm.actors.data.language_id import LanguageIdConfig, LanguageIdentifier
from raylm.actors.data.quality_classifier import ClassifierConfig, ClassifierFilter, QualityClassifier, train_classifier
from raylm.data.stdlib_corpus import build_embedded_corpus

pytestmark = pytest.mark.timeout(300)

FRENCH = "Le module os fournit une façon portable d'utiliser les fonctionnalités dépendantes du système d'exploitation."
GERMAN = "Dieses Modul stellt eine portable Möglichkeit bereit, betriebssystemabhängige Funktionen zu nutzen."


@pytest.fixture(scope="module")
def prose(tmp_path_factory):
    path = build_embedded_corpus(tmp_path_factory.mktemp("corpus"))
    docs = [json.loads(line) for line in path.read_text().splitlines()]
    return list(dict.fromkeys(d["text"] for d in docs if d["source"] == "docstrings" and len(d["text"].split()) >= 40))


def test_language_id_keeps_english_and_names_other_languages(prose):
    lid = LanguageIdentifier(LanguageIdConfig(enabled=True))
    english = [t for t in prose[:200]]
    kept = sum(lid.reason(t) is None for t in english)
    assert kept / len(english) >= 0.9  # stdlib docstrings are English (some are mostly code)
    assert lid.reason(FRENCH) == "language:fr"
    assert lid.reason(GERMAN) == "language:de"
    both = LanguageIdentifier(LanguageIdConfig(enabled=True, languages=["en", "fr"]))
    assert both.reason(FRENCH) is None
    # the confidence edge: exactly at the threshold is kept, just above it is not
    language, confidence = lid.classify(english[0])
    assert language == "en"
    assert LanguageIdentifier(LanguageIdConfig(enabled=True, min_confidence=confidence)).reason(english[0]) is None
    above = min(1.0, np.nextafter(confidence, 2.0))
    if above > confidence:
        assert LanguageIdentifier(LanguageIdConfig(enabled=True, min_confidence=above)).reason(english[0]) == "language:low_confidence"


def shuffled(text: str, rng: random.Random) -> str:
    words = text.split()
    rng.shuffle(words)
    return " ".join(words)


def test_classifier_learns_good_from_bad_and_its_threshold_edges(prose, tmp_path):
    rng = random.Random(0)
    texts = prose[:600]
    good, held_good = texts[:400], texts[400:600]
    bad = [shuffled(t, rng) for t in texts[:400]]  # word salad of the same vocabulary: only order differs
    held_bad = [shuffled(t, rng) for t in held_good]
    model = train_classifier(good, bad)
    path = model.save(tmp_path / "quality.npz")
    loaded = QualityClassifier.load(path)
    assert loaded.score(held_good[0]) == pytest.approx(model.score(held_good[0]), abs=1e-6)
    accuracy = (sum(loaded.score(t) >= 0.5 for t in held_good) + sum(loaded.score(t) < 0.5 for t in held_bad)) / 400
    assert accuracy >= 0.9, accuracy
    text = held_good[1]
    score = loaded.score(text)
    assert ClassifierFilter(ClassifierConfig(enabled=True, model=str(path), threshold=score)).reason(text) is None
    assert ClassifierFilter(ClassifierConfig(enabled=True, model=str(path), threshold=min(1.0, score + 1e-6))).reason(text) == "classifier:low_score"
    with pytest.raises(ValueError, match="model: the classifier is enabled"):
        ClassifierConfig(enabled=True)
    with pytest.raises(ValueError, match="does not exist"):
        ClassifierConfig(enabled=True, model=str(tmp_path / "missing.npz"))
    with pytest.raises(ValueError, match="both good and bad"):
        train_classifier(good[:3], [])
