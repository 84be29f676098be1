"""Rule rewards: the final answer pulled out of a completion, then exact match, a regex, or a
numeric comparison with a tolerance. Each rule is ``rule(completion, reference, **options) -> float``
(1.0 or 0.0), named in a config as ``{"rule": "numeric", "abs_tol": 0.01}``.

The final-answer formats recognised, last occurrence wins: ``Answer: 42`` (the built-in tasks'
format, to the end of its line), ``#### 42`` (GSM8K's) and ``\\boxed{42}``.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable

from raylm.config import ConfigError

_ANSWER = re.compile(r"(?:^|\b)answer\s*:[ \t]*(.*)", re.IGNORECASE)
_HASHES = re.compile(r"####[ \t]*(.*)")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


class RuleError(ConfigError):
    """A rule spec that cannot be used; the message names the key."""


def extract_answer(text: str) -> str | None:
    """The final answer of a completion in one of the formats above (the last one given), stripped;
    None when the completion gives no final answer."""
    best, best_at = None, -1
    for pattern in (_ANSWER, _HASHES, _BOXED):
        for match in pattern.finditer(text):
            if match.start() > best_at:
                best, best_at = match.group(1), match.start()
    if best is None:
        return None
    best = best.strip()
    return best or None


def parse_number(text: str) -> float | None:
    """A number written alone (``1,234``, ``-3.5``, ``$12``, ``3/4``, ``42.``), else None."""
    text = text.strip().removeprefix("$").rstrip(".").strip()
    if "/" in text:
        top, _, bottom = text.partition("/")
        top_value, bottom_value = parse_number(top), parse_number(bottom)
        if top_value is None or bottom_value in (None, 0.0):
            return None
        return top_value / bottom_value
    if not _NUMBER.fullmatch(text):
        return None
    return float(text.replace(",", ""))


def _answer_of(completion: str, extract: bool) -> str | None:
    return extract_answer(completion) if extract else completion


def exact_match(completion: str, reference: str, extract: bool = True, ignore_case: bool = False,
                strip: bool = True) -> float:
    """1.0 when the final answer (or, with ``extract=False``, the whole completion) equals the reference."""
    answer = _answer_of(completion, extract)
    if answer is None:
        return 0.0
    if strip:
        answer, reference = answer.strip(), reference.strip()
    if ignore_case:
        answer, reference = answer.lower(), reference.lower()
    return float(answer == reference)


def regex_match(completion: str, reference: str, pattern: str = "{reference}", extract: bool = False,
                ignore_case: bool = False, fullmatch: bool = False) -> float:
    """1.0 when ``pattern`` is found in the completion (or its final answer with ``extract``);
    ``{reference}`` in the pattern stands for the reference, regex-escaped."""
    answer = _answer_of(completion, extract)
    if answer is None:
        return 0.0
    compiled = re.compile(pattern.replace("{reference}", re.escape(reference)), re.IGNORECASE if ignore_case else 0)
    found = compiled.fullmatch(answer.strip()) if fullmatch else compiled.search(answer)
    return float(found is not None)


def numeric_match(completion: str, reference: str, abs_tol: float = 1e-6, rel_tol: float = 0.0,
                  extract: bool = True) -> float:
    """1.0 when the final answer is a number within ``abs_tol`` or ``rel_tol`` of the reference.
    With ``extract=False`` the last number anywhere in the completion is taken."""
    want = parse_number(reference)
    if want is None:
        raise ValueError(f"reference {reference!r} is not a number")
    if extract:
        answer = extract_answer(completion)
        got = parse_number(answer) if answer is not None else None
    else:
        numbers = _NUMBER.findall(completion)
        got = parse_number(numbers[-1]) if numbers else None
    if got is None or not math.isfinite(got):
        return 0.0
    return float(math.isclose(got, want, abs_tol=abs_tol, rel_tol=rel_tol))


RULES: dict[str, Callable[..., float]] = {"exact_match": exact_match, "regex": regex_match, "numeric": numeric_match}


def rule_from_config(spec: dict | str, where: str = "reward") -> Callable[[str, str], float]:
    """``{"rule": NAME, **options}`` (or just ``NAME``) -> ``score(completion, reference)``. An
    unknown rule, an unknown option or an option of the wrong type is a ``RuleError`` naming it."""
    if isinstance(spec, str):
        spec = {"rule": spec}
    if not isinstance(spec, dict) or "rule" not in spec:
        raise RuleError(f"{where}: expected a rule name or a mapping with a 'rule' key, got {spec!r}")
    name, options = spec["rule"], {k: v for k, v in spec.items() if k != "rule"}
    if name not in RULES:
        raise RuleError(f"{where}.rule: {name!r} is not one of {', '.join(RULES)}")
    rule = RULES[name]
    parameters = inspect.signature(rule).parameters
    known = [p for p in parameters if p not in ("completion", "reference")]
    for key, value in options.items():
        if key not in known:
            raise RuleError(f"{where}.{key}: not an option of rule {name!r} (options: {', '.join(known)})")
        default = parameters[key].default
        if isinstance(default, bool) and not isinstance(value, bool):
            raise RuleError(f"{where}.{key}: expected true or false, got {value!r}")
        if isinstance(default, float) and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise RuleError(f"{where}.{key}: expected a non-negative number, got {value!r}")
        if isinstance(default, str) and not isinstance(value, str):
            raise RuleError(f"{where}.{key}: expected text, got {value!r}")
    if name == "regex":
        try:
            re.compile(options.get("pattern", "{reference}").replace("{reference}", "x"))
        except re.error as e:
            raise RuleError(f"{where}.pattern: not a valid regular expression: {e}") from None

    def score(completion: str, reference: str) -> float:
        return rule(completion, reference, **options)

    score.__name__ = f"rule_{name}"
    return score
