"""Human evaluation: side-by-side pairs written for annotators (JSONL key, CSV, HTML), their choices
read back as the preference JSONL that `raylm reward` / `raylm dpo` read, ties and skips counted, bad
lines named by file and line."""

from __future__ import annotations

import csv
import json

import pytest

from raylm.data.jsonl import write_jsonl
from raylm.data.preferences import read_preferences
from raylm.eval.human_eval import AnnotationError, make_pairs, read_choices, read_pairs, to_preferences, write_pairs

PROMPTS = [f"prompt {i} <b>&" for i in range(6)]
A = [f"first answer {i}" for i in range(6)]
B = [f"second answer {i}" for i in range(6)]


def export(tmp_path):
    pairs = make_pairs(PROMPTS, A, B, "sft", "base", seed=0)
    return pairs, write_pairs(pairs, tmp_path / "human")


def test_export_shuffles_sides_and_keeps_the_key(tmp_path):
    pairs, paths = export(tmp_path)
    assert {p["left_model"] for p in pairs} == {"sft", "base"}  # both sides used (seeded shuffle)
    for p, a, b in zip(pairs, A, B):
        assert {p["left"], p["right"]} == {a, b}
        assert p[f"{'left' if p['left_model'] == 'sft' else 'right'}"] == a
    key = [json.loads(line) for line in paths["pairs"].read_text().splitlines()]
    assert key == pairs
    with open(paths["csv"], newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == [p["id"] for p in pairs]
    assert all(r["choice"] == "" for r in rows) and "sft" not in paths["csv"].read_text()  # annotators see no names
    page = paths["html"].read_text()
    assert "prompt 0 &lt;b&gt;&amp;" in page and "<b>&" not in page.split("</p>", 1)[1]  # escaped


def fill(paths, choices: dict[int, str]):
    with open(paths["csv"], newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for i, choice in choices.items():
        rows[i]["choice"] = choice
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "prompt", "left", "right", "choice"])
        writer.writeheader()
        writer.writerows(rows)


def test_choices_become_preference_pairs(tmp_path):
    pairs, paths = export(tmp_path)
    fill(paths, {0: "left", 1: "Right", 2: "tie", 3: "skip", 4: "B"})  # 5: left unannotated
    key = read_pairs(paths["pairs"])
    records, counts = to_preferences(key, read_choices(paths["csv"], set(key)))
    assert counts == {**counts, "pairs": 6, "annotated": 5, "preferences": 3, "ties": 1, "skips": 1,
                      "unannotated": 1, "unusable": 0, "n_judged": 4}
    expected = []
    for i, side in ((0, "left"), (1, "right"), (4, "right")):
        other = "right" if side == "left" else "left"
        expected.append((pairs[i][side], pairs[i][other], pairs[i][f"{side}_model"]))
    assert [(r["chosen"], r["rejected"], r["chosen_model"]) for r in records] == expected
    wins = sum(model == "sft" for _, _, model in expected) + 0.5  # the tie counts half
    assert counts["win_rate_a"] == pytest.approx(wins / 4)
    out = write_jsonl(records, tmp_path / "prefs.jsonl")
    read, bad = read_preferences(out)  # what raylm reward / raylm dpo read
    assert not bad and [(p["chosen"], p["rejected"]) for p in read] == [(c, r) for c, r, _ in expected]


def test_jsonl_choices_and_identical_responses(tmp_path):
    pairs = make_pairs(["p0", "p1"], ["same", "x"], ["same", "y"], "a", "b", seed=1)
    write_pairs(pairs, tmp_path)
    key = read_pairs(tmp_path / "pairs.jsonl")
    choices = tmp_path / "choices.jsonl"
    choices.write_text(json.dumps({"id": "pair-00000", "choice": "left"}) + "\n\n"
                       + json.dumps({"id": "pair-00001", "choice": "A"}) + "\n")
    records, counts = to_preferences(key, read_choices(choices, set(key)))
    assert counts["unusable"] == 1 and counts["preferences"] == 1 and records[0]["prompt"] == "p1"


def test_bad_lines_name_file_and_line(tmp_path):
    _, paths = export(tmp_path)
    key = read_pairs(paths["pairs"])
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes("\n".join([
        json.dumps({"id": "pair-00000", "choice": "left"}),
        json.dumps({"id": "pair-99999", "choice": "left"}),
        "{not json",
        json.dumps({"id": "pair-00001", "choice": "maybe"}),
        json.dumps({"id": "pair-00000", "choice": "right"}),
        json.dumps({"choice": "left"}),
    ]).encode() + b'\n{"id": "pair-00002", "choice": "\xff"}\n')
    with pytest.raises(AnnotationError) as e:
        read_choices(bad, set(key))
    message = str(e.value)
    for line, what in ((2, "unknown pair"), (3, "not valid JSON"), (4, "'maybe' is not one of"),
                       (5, "already annotated 'left' on line 1"), (6, "'id' and 'choice'"), (7, "not UTF-8")):
        assert f"{bad}:{line}: " in message and what in message
    assert f"{bad}:1:" not in message
    assert [int(m.removeprefix(f"{bad}:").split(":")[0]) for m in message.splitlines()] == [2, 3, 4, 5, 6, 7]
    header = tmp_path / "header.csv"
    header.write_text("id,verdict\npair-00000,left\n")
    with pytest.raises(AnnotationError, match=f"{header}:1: the header needs columns 'id' and 'choice'"):
        read_choices(header, set(key))
    broken = tmp_path / "pairs.jsonl"
    broken.write_bytes(b"\xef\xbb\xbf[1]\n\n{not json\n\xff\n" + json.dumps({"id": "x", "prompt": "p"}).encode() + b"\n")
    with pytest.raises(AnnotationError) as e:
        read_pairs(broken)
    assert str(e.value).splitlines() == [  # every bad line, in order (the byte-order mark is not one)
        f"{broken}:1: expected a JSON object, got list", f"{broken}:3: not valid JSON (Expecting property name "
        "enclosed in double quotes)", f"{broken}:4: not UTF-8 (byte 0xff at column 1)",
        f"{broken}:5: 'left', 'right', 'left_model', 'right_model': key is missing"]
