"""Evaluation metrics, pure Python: rolling log-likelihood windows, multiple-choice accuracy,
generation scores (exact match, token F1, BLEU, ROUGE-L), perplexity in tokenizer-independent units,
a win rate with its confidence interval, and n-gram overlap for decontamination."""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable
from statistics import NormalDist


# ---- perplexity -------------------------------------------------------------------------------
def rolling_windows(n_tokens: int, max_length: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """Windows over ``[prefix] + tokens`` (positions 0..n_tokens) that score every token once.

    Each window is ``(start, end, n_scored)``: the model reads positions ``start..end-2`` and scores
    the last ``n_scored`` positions of ``start..end-1``. The first window scores up to ``max_length``
    tokens; every later one scores at most ``stride`` new tokens and fills the rest of its
    ``max_length`` inputs with the tokens before them as context. ``stride == max_length`` is
    lm-evaluation-harness's disjoint windows; a smaller stride gives every token more context."""
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride {stride} must be between 1 and max_length {max_length}")
    windows = []
    scored = 0  # tokens scored so far; token i (1-based) sits at position i
    while scored < n_tokens:
        step = max_length if scored == 0 else stride
        end = min(n_tokens, scored + step) + 1
        start = max(0, end - max_length - 1)
        windows.append((start, end, end - 1 - scored))
        scored = end - 1
    return windows


def word_count(text: str) -> int:
    return len(re.split(r"\s+", text))  # lm-evaluation-harness's word count for word_perplexity


def perplexity_metrics(logprob_sum: float, n_tokens: int, n_words: int, n_bytes: int) -> dict:
    nll = -logprob_sum
    return {
        "token_perplexity": math.exp(nll / n_tokens),
        "word_perplexity": math.exp(nll / n_words),
        "byte_perplexity": math.exp(nll / n_bytes),
        "bits_per_byte": nll / n_bytes / math.log(2),
    }


# ---- multiple choice --------------------------------------------------------------------------
def multiple_choice_metrics(items: list[dict]) -> dict:
    """items: {"logprobs": [per choice], "choices": [str], "gold": int}. ``acc_norm`` divides each
    choice's log-likelihood by its length in characters, as lm-evaluation-harness does."""
    correct, correct_norm = [], []
    for item in items:
        lls = item["logprobs"]
        norm = [ll / max(1, len(c)) for ll, c in zip(lls, item["choices"])]
        correct.append(float(max(range(len(lls)), key=lls.__getitem__) == item["gold"]))
        correct_norm.append(float(max(range(len(norm)), key=norm.__getitem__) == item["gold"]))
    return {"acc": mean(correct), "acc_stderr": stderr(correct), "acc_norm": mean(correct_norm), "acc_norm_stderr": stderr(correct_norm)}


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def stderr(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


# ---- generation -------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str, ignore_case: bool = False, ignore_punctuation: bool = False,
                regexes_to_ignore: Iterable[str] = ()) -> float:
    """lm-evaluation-harness's exact_match and its metric_list options (no stripping by default)."""
    for pattern in regexes_to_ignore:
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        prediction, reference = prediction.translate(table), reference.translate(table)
    return float(prediction == reference)


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


# sacreBLEU's default "13a" tokenisation (what lm-evaluation-harness's bleu reports), as regexes.
_13A = [(re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
        (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
        (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
        (re.compile(r"([0-9])(-)"), r"\1 \2 ")]


def tokenize_13a(line: str) -> list[str]:
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _13A:
        line = pattern.sub(repl, line)
    return line.split()


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(predictions: list[str], references: list[str], max_n: int = 4) -> float:
    """Corpus BLEU-4, 0-100, as sacreBLEU computes it by default: 13a tokens, "exp" smoothing of
    zero n-gram counts."""
    matches, totals = [0] * max_n, [0] * max_n
    pred_len = ref_len = 0
    for pred, ref in zip(predictions, references):
        p, r = tokenize_13a(pred), tokenize_13a(ref)
        pred_len, ref_len = pred_len + len(p), ref_len + len(r)
        for n in range(1, max_n + 1):
            pn, rn = _ngrams(p, n), _ngrams(r, n)
            matches[n - 1] += sum((pn & rn).values())
            totals[n - 1] += max(0, len(p) - n + 1)
    if pred_len == 0 or totals[0] == 0:
        return 0.0
    log_precision, smooth = 0.0, 1.0
    for n in range(max_n):
        if totals[n] == 0:
            return 0.0  # predictions shorter than n words: no n-gram precision, BLEU 0 (as sacreBLEU)
        if matches[n] == 0:
            smooth *= 2
            precision = 1.0 / (smooth * totals[n])
        else:
            precision = matches[n] / totals[n]
        log_precision += math.log(precision)
    return _bleu(log_precision / max_n, pred_len, ref_len)


def _bleu(mean_log_precision: float, pred_len: int, ref_len: int) -> float:
    brevity = 1.0 if pred_len > ref_len else math.exp(1 - ref_len / pred_len)
    return 100 * brevity * math.exp(mean_log_precision)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure on lower-cased alphanumeric tokens (rouge-score's tokenisation)."""
    p = re.sub(r"[^a-z0-9]+", " ", prediction.lower()).split()
    r = re.sub(r"[^a-z0-9]+", " ", reference.lower()).split()
    if not p or not r:
        return 0.0
    previous = [0] * (len(r) + 1)
    for a in p:
        current = [0]
        for j, b in enumerate(r):
            current.append(previous[j] + 1 if a == b else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def generation_metrics(predictions: list[str], references: list[str], **exact_match_options) -> dict:
    em = [exact_match(p, r, **exact_match_options) for p, r in zip(predictions, references)]
    f1 = [token_f1(p, r) for p, r in zip(predictions, references)]
    rl = [rouge_l(p, r) for p, r in zip(predictions, references)]
    return {
        "exact_match": mean(em), "exact_match_stderr": stderr(em),
        "f1": mean(f1), "bleu": corpus_bleu(predictions, references), "rouge_l": mean(rl),
        "exact_match_per_item": em,  # in the task's document order: two checkpoints' answers pair up item by item
    }


# ---- preference -------------------------------------------------------------------------------
def win_rate(scores_a: list[float], scores_b: list[float], confidence: float = 0.95) -> dict:
    """Win rate of A over B (ties count half) with a Wilson score interval."""
    n = len(scores_a)
    wins = sum(a > b for a, b in zip(scores_a, scores_b))
    ties = sum(a == b for a, b in zip(scores_a, scores_b))
    p = (wins + 0.5 * ties) / n
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"win_rate": p, "win_rate_low": max(0.0, centre - half), "win_rate_high": min(1.0, centre + half),
            "wins": wins, "ties": ties, "losses": n - wins - ties, "n": n}


# ---- decontamination --------------------------------------------------------------------------
def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def contaminated(items: list[str], train_texts: Iterable[str], n: int = 13) -> list[bool]:
    """Which eval items share at least one word n-gram with the training text (GPT-3's test: 13-grams
    after lower-casing and dropping punctuation). Items shorter than n words are compared whole."""
    wanted: dict[tuple[str, ...], list[int]] = {}
    for i, item in enumerate(items):
        grams = word_ngrams(item, n) or {tuple(re.sub(r"[^\w\s]", " ", item.lower()).split())}
        for gram in grams:
            if gram:
                wanted.setdefault(gram, []).append(i)
    sizes = {len(g) for g in wanted}
    hit = [False] * len(items)
    for text in train_texts:
        for size in sizes:
            for gram in word_ngrams(text, size):
                for i in wanted.get(gram, ()):
                    hit[i] = True
    return hit
