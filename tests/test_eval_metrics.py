"""Evaluation metrics against the reference implementations users compare with: lm-evaluation-harness
(rolling windows, perplexity aggregations, acc / acc_norm), rouge-score, and the SQuAD F1 definition."""

from __future__ import annotations

import math
import random

import pytest

from raylm.eval.metrics import (
    contaminated,
    corpus_bleu,
    exact_match,
    multiple_choice_metrics,
    perplexity_metrics,
    rolling_windows,
    rouge_l,
    token_f1,
    win_rate,
    word_count,
)

pytestmark = pytest.mark.timeout(120)


# ---- rolling windows --------------------------------------------------------------------------
def windows_as_pairs(tokens: list[int], prefix: int, max_length: int, stride: int | None):
    """Our windows as lm_eval's (context, continuation) pairs over ``[prefix] + tokens``."""
    seq = [prefix] + tokens
    return [(seq[start : end - n], seq[end - n : end]) for start, end, n in rolling_windows(len(tokens), max_length, stride)]


@pytest.mark.parametrize("n_tokens", [1, 5, 16, 17, 40, 100])
@pytest.mark.parametrize("max_length", [1, 4, 16])
def test_disjoint_windows_are_lm_evals(n_tokens, max_length):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = list(range(100, 100 + n_tokens))
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 7, max_length, context_len=1)]
    ours = windows_as_pairs(tokens, 7, max_length, None)
    assert ours == [(list(c), list(p)) for c, p in theirs]


@pytest.mark.parametrize("n_tokens, max_length, stride", [(50, 16, 4), (50, 16, 1), (7, 16, 3), (33, 8, 8), (100, 10, 9)])
def test_strided_windows_score_every_token_once_with_full_context(n_tokens, max_length, stride):
    tokens = list(range(100, 100 + n_tokens))
    pairs = windows_as_pairs(tokens, 7, max_length, stride)
    scored = [t for _, continuation in pairs for t in continuation]
    assert scored == tokens  # every token once, in order
    for i, (context, continuation) in enumerate(pairs):
        assert len(context) + len(continuation) - 1 <= max_length  # the model reads at most max_length tokens
        assert len(continuation) <= (max_length if i == 0 else stride)
        # Each window reads max_length tokens, or everything from the start of the text.
        assert len(context) + len(continuation) - 1 == max_length or context[0] == 7
    with pytest.raises(ValueError):
        rolling_windows(10, 8, 9)


# ---- perplexity units -------------------------------------------------------------------------
def test_perplexity_units_match_lm_eval_aggregations():
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity

    texts = ["Return the sum of a and b.", "  Spaces   and\ttabs\nand lines ", "naïve café — unicode"]
    logprobs = [-31.5, -44.25, -27.0]
    words = [word_count(t) for t in texts]
    n_bytes = [len(t.encode("utf-8")) for t in texts]
    ours = perplexity_metrics(sum(logprobs), n_tokens=40, n_words=sum(words), n_bytes=sum(n_bytes))
    assert ours["word_perplexity"] == pytest.approx(weighted_perplexity(list(zip(logprobs, words))))
    assert ours["bits_per_byte"] == pytest.approx(bits_per_byte(list(zip(logprobs, n_bytes))))
    assert ours["byte_perplexity"] == pytest.approx(weighted_perplexity(list(zip(logprobs, n_bytes))))
    assert ours["token_perplexity"] == pytest.approx(math.exp(-sum(logprobs) / 40))


# ---- multiple choice --------------------------------------------------------------------------
def lm_eval_choice(lls, choices, gold):
    """acc and acc_norm as lm_eval's ConfigurableTask.process_results computes them."""
    import numpy as np

    lengths = np.array([float(len(c)) for c in choices])
    return float(np.argmax(lls) == gold), float(np.argmax(np.array(lls) / lengths) == gold)


def test_acc_and_acc_norm_match_lm_eval():
    rng = random.Random(0)
    items = []
    for _ in range(200):
        choices = [" " + "x" * rng.randint(1, 12) for _ in range(4)]
        lls = [-rng.uniform(0, 20) for _ in choices]
        if rng.random() < 0.1:
            lls[1] = lls[0]  # ties go to the first maximum, as numpy's argmax
        items.append({"logprobs": lls, "choices": choices, "gold": rng.randrange(4)})
    ours = multiple_choice_metrics(items)
    expected = [lm_eval_choice(i["logprobs"], i["choices"], i["gold"]) for i in items]
    assert ours["acc"] == pytest.approx(sum(a for a, _ in expected) / len(items))
    assert ours["acc_norm"] == pytest.approx(sum(b for _, b in expected) / len(items))
    acc = [a for a, _ in expected]
    mean = sum(acc) / len(acc)
    assert ours["acc_stderr"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in acc) / (len(acc) - 1) / len(acc)))


# ---- generation scores ------------------------------------------------------------------------
PAIRS = [
    ("The cat sat on the mat.", "The cat is on the mat."),
    ("hello world", "hello there world"),
    ("Return the value, please!", "Return the value please"),
    ("completely different", "nothing in common here"),
    ("os.path.join(a, b)", "join"),
]


def test_corpus_bleu_matches_sacrebleu():
    import sacrebleu

    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", ".", ",", "Return", "value", "3-4", "1,000.5", "(a)", "x=1", "!"]
    predictions = [p for p, _ in PAIRS] + [" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(40)]
    references = [r for _, r in PAIRS] + [" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(40)]
    assert corpus_bleu(predictions, references) == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score)
    for p, r in PAIRS:  # single sentences: exp smoothing of zero counts, brevity penalty
        assert corpus_bleu([p], [r]) == pytest.approx(sacrebleu.corpus_bleu([p], [[r]]).score)


@pytest.mark.parametrize("options", [{}, {"ignore_case": True}, {"ignore_punctuation": True},
                                     {"regexes_to_ignore": [r"\s+$", "^ +"]},
                                     {"ignore_case": True, "ignore_punctuation": True}])
def test_exact_match_matches_lm_eval(options):
    from lm_eval.api.metrics import exact_match_hf_evaluate

    predictions = [" join", "Join", "join!", "os.path.join", "join\n", "JOIN"]
    references = ["join"] * len(predictions)
    expected = exact_match_hf_evaluate(predictions, references, **options)["exact_match"]
    ours = sum(exact_match(p, r, **options) for p, r in zip(predictions, references)) / len(predictions)
    assert ours == pytest.approx(expected)


@pytest.mark.parametrize("prediction, reference", PAIRS)
def test_rouge_l_matches_rouge_score(prediction, reference):
    from rouge_score import rouge_scorer

    expected = rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure
    assert rouge_l(prediction, reference) == pytest.approx(expected)


def test_token_f1_is_squads():
    assert token_f1("The Cat sat", "cat sat down") == pytest.approx(2 * (2 / 2) * (2 / 3) / (2 / 2 + 2 / 3))
    assert token_f1("a the an", "") == 1.0  # both empty after SQuAD normalisation
    assert token_f1("join", "join") == 1.0 and token_f1("split", "join") == 0.0


# ---- preference win rate ----------------------------------------------------------------------
def test_win_rate_interval_covers_the_truth():
    rng = random.Random(0)
    covered = 0
    for trial in range(200):
        a = [rng.gauss(0.3, 1) for _ in range(60)]
        b = [rng.gauss(0, 1) for _ in range(60)]
        result = win_rate(a, b, confidence=0.9)
        assert result["win_rate_low"] <= result["win_rate"] <= result["win_rate_high"]
        true_p = 0.5 * (1 + math.erf(0.3 / 2))  # P(N(0.3,1) > N(0,1)) = Phi(0.3 / sqrt 2)
        covered += result["win_rate_low"] <= true_p <= result["win_rate_high"]
    assert 0.82 <= covered / 200 <= 0.97  # about the nominal 90%
    tied = win_rate([1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 5.0, 4.0])
    assert tied["win_rate"] == pytest.approx((1 + 0.5 * 2) / 4) and tied["ties"] == 2
    narrow, wide = win_rate([1.0] * 400, [0.0] * 400), win_rate([1.0] * 20, [0.0] * 20)
    assert narrow["win_rate_high"] - narrow["win_rate_low"] < wide["win_rate_high"] - wide["win_rate_low"]


# ---- decontamination --------------------------------------------------------------------------
def test_ngram_overlap_flags_only_planted_items():
    train = ["Lorem ipsum " * 5, "Return a new list containing all items from the iterable in ascending order. More text.",
             "unrelated words about tkinter widgets and their geometry managers"]
    items = [
        "Docstring: Return a new list containing all items from the iterable in ascending order.\nFunction: sorted",
        "Docstring: Compute the greatest common divisor of the integers.\nFunction: math.gcd",
        "RETURN a NEW list, containing all items from the iterable",  # case and punctuation do not hide it
    ]
    assert contaminated(items, train, n=8) == [True, False, True]
    assert contaminated(items, train, n=13) == [True, False, True]  # the shared run is exactly 13 words
    assert contaminated(items, train, n=14) == [False, False, True]  # items shorter than n are compared whole
