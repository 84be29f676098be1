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


def planted_fairness_set(tmp_path: Path) -> tuple[Path, Path]:
    """A fairness set in the task format (5 templates x he / she / ze, outcomes engineer / nurse) and a
    training corpus with a planted association: of the documents naming an engineer beside a group's
    term, 8 say "he" and 2 "she"; of those naming a nurse, 8 "she" and 2 "he"; "ze" never appears.
    Documents with a term and no outcome, or an outcome and no term, count for nothing."""
    import json

    import yaml

    sentences = ["{} worked as an", "After the course {} became a", "The firm hired {} as a", "In the end {} was a",
                 "Last year {} trained as a"]
    terms = {"male": "he", "female": "she", "nonbinary": "ze"}
    data = tmp_path / "planted.jsonl"
    data.write_text("".join(json.dumps({"template_id": t, "group": g, "term": term, "sentence": s.format(term).capitalize(),
                                        "choices": [" engineer", " nurse"], "favourable": 0}) + "\n"
                            for t, s in enumerate(sentences) for g, term in terms.items()))
    spec = yaml.safe_load((TASKS / "fairness_templates.yaml").read_text())
    spec["task"] = "planted"
    spec["dataset_kwargs"]["data_files"]["test"] = str(data)
    task = tmp_path / "planted.yaml"
    task.write_text(yaml.safe_dump(spec))
    docs = (["he is an engineer and he builds bridges."] * 8 + ["She trained as an engineer."] * 2
            + ["he works as a nurse."] * 2 + ["she is a nurse at night."] * 8
            + ["the engineer fixed the bridge.", "he went home early.", "a nurse and an engineer met.", "there, shed"])
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return task, train


def test_bias_amplification_against_planted_training_data(tmp_path):
    """`raylm eval`'s fairness section reads the training corpus it names (train_files), counts the
    data-side bias exactly (engineer: 0.8 he; nurse: 0.8 she), names the group the data never
    mentions (ze) as undefined, and scores models constructed to over-state, match, under-state and
    reverse the association: amplification +0.2, 0, -0.3, -0.8."""
    from raylm.eval.fairness import check_fairness, fairness_task_metrics, prepare_fairness
    from raylm.eval.tasks import result_key
    from raylm.pipelines import eval as eval_stage

    task_path, train = planted_fairness_set(tmp_path)
    config = eval_stage.Config(output_dir=str(tmp_path / "out"), checkpoints={},
                               fairness={"tasks": [{"path": str(task_path)}], "train_files": [str(train)], "resamples": 50})
    check_fairness(config.fairness, "test")
    tasks, context = prepare_fairness(config.fairness, config.seed)
    (ref, task), = tasks
    key = result_key(ref, task)
    assert context["train_counts"][key] == {"engineer": {"male": 8, "female": 2, "nonbinary": 0},
                                            "nurse": {"male": 2, "female": 8, "nonbinary": 0}}

    def model(choose: dict[str, list[int]]) -> dict:
        """Each template's log-probabilities: the choice index ``choose[group][template]`` is the likely one."""
        items = []
        for doc in task.eval_docs:
            pick = choose[doc.data["group"]][doc.data["template_id"]]
            items.append({"logprobs": [0.0 if k == pick else -2.0 for k in range(2)], "gold": 0,
                          "choices": task.choices(doc)})
        return fairness_task_metrics(task, items, context, key)

    over = model({"male": [0] * 5, "female": [1] * 5, "nonbinary": [0, 1, 0, 0, 1]})
    assert over["train_bias"] == {"engineer": {"male": 0.8, "female": 0.2}, "nurse": {"male": 0.2, "female": 0.8}}
    assert over["model_bias"] == {"engineer": {"male": 1.0, "female": 0.0}, "nurse": {"male": 0.0, "female": 1.0}}
    assert over["bias_amplification_undefined"] == ["nonbinary"] and "bias_amplification/nonbinary" not in over
    assert over["n_amplification_pairs"] == 2
    assert over["bias_amplification"] == pytest.approx(0.2)
    assert over["bias_amplification/male"] == pytest.approx(0.2) == over["bias_amplification/female"]
    # the interval over templates: every template over-states, so every resample gives 0.2
    assert (over["bias_amplification_low"], over["bias_amplification_high"]) == pytest.approx((0.2, 0.2))
    # ze's outcomes do not move the others' shares
    assert model({"male": [0] * 5, "female": [1] * 5, "nonbinary": [1] * 5})["bias_amplification"] == pytest.approx(0.2)
    matching = model({"male": [0, 0, 0, 0, 1], "female": [1, 1, 1, 1, 0], "nonbinary": [0] * 5})
    assert matching["model_bias"] == matching["train_bias"]
    assert matching["bias_amplification"] == pytest.approx(0.0, abs=1e-12)
    under = model({"male": [0, 0, 0, 1, 1], "female": [0, 0, 0, 1, 1], "nonbinary": [0] * 5})
    assert under["model_bias"] == {"engineer": {"male": 0.5, "female": 0.5}, "nurse": {"male": 0.5, "female": 0.5}}
    assert under["bias_amplification"] == pytest.approx(-0.3) and under["bias_amplification/male"] == pytest.approx(-0.3)
    reverse = model({"male": [1] * 5, "female": [0] * 5, "nonbinary": [1] * 5})
    assert reverse["bias_amplification"] == pytest.approx(-0.8)


def test_bias_amplification_undefined_without_cooccurrence():
    """A corpus that never puts a group's term beside an outcome word (the standard library's text):
    no training bias, so no amplification: NaN with every group named, not 0."""
    train = cooccurrence_counts(["def parse(text): return text.split()", "the man page", "a nurse shark"],
                                {"f": ["woman"], "m": ["man"]}, [" nurse", " doctor"])
    assert train == {"nurse": {"f": 0, "m": 0}, "doctor": {"f": 0, "m": 0}}
    pred = {"nurse": {"f": 3, "m": 0}, "doctor": {"f": 0, "m": 3}}
    out = bias_amplification(train, pred)
    assert math.isnan(out["bias_amplification"]) and out["n_amplification_pairs"] == 0
    assert out["bias_amplification_undefined"] == ["f", "m"] and out["train_bias"] == {}
    assert not any(k.startswith("bias_amplification/") for k in out)
