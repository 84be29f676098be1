"""LM-as-judge math on known verdicts: parsing, position-swap debiasing, position bias, unparseable
replies, agreement with a reference; and the refusal when no judge model is configured."""

from __future__ import annotations

import json

import pytest
import yaml

from raylm.cli import main as raylm_main
from raylm.eval.judge import (
    agreement,
    debiased_scores,
    judge_prompt,
    pairwise_report,
    parse_verdict,
    preference_of,
    reward_preferences,
)


@pytest.mark.parametrize("reply, verdict", [
    ("A", "A"), (" B.", "B"), ("(A) because it is shorter", "A"), ("[[B]]", "B"), ("[[C]]", "tie"),
    ("Tie", "tie"), ("neither", "tie"), ("Response B is better than response A.", "B"),
    ("The better response is: A", "A"), ("Answer: B", "B"), ("I prefer response A", "A"),
    ("", None), ("zzz", None), ("Both A and B are fine", None), ("[[A]] or maybe [[B]]", None),
    ("Apples are better", None), ("answer a", None),
])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_judge_prompt_places_responses_in_order():
    text = judge_prompt("Q?", "first answer", "second answer")
    assert text.index("Response A: first answer") < text.index("Response B: second answer")
    assert "Q?" in text


def test_always_first_position_judge_is_a_coin_and_reported_biased():
    # The judge answers "A" whatever it is shown: model A wins when shown first, loses when swapped.
    n = 40
    report = pairwise_report(["A"] * n, ["A"] * n)
    assert report["win_rate"] == 0.5 and report["ties"] == n and report["n"] == n
    assert report["win_rate_low"] < 0.5 < report["win_rate_high"]
    assert report["first_position_rate"] == 1.0 and report["consistency"] == 0.0
    assert report["position_biased"] is True
    assert report["unparseable"] == 0


def test_consistent_judge_that_prefers_model_a():
    # Reads the responses: picks model A's in both orders (position A first, then position B).
    n = 30
    report = pairwise_report(["A"] * n, ["B"] * n)
    assert report["win_rate"] == 1.0 and report["wins"] == n
    assert report["first_position_rate"] == 0.5 and report["consistency"] == 1.0
    assert report["position_biased"] is False
    assert report["win_rate_low"] > 0.85  # all wins: Wilson's interval, not a zero-width one


def test_mixed_verdicts_and_unparseable_replies_are_counted():
    a_first = ["A", "B", None, "tie", None]
    b_first = ["B", "B", "A", "tie", None]
    assert debiased_scores(a_first, b_first) == [1.0, 0.5, 0.0, 0.5, None]
    report = pairwise_report(a_first, b_first)
    assert report["unparseable"] == 3 and report["unparseable_rate"] == 0.3
    assert report["prompts_without_verdict"] == 1 and report["n"] == 4 and report["n_prompts"] == 5
    assert report["win_rate"] == pytest.approx(2.0 / 4)
    assert (report["wins"], report["ties"], report["losses"]) == (1, 2, 1)
    # Verdicts picking a position: A, B, B, B, A -> 2 of 5 first; pairs with both parsed: 3, of
    # which the first (A then B: model A twice) and the tie are consistent.
    assert report["first_position_rate"] == pytest.approx(2 / 5)
    assert report["consistency"] == pytest.approx(2 / 3)
    assert [preference_of(s) for s in debiased_scores(a_first, b_first)] == ["A", "tie", "B", "tie", None]


def test_agreement_and_kappa_on_known_numbers():
    judge = ["A", "A", "B", "B", "A", None]
    labels = ["A", "B", "B", "B", "A", "A"]
    out = agreement(judge, labels)
    assert out["n"] == 5 and out["agreement"] == pytest.approx(4 / 5)
    # p_o = 0.8; judge A 3/5, B 2/5; labels A 2/5, B 3/5; p_e = 0.6*0.4 + 0.4*0.6 = 0.48
    assert out["kappa"] == pytest.approx((0.8 - 0.48) / (1 - 0.48))
    assert reward_preferences([1.0, 0.0, 2.0], [0.5, 0.5, 2.0]) == ["A", "B", "tie"]


def test_no_judge_model_is_refused_clearly(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "judge": {
        "model_a": str(tmp_path), "model_b": str(tmp_path), "prompts": str(prompts)}}))
    assert raylm_main(["eval", str(config)]) == 2
    err = capsys.readouterr().err
    assert "judge.model" in err and "no judge model is configured" in err
