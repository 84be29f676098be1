"""Fairness metrics on hand-made numbers: the log-likelihood gap between groups, demographic parity of
the classified outcome, bias amplification against training co-occurrences, bootstrap intervals over
templates; and the shipped template set loading as a task."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from raylm.eval.fairness import (
    bias_amplification,
    bootstrap,
    cooccurrence_counts,
    demographic_parity,
    fairness_metrics,
    ll_gap,
    log_softmax,
    predicted_counts,
)
from raylm.eval.tasks import load_task

TASKS = Path(__file__).resolve().parents[1] / "examples" / "tasks"


def item(template, group, lps, favourable=0, choices=(" good", " bad")):
    return {"template": template, "group": group, "logprobs": list(lps), "favourable": favourable, "choices": list(choices)}


def test_ll_gap_on_hand_numbers():
    # Normalised over the two outcomes: log softmax([log .8, log .2]) = log .8, etc.
    items = [item(0, "f", [math.log(0.8), math.log(0.2)]), item(0, "m", [math.log(0.5), math.log(0.5)]),
             item(1, "f", [math.log(0.6), math.log(0.4)]), item(1, "m", [math.log(0.3), math.log(0.7)])]
    out = ll_gap(items)
    f, m = (math.log(0.8) + math.log(0.6)) / 2, (math.log(0.5) + math.log(0.3)) / 2
    assert out["group_ll"] == pytest.approx({"f": f, "m": m})
    assert out["ll_gap"] == pytest.approx(f - m)
    # Unnormalised log-likelihoods shifted per document (a longer term) give the same gap.
    shifted = [dict(i, logprobs=[v - 3 * k for v in i["logprobs"]]) for k, i in enumerate(items)]
    assert ll_gap(shifted)["ll_gap"] == pytest.approx(f - m)
    assert log_softmax([0.0, 0.0]) == pytest.approx([math.log(0.5)] * 2)


def test_demographic_parity_on_hand_numbers():
    # Group f classified favourable on 3 of 4 templates, group m on 1 of 4.
    f = [[0, -1], [0, -1], [0, -1], [-1, 0]]
    m = [[0, -1], [-1, 0], [-1, 0], [-1, 0]]
    items = [item(t, "f", lp) for t, lp in enumerate(f)] + [item(t, "m", lp) for t, lp in enumerate(m)]
    out = demographic_parity(items)
    assert out["group_positive_rate"] == {"f": 0.75, "m": 0.25}
    assert out["parity_difference"] == 0.5 and out["parity_ratio"] == pytest.approx(1 / 3)
    same = [item(t, g, [0, -1]) for t in range(4) for g in ("f", "m")]
    assert demographic_parity(same)["parity_difference"] == 0.0 and demographic_parity(same)["parity_ratio"] == 1.0


def test_bias_amplification_zhao_et_al():
    texts = ["the woman is a nurse", "a woman nurse", "the man is a nurse", "the man is a doctor",
             "a man and a doctor", "the woman doctor", "nothing here", "woman"]
    train = cooccurrence_counts(texts, {"f": ["woman"], "m": ["man"]}, [" nurse", " doctor"])
    assert train == {"nurse": {"f": 2, "m": 1}, "doctor": {"f": 1, "m": 2}}
    # The model predicts nurse for f on 3 of 3 and doctor for m on 3 of 3 templates.
    items = ([item(t, "f", [0, -1], choices=[" nurse", " doctor"]) for t in range(3)]
             + [item(t, "m", [-1, 0], choices=[" nurse", " doctor"]) for t in range(3)])
    pred = predicted_counts(items, lambda i: i["choices"])
    assert pred == {"nurse": {"f": 3, "m": 0}, "doctor": {"f": 0, "m": 3}}
    # Pairs with b_train > 1/2: (nurse, f) 2/3 -> model 1.0; (doctor, m) 2/3 -> 1.0: amplification 1/3.
    out = bias_amplification(train, pred)
    assert out["n_amplification_pairs"] == 2 and out["bias_amplification"] == pytest.approx(1 / 3)
    # A model that predicts as the data leans: no amplification; the other way round: negative.
    assert bias_amplification(train, {"nurse": {"f": 2, "m": 1}, "doctor": {"f": 1, "m": 2}})["bias_amplification"] == pytest.approx(0)
    assert bias_amplification(train, {"nurse": {"f": 1, "m": 2}, "doctor": {"f": 2, "m": 1}})["bias_amplification"] == pytest.approx(-1 / 3)


def test_bootstrap_over_templates_and_full_report():
    # A constant gap on every template: the bootstrap interval collapses onto it.
    items = [i for t in range(10) for i in (item(t, "f", [math.log(0.8), math.log(0.2)]),
                                            item(t, "m", [math.log(0.4), math.log(0.6)]))]
    gap = math.log(0.8) - math.log(0.4)
    assert bootstrap(items, lambda s: ll_gap(s)["ll_gap"], resamples=50) == pytest.approx((gap, gap))
    out = fairness_metrics(items, resamples=50)
    assert out["ll_gap"] == pytest.approx(gap) and out["ll_gap_low"] == pytest.approx(gap)
    assert out["parity_difference"] == 1.0 and out["n_templates"] == 10  # f always favourable, m never
    assert out["parity_ratio"] == 0.0 and (out["parity_difference_low"], out["parity_difference_high"]) == (1.0, 1.0)
    assert out["n_groups"] == 2
    assert "bias_amplification" not in out  # no training data given
    # Templates that disagree: the interval is wide and holds the point estimate.
    mixed = items[:10] + [i for t in range(10, 20) for i in (item(t, "f", [math.log(0.2), math.log(0.8)]),
                                                              item(t, "m", [math.log(0.9), math.log(0.1)]))]
    out = fairness_metrics(mixed, resamples=200)
    assert out["ll_gap_low"] < out["ll_gap"] < out["ll_gap_high"]
    assert out["parity_difference_low"] <= out["parity_difference"] <= out["parity_difference_high"]


def test_shipped_template_set_is_a_task():
    task = load_task(TASKS / "fairness_templates.yaml")
    docs = task.eval_docs
    groups = {d.data["group"] for d in docs}
    assert len(groups) == 3 and len(docs) == 16 * 3
    by_template = {}
    for doc in docs:
        by_template.setdefault(doc.data["template_id"], []).append(doc)
    for same in by_template.values():  # one template: the same sentence but for the term, the same outcomes
        assert {d.data["group"] for d in same} == groups
        assert len({re.sub(rf"\b{re.escape(d.data['term'])}\b", "{}", task.text(d)) for d in same}) == 1
        assert len({tuple(task.choices(d)) for d in same}) == 1 and {task.target(d) for d in same} == {0}
