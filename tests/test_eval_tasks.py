"""The lm-evaluation-harness-style task reader: prompts and few-shot draws identical to lm_eval's,
and bad task files and data lines refused with the file, line and field named (the same errors
through `raylm eval`, exit status 2, are tested in test_eval_pipeline.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from raylm.eval.tasks import TaskError, load_task

TASKS = Path(__file__).resolve().parents[1] / "examples" / "tasks"
MC_TASK = TASKS / "stdlib_docstring_mc.yaml"

pytestmark = pytest.mark.timeout(300)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def mc_rows(n: int, start: int = 0) -> list[dict]:
    return [{"question": f"Which number is {i}?", "choices": [str(i), str(i + 1), str(i + 2)], "answer": 0}
            for i in range(start, start + n)]


def write_task(folder: Path, name: str = "toy", test_rows=None, train_rows=None, **overrides) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "test.jsonl", mc_rows(6) if test_rows is None else test_rows)
    write_jsonl(folder / "train.jsonl", mc_rows(5, start=100) if train_rows is None else train_rows)
    spec = {
        "task": name, "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"train": str(folder / "train.jsonl"), "test": str(folder / "test.jsonl")}},
        "output_type": "multiple_choice", "test_split": "test", "fewshot_split": "train",
        "doc_to_text": "Q: {{question}}\nA:", "doc_to_choice": "choices", "doc_to_target": "answer",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }
    spec.update(overrides)
    spec = {k: v for k, v in spec.items() if v is not None}
    path = folder / f"{name}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ---- the shipped tasks ------------------------------------------------------------------------
def test_shipped_tasks_load_and_are_held_out():
    files = sorted(TASKS.glob("*.yaml"))
    assert {f.name for f in files} >= {"stdlib_docstring_mc.yaml", "stdlib_funcname_gen.yaml", "stdlib_docs_ppl.yaml"}
    for f in files:
        task = load_task(f)
        assert task.eval_docs, f
    mc = load_task(MC_TASK)
    assert mc.output_type == "multiple_choice" and len(mc.eval_docs) >= 100
    assert all(len(mc.choices(d)) == 4 for d in mc.eval_docs)
    # Held out: no function of the test split is a few-shot (train) answer.
    test_answers = {mc.target_text(d) for d in mc.eval_docs}
    train_answers = {mc.target_text(d) for d in mc.docs("train")}
    assert not test_answers & train_answers
    # Gold positions are spread over the four slots (no position bias to exploit).
    positions = [mc.target(d) for d in mc.eval_docs]
    assert min(positions.count(i) for i in range(4)) >= len(positions) // 8


# ---- prompts and few-shot draws agree with lm-evaluation-harness --------------------------------
@pytest.fixture(scope="module")
def lm_eval_tasks(tmp_path_factory):
    """Three variants of a task, loaded by lm_eval itself (offline, local JSONL)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    root = tmp_path_factory.mktemp("lm_eval_tasks")
    data = TASKS / "data"
    base = {"data_files": {"train": str(data / "docstring_mc_train.jsonl"), "test": str(data / "docstring_mc_test.jsonl")}}
    paths = {
        # few-shot from a separate split
        "shots_train": write_task(root / "a", "shots_train", dataset_kwargs=base,
                                  doc_to_text="Docstring: {{docstring}}\nFunction:",
                                  description="Match the docstring to its function.\n\n"),
        # few-shot drawn from the evaluated split itself: the document must never be its own example
        "shots_same_split": write_task(root / "b", "shots_same_split", dataset_kwargs=base, fewshot_split="test",
                                       doc_to_text="Docstring: {{docstring}}\nFunction:"),
        # the first-n sampler and a target given as the answer text, through a template
        "shots_first_n": write_task(root / "c", "shots_first_n", dataset_kwargs=base,
                                    doc_to_text="{{docstring}} ->", doc_to_target="{{choices[answer]}}",
                                    fewshot_config={"sampler": "first_n"}, target_delimiter=" ",
                                    fewshot_delimiter="\n"),
    }
    manager = TaskManager(include_path=str(root), include_defaults=False)
    loaded = manager.load(list(paths))["tasks"] if hasattr(manager, "load") else manager.load_task_or_group(list(paths))
    return {name: (paths[name], loaded[name]) for name in paths}


@pytest.mark.parametrize("variant", ["shots_train", "shots_same_split", "shots_first_n"])
@pytest.mark.parametrize("k", [0, 1, 3])
def test_prompts_match_lm_eval(lm_eval_tasks, variant, k):
    path, theirs = lm_eval_tasks[variant]
    theirs.set_fewshot_seed(seed=1234)
    their_docs = list(theirs.test_docs())[:25]
    expected = [theirs.fewshot_context(doc, k) for doc in their_docs]
    ours = load_task(path, limit=25)
    assert ours.contexts(k) == expected
    for doc, their_doc in zip(ours.eval_docs, their_docs):
        assert ours.choices(doc) == theirs.doc_to_choice(their_doc)
        gold = theirs.doc_to_target(their_doc)
        gold = gold if isinstance(gold, int) else theirs.doc_to_choice(their_doc).index(gold)
        assert ours.target(doc) == gold


def test_fewshot_draws_are_deterministic_and_exclude_the_document(tmp_path):
    rows = mc_rows(30)
    path = write_task(tmp_path, test_rows=rows, fewshot_split="test")
    task = load_task(path)
    first, again = task.contexts(4), load_task(path).contexts(4)
    assert first == again
    other = load_task(path, fewshot_seed=7).contexts(4)
    assert other != first
    for doc, context in zip(task.eval_docs, first):
        shots = context.split("\n\n")
        assert len(shots) == 5 and shots[-1] == task.text(doc)
        assert task.text(doc) not in shots[:-1]  # never its own example
    assert task.contexts(0) == [task.text(d) for d in task.eval_docs]


def test_include_and_limit(tmp_path):
    base = write_task(tmp_path, "base")
    child = tmp_path / "child.yaml"
    child.write_text(f"include: {base.name}\ntask: child\nnum_fewshot: 2\ndoc_to_text: 'Question: {{{{question}}}}'\n")
    task = load_task(child, limit=3)
    assert task.name == "child" and task.num_fewshot == 2 and len(task.eval_docs) == 3
    assert task.contexts()[0].endswith("Question: Which number is 0?")
    assert task.contexts()[0].count("Question:") == 3


# ---- bad input --------------------------------------------------------------------------------
def bad_task(tmp_path, test_rows, **overrides) -> Path:
    return write_task(tmp_path, test_rows=test_rows, **overrides)


@pytest.mark.parametrize(
    "rows, overrides, expected",
    [
        # a line without the field the prompt reads
        (mc_rows(3) + [{"choices": ["a", "b"], "answer": 0}], {}, r"test\.jsonl:4: field 'question' is missing"),
        # a line without the answer field
        (mc_rows(2) + [{"question": "q", "choices": ["a", "b"]}], {}, r"test\.jsonl:3: field 'answer' is missing"),
        # an answer index past the last choice
        (mc_rows(4) + [{"question": "q", "choices": ["a", "b"], "answer": 2}], {},
         r"test\.jsonl:5: field 'answer': answer index 2 is out of range for 2 choices"),
        (mc_rows(1) + [{"question": "q", "choices": ["a", "b"], "answer": -1}], {},
         r"test\.jsonl:2: field 'answer': answer index -1 is out of range"),
        # an answer given as text that is not one of the choices
        (mc_rows(1) + [{"question": "q", "choices": ["a", "b"], "answer": "c"}], {},
         r"test\.jsonl:2: field 'answer': answer 'c' is not one of the choices"),
        # choices that are not a list of strings
        (mc_rows(2) + [{"question": "q", "choices": "a b", "answer": 0}], {},
         r"test\.jsonl:3: field 'choices': expected a non-empty list of strings"),
        # a line that is not JSON
        (mc_rows(2) + ['{"question": "q", "choices": ["a"'], {}, r"test\.jsonl:3: not valid JSON"),
        # a field a template reads, missing from one line
        (mc_rows(2) + [{"question": "q", "choices": ["a", "b"], "answer": 0}], {"doc_to_text": "{{question}} {{hint}}"},
         r"test\.jsonl:1: field 'hint' is missing \(read by doc_to_text"),
    ],
)
def test_bad_data_lines_are_named(tmp_path, rows, overrides, expected):
    with pytest.raises(TaskError, match=expected):
        load_task(bad_task(tmp_path, rows, **overrides))


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"doc_to_choice": None}, r"doc_to_choice: required for output_type multiple_choice"),
        ({"test_split": "validation"}, r"test_split: split 'validation' has no data_files"),
        ({"output_type": "loglikelihood"}, r"output_type: 'loglikelihood' is not one of"),
        ({"dataset_path": "hellaswag"}, r"dataset_path: raylm eval reads local JSONL data"),
        ({"process_results": "x"}, r"process_results: not supported by raylm eval"),
        ({"metric_list": [{"metric": "bleu"}]}, r"metric_list\[0\]\.metric: 'bleu' is not computed for multiple_choice"),
        ({"fewshot_config": {"sampler": "balanced"}}, r"fewshot_config\.sampler: 'balanced'"),
        ({"doc_to_target": None}, r"doc_to_target: required key is missing"),
    ],
)
def test_bad_task_files_are_named(tmp_path, overrides, expected):
    with pytest.raises(TaskError, match=expected) as err:
        load_task(write_task(tmp_path, **overrides))
    assert "toy.yaml" in str(err.value)


def test_yaml_errors_name_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("task: broken\ndataset_path: json\ndoc_to_text: [unclosed\n")
    with pytest.raises(TaskError, match=r"broken\.yaml:\d+: not valid YAML"):
        load_task(path)
    path.write_text("task: fn\ndoc_to_text: !function utils.doc_to_text\n")
    with pytest.raises(TaskError, match=r"broken\.yaml:2: '!function utils.doc_to_text'.*not supported"):
        load_task(path)
    with pytest.raises(TaskError, match=r"missing\.yaml: task file does not exist"):
        load_task(tmp_path / "missing.yaml")
    data_missing = write_task(tmp_path / "d")
    (tmp_path / "d" / "train.jsonl").unlink()
    with pytest.raises(TaskError, match=r"train\.jsonl: data file does not exist"):
        load_task(data_missing, validate=True).contexts(1)


def test_too_few_fewshot_documents(tmp_path):
    path = write_task(tmp_path, train_rows=mc_rows(2, start=50))
    with pytest.raises(TaskError, match=r"3-shot needs 3 documents in split 'train'; it has 2"):
        load_task(path).contexts(3)
