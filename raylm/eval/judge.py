"""LM-as-judge pairwise comparison with position-swap debiasing, and the judge's agreement with a
reference (a reward model's scores or human labels).

Every prompt is judged twice: once with model A's response shown first, once with the order swapped.
A verdict names a *position* ("A" = the response shown first); ``debiased_scores`` turns the two
verdicts of a prompt into one score for model A (1 win, 0.5 tie, 0 loss), the mean of the two orders.
A judge that always answers "A" thus gives every prompt 0.5 (one win, one loss): no preference, and
``position_bias`` reports it as biased: it picks the first position in 100% of its verdicts, and its
two verdicts never name the same model (consistency 0).

Verdicts are parsed from free text (``parse_verdict``): "A", "[[B]]", "Response A is better",
"Answer: tie", ... Anything else is *unparseable*: counted and reported, never guessed. A prompt with
one unparseable verdict is scored from the other order alone (and counted); a prompt with none is
left out of the win rate.
"""

from __future__ import annotations

import math
import re
from statistics import NormalDist

from raylm.eval.engines import generate_texts, reward_scores
from raylm.eval.pairs import pair_chat, pair_completions, pair_folders

Verdict = str | None  # "A", "B", "tie" or None (unparseable)

DEFAULT_TEMPLATE = (
    "Which response answers the question better? Reply with one letter: A or B.\n\n"
    "Question: {prompt}\n\nResponse A: {response_a}\n\nResponse B: {response_b}\n\nThe better response is:"
)

_TIE = re.compile(r"^\W*(tie|draw|equal(ly good)?|both|neither|same|c)\W*$", re.I)
_BRACKETED = re.compile(r"\[\[\s*([ABC]|tie)\s*\]\]", re.I)
_LEADING = re.compile(r"^\W*([AB])(?:\W|$)")  # "A", "B.", "(A)", "A) because"
_BETTER = re.compile(r"\b([AB])\)?\s+(?i:is|was)\s+(?i:better|preferred|the better)")  # "Response B is better than A"
_NAMED = re.compile(r"\b(?i:response|answer|assistant|output|option)\s*\(?([AB])\)?(?!\w)")
_KEYED = re.compile(r"\b(?i:better(?: response)?|verdict|answer|choice|winner|prefer(?:red)?)(?:\s+is)?\s*[:=]?\s*\(?([AB])(?!\w)")


def judge_prompt(prompt: str, first: str, second: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The judge's input: ``first`` is shown as response A, ``second`` as response B."""
    return template.format(prompt=prompt, response_a=first, response_b=second)


def parse_verdict(text: str) -> Verdict:
    """The position a judge's reply names: "A", "B", "tie", or None when it names none or both.

    Tried in order: "[[A]]" (MT-Bench's format), a reply that is only a tie word, a reply that starts
    with the letter, then "Response A"/"Answer: B"-style mentions; a reply that names both A and B
    that way is ambiguous (None)."""
    text = text.strip()
    if not text:
        return None
    bracketed = {m.upper() for m in _BRACKETED.findall(text)}
    if len(bracketed) == 1:
        (found,) = bracketed
        return "tie" if found in ("C", "TIE") else found
    if len(bracketed) > 1:
        return None
    first_line = text.splitlines()[0]
    if _TIE.match(first_line):
        return "tie"
    leading = _LEADING.match(first_line)
    if leading:
        return leading.group(1)
    better = set(_BETTER.findall(text))
    if len(better) == 1:
        return better.pop()
    named = set(_NAMED.findall(text)) | set(_KEYED.findall(text))
    if len(named) == 1:
        return named.pop()
    return None


def model_a_score(verdict: Verdict, a_first: bool) -> float | None:
    """Model A's score from one verdict: 1 when the judge picked A's position, 0 B's, 0.5 a tie."""
    if verdict is None:
        return None
    if verdict == "tie":
        return 0.5
    return float((verdict == "A") == a_first)


def debiased_scores(a_first: list[Verdict], b_first: list[Verdict]) -> list[float | None]:
    """Per prompt, model A's score averaged over both orders (``a_first[i]``: the verdict with A's
    response shown first; ``b_first[i]``: with the order swapped). One unparseable order: the other
    alone; both: None."""
    out = []
    for v1, v2 in zip(a_first, b_first, strict=True):
        scores = [s for s in (model_a_score(v1, True), model_a_score(v2, False)) if s is not None]
        out.append(sum(scores) / len(scores) if scores else None)
    return out


def wilson(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (successes may be fractional: ties count half)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Normal interval of a mean of scores in [0, 1], clipped to [0, 1] (Wilson's for 0/1 scores
    would ignore the ties' half points)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    var = sum((v - m) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    half = z * math.sqrt(var / n) if var > 0 else 0.0
    if half == 0.0:  # every score equal (all ties, all wins): the Wilson interval of that proportion
        return wilson(m * n, n, confidence)
    return max(0.0, m - half), min(1.0, m + half)


def position_bias(a_first: list[Verdict], b_first: list[Verdict], confidence: float = 0.95) -> dict:
    """How much the judge's verdicts follow the position rather than the response.

    ``first_position_rate``: of the verdicts that pick a position, the share that pick the first one
    (0.5 for a judge that reads the responses, whatever they are). ``consistency``: of the prompts
    with both verdicts parsed, the share whose two verdicts favour the same model (a tie in both
    orders counts as consistent). ``position_biased``: the first-position rate's Wilson interval
    excludes 0.5."""
    picks = [v for v in list(a_first) + list(b_first) if v in ("A", "B")]
    first = sum(v == "A" for v in picks)
    low, high = wilson(first, len(picks), confidence)
    both = [(model_a_score(v1, True), model_a_score(v2, False)) for v1, v2 in zip(a_first, b_first)
            if v1 is not None and v2 is not None]
    consistent = sum(s1 == s2 for s1, s2 in both)
    return {
        "first_position_rate": first / len(picks) if picks else float("nan"),
        "first_position_rate_low": low, "first_position_rate_high": high,
        "consistency": consistent / len(both) if both else float("nan"),
        "position_biased": bool(picks) and not (low <= 0.5 <= high),
    }


def pairwise_report(a_first: list[Verdict], b_first: list[Verdict], confidence: float = 0.95) -> dict:
    """Model A's debiased win rate over B with its interval, the unparseable counts and the judge's
    position bias."""
    scores = debiased_scores(a_first, b_first)
    kept = [s for s in scores if s is not None]
    low, high = mean_interval(kept, confidence)
    unparseable = sum(v is None for v in list(a_first) + list(b_first))
    report = {
        "win_rate": sum(kept) / len(kept) if kept else float("nan"), "win_rate_low": low, "win_rate_high": high,
        "wins": sum(s > 0.5 for s in kept), "ties": sum(s == 0.5 for s in kept), "losses": sum(s < 0.5 for s in kept),
        "n": len(kept), "n_prompts": len(scores), "unparseable": unparseable,
        "unparseable_rate": unparseable / (2 * len(scores)) if scores else float("nan"),
        "prompts_without_verdict": sum(s is None for s in scores),
        "confidence": confidence,
    }
    report.update(position_bias(a_first, b_first, confidence))
    return report


def preference_of(score: float | None) -> str | None:
    """A debiased score as a preference: "A" (> 0.5), "B" (< 0.5), "tie", None (no verdict)."""
    if score is None:
        return None
    return "A" if score > 0.5 else "B" if score < 0.5 else "tie"


def agreement(judge: list[str | None], reference: list[str | None]) -> dict:
    """How often the judge's preference ("A", "B", "tie") matches a reference one (a reward model's,
    or a person's), with Cohen's kappa over the prompts where both exist."""
    pairs = [(j, r) for j, r in zip(judge, reference, strict=True) if j is not None and r is not None]
    n = len(pairs)
    if n == 0:
        return {"agreement": float("nan"), "kappa": float("nan"), "n": 0}
    observed = sum(j == r for j, r in pairs) / n
    labels = {x for pair in pairs for x in pair}
    expected = sum((sum(j == lab for j, _ in pairs) / n) * (sum(r == lab for _, r in pairs) / n) for lab in labels)
    kappa = (observed - expected) / (1 - expected) if expected < 1 else float("nan")
    decisive = [(j, r) for j, r in pairs if j != "tie" and r != "tie"]
    return {"agreement": observed, "kappa": kappa, "n": n,
            "agreement_decisive": sum(j == r for j, r in decisive) / len(decisive) if decisive else float("nan"),
            "n_decisive": len(decisive)}


def reward_preferences(scores_a: list[float], scores_b: list[float]) -> list[str]:
    """A reward model's preference per prompt: the higher score's model, "tie" when equal."""
    return ["A" if a > b else "B" if b > a else "tie" for a, b in zip(scores_a, scores_b, strict=True)]


def judge_report(cfg, checkpoints: dict[str, str], generation, scorer, seed: int, cache: dict) -> tuple[dict, list[dict]]:
    """The judge's debiased win rate of model_a over model_b, its position bias and unparseable
    verdicts, and its agreement with the labels and/or the reward model; plus every verdict."""
    records, answers = pair_completions(cfg, "judge", checkpoints, generation, seed, cache)
    prompts = [r[cfg.prompt_field] for r in records]
    a, b = answers["model_a"], answers["model_b"]
    judge_inputs = [judge_prompt(p, x, y, cfg.template) for p, x, y in zip(prompts, a, b)]  # A shown first
    judge_inputs += [judge_prompt(p, y, x, cfg.template) for p, x, y in zip(prompts, a, b)]  # swapped
    replies = generate_texts(pair_folders(cfg, "judge", checkpoints)["model"], judge_inputs, cfg.judge_max_new_tokens, [],
                             generation, seed, 0.0, chat=pair_chat(cfg, "judge", checkpoints))
    n = len(prompts)
    verdicts = [parse_verdict(r) for r in replies]
    report = pairwise_report(verdicts[:n], verdicts[n:], cfg.confidence)
    report.update(model_a=cfg.model_a, model_b=cfg.model_b, judge=cfg.model)
    preferences = [preference_of(x) for x in debiased_scores(verdicts[:n], verdicts[n:])]
    if cfg.label_field is not None:
        labels = [r[cfg.label_field] for r in records]
        report.update({f"labels/{k}": v for k, v in agreement(preferences, labels).items()})
    reward = [None] * n
    if cfg.reward_model is not None:
        scores_a, scores_b = reward_scores(cfg.reward_model, pair_chat(cfg, "judge", checkpoints), prompts, a, b, scorer)
        reward = reward_preferences(scores_a, scores_b)
        report.update({f"reward_model/{k}": v for k, v in agreement(preferences, reward).items()})
    rows = [{"prompt": p, "response_a": x, "response_b": y, "reply_a_first": replies[i], "verdict_a_first": verdicts[i],
             "reply_b_first": replies[n + i], "verdict_b_first": verdicts[n + i], "preference": preferences[i],
             **({"label": records[i][cfg.label_field]} if cfg.label_field else {}),
             **({"reward_preference": reward[i]} if cfg.reward_model else {})}
            for i, (p, x, y) in enumerate(zip(prompts, a, b))]
    return report, rows
