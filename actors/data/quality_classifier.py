"""A model-based quality filter: logistic regression on hashed word n-grams, trained from example
"good" and "bad" text (the fastText-classifier recipe of DCLM / FineWeb-Edu, without the download).

Features are word 1..n-grams hashed into ``2**hash_bits`` buckets, log(1 + count), L2-normalised.
Training is full-batch gradient descent with L2 regularisation (small example sets, seconds on a CPU).
The model is saved as ``.npz`` (weights, bias, settings) and loaded without unpickling anything.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from pydantic import Field, model_validator

from raylm.config import Section

WORD_RE = re.compile(r"\w+")


class ClassifierConfig(Section):
    enabled: bool = False  # drop documents the classifier in model scores below threshold
    model: str | None = None  # a trained .npz (train_classifier); required when enabled
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)  # P(good) below this is dropped

    @model_validator(mode="after")
    def _model_exists(self):
        if self.enabled and (self.model is None or not Path(self.model).is_file()):
            raise ValueError(f"model: the classifier is enabled but its model file {self.model!r} does not exist "
                             "(train one with raylm.actors.data.quality_classifier.train_classifier(...).save(path))")
        return self


def features(text: str, ngram: int, hash_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(bucket indices, values) of one document, sparse."""
    words = WORD_RE.findall(text.lower())
    grams = [" ".join(words[i : i + n]) for n in range(1, ngram + 1) for i in range(len(words) - n + 1)]
    if not grams:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    mask = (1 << hash_bits) - 1
    buckets = np.fromiter((zlib.crc32(g.encode()) & mask for g in grams), dtype=np.int64, count=len(grams))
    index, counts = np.unique(buckets, return_counts=True)
    values = np.log1p(counts).astype(np.float32)
    return index, values / np.linalg.norm(values)


class QualityClassifier:
    def __init__(self, weights: np.ndarray, bias: float, ngram: int, hash_bits: int):
        self.weights, self.bias, self.ngram, self.hash_bits = weights, float(bias), ngram, hash_bits

    def score(self, text: str) -> float:
        """P(good | text)."""
        index, values = features(text, self.ngram, self.hash_bits)
        return float(1 / (1 + np.exp(-(values @ self.weights[index] + self.bias))))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        np.savez(path, weights=self.weights, bias=np.float64(self.bias), ngram=self.ngram, hash_bits=self.hash_bits)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "QualityClassifier":
        with np.load(path, allow_pickle=False) as data:
            return cls(data["weights"], float(data["bias"]), int(data["ngram"]), int(data["hash_bits"]))


def train_classifier(good: Iterable[str], bad: Iterable[str], ngram: int = 2, hash_bits: int = 18,
                     epochs: int = 200, learning_rate: float = 2.0, l2: float = 1e-4) -> QualityClassifier:
    """Fit P(good) on the two example sets; classes are weighted to count equally."""
    rows = [(features(t, ngram, hash_bits), 1.0) for t in good] + [(features(t, ngram, hash_bits), 0.0) for t in bad]
    labels = np.array([y for _, y in rows])
    if labels.min() == labels.max():
        raise ValueError("train_classifier: needs both good and bad examples")
    n_good = labels.sum()
    sample_weight = np.where(labels == 1, 0.5 / n_good, 0.5 / (len(labels) - n_good))
    # one flat sparse matrix: row ids, bucket ids, values
    row_ids = np.concatenate([np.full(len(ix), r) for r, ((ix, _), _) in enumerate(rows)])
    cols = np.concatenate([ix for (ix, _), _ in rows])
    vals = np.concatenate([v for (_, v), _ in rows])
    weights = np.zeros(1 << hash_bits, np.float64)
    bias = 0.0
    for _ in range(epochs):
        logits = np.bincount(row_ids, weights=vals * weights[cols], minlength=len(labels)) + bias
        error = (1 / (1 + np.exp(-logits)) - labels) * sample_weight
        gradient = np.bincount(cols, weights=vals * error[row_ids], minlength=len(weights)) + l2 * weights
        weights -= learning_rate * gradient
        bias -= learning_rate * error.sum()
    return QualityClassifier(weights.astype(np.float32), bias, ngram, hash_bits)


class ClassifierFilter:
    """The filter's view: None to keep, "classifier:low_score" to drop."""

    def __init__(self, cfg: ClassifierConfig):
        self.cfg = cfg
        self.model = QualityClassifier.load(cfg.model)

    def reason(self, text: str) -> str | None:
        return "classifier:low_score" if self.model.score(text) < self.cfg.threshold else None
