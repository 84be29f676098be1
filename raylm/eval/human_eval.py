"""Human evaluation: side-by-side pairs written for annotators, their choices read back as
preference data (the loop "people compare two responses -> reward model").

Export: ``pairs.jsonl`` holds every pair with which model is on which side (the key; annotators do not
see it); ``annotate.csv`` (``id, prompt, left, right, choice``) and ``annotate.html`` show the pairs
with the sides shuffled per pair (seeded), so a person cannot learn which side is which model.

Import: a filled ``annotate.csv``, or JSONL lines ``{"id": ..., "choice": ...}``. A choice is
``left``/``A``/``1``, ``right``/``B``/``2``, ``tie``, or ``skip`` (an empty cell is not yet
annotated). Ties, skips and unannotated pairs are counted and give no preference pair; a pair whose
two responses are identical or empty cannot be a preference either and is counted. A bad line (an
unknown id, an unknown choice, the same id twice with different choices) names its file and line;
every bad line is listed and nothing is written. Out comes the preference JSONL that
``raylm reward`` and ``raylm dpo`` read: ``{"prompt", "chosen", "rejected"}`` (plus where the pair
came from), and model A's win rate by the people's choices.
"""

from __future__ import annotations

import csv
import html
import random
from pathlib import Path

from raylm.config import ConfigError
from raylm.data.jsonl import records, write_jsonl
from raylm.eval.pairs import pair_completions

CHOICES = {"left": "left", "a": "left", "1": "left", "right": "right", "b": "right", "2": "right",
           "tie": "tie", "both": "tie", "=": "tie", "skip": "skip", "s": "skip"}
MAX_REPORTED = 20


class AnnotationError(ValueError):
    """Bad annotation input; the message names every bad line (file:line: what is wrong)."""


def make_pairs(prompts: list[str], responses_a: list[str], responses_b: list[str], model_a: str, model_b: str,
               seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pairs = []
    for i, (prompt, ra, rb) in enumerate(zip(prompts, responses_a, responses_b, strict=True)):
        a_left = rng.random() < 0.5
        pairs.append({"id": f"pair-{i:05d}", "prompt": prompt,
                      "left": ra if a_left else rb, "right": rb if a_left else ra,
                      "left_model": model_a if a_left else model_b, "right_model": model_b if a_left else model_a,
                      "model_a": model_a, "model_b": model_b})
    return pairs


HTML_HEAD = """<!doctype html>
<html><head><meta charset="utf-8"><title>raylm side-by-side</title>
<style>body{font-family:sans-serif;max-width:1100px;margin:auto}td{vertical-align:top;width:50%;
border:1px solid #ccc;padding:8px;white-space:pre-wrap}th{text-align:left}.p{background:#f4f4f4}</style></head>
<body><h1>Which response is better?</h1>
<p>For each pair, write <b>left</b>, <b>right</b>, <b>tie</b> or <b>skip</b> in the <code>choice</code> column of
<code>annotate.csv</code> (same ids as below).</p>
"""


def write_pairs(pairs: list[dict], out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"pairs": out / "pairs.jsonl", "csv": out / "annotate.csv", "html": out / "annotate.html"}
    write_jsonl(pairs, paths["pairs"])
    with open(paths["csv"], "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "prompt", "left", "right", "choice"])
        for pair in pairs:
            writer.writerow([pair["id"], pair["prompt"], pair["left"], pair["right"], ""])
    parts = [HTML_HEAD]
    for pair in pairs:
        e = html.escape
        parts.append(f'<h3 id="{e(pair["id"])}">{e(pair["id"])}</h3><table><tr><td class="p" colspan="2">{e(pair["prompt"])}'
                     f'</td></tr><tr><th>left</th><th>right</th></tr><tr><td>{e(pair["left"])}</td>'
                     f'<td>{e(pair["right"])}</td></tr></table>\n')
    parts.append("</body></html>\n")
    paths["html"].write_text("".join(parts), encoding="utf-8")
    return paths


def read_pairs(path: str | Path) -> dict[str, dict]:
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: no such file (the pairs.jsonl that raylm eval's human_export wrote)")
    pairs, unreadable, bad = {}, [], []
    for number, record in read_lines(path, unreadable):
        if not isinstance(record, dict):
            bad.append((number, f"{path}:{number}: expected a JSON object, got {type(record).__name__}"))
            continue
        missing = [k for k in ("id", "prompt", "left", "right", "left_model", "right_model") if k not in record]
        if missing:
            bad.append((number, f"{path}:{number}: {', '.join(map(repr, missing))}: key is missing"))
            continue
        pairs[str(record["id"])] = record
    _raise(bad + unreadable)
    return pairs


def read_lines(path: Path, unreadable: list[tuple[int, str]]) -> list[tuple[int, object]]:
    """``(line, record)`` of every readable non-blank line of a JSONL file; each line that is not
    UTF-8 or not JSON goes to ``unreadable`` as ``(line, "file:line: why")`` (``raylm.data.jsonl``)."""
    bad: list[dict] = []
    with open(path, "rb") as f:
        out = list(records(f, path, bad))
    unreadable += [(b["line"], f"{b['file']}:{b['line']}: {b['error']}") for b in bad]
    return out


def read_choices(path: str | Path, pair_ids: set[str]) -> list[tuple[str, str, int]]:
    """``(id, choice, line)`` per annotated line of a filled CSV (header with ``id`` and ``choice``) or a
    JSONL file; ``choice`` normalised to left/right/tie/skip, or "" where the cell is empty."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: no such file")
    rows: list[tuple[int, dict | None, str]] = []  # (line, record, error)
    unreadable: list[tuple[int, str]] = []  # (line, message): not UTF-8 or not JSON
    if path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"id", "choice"} <= set(reader.fieldnames):
                raise AnnotationError(f"{path}:1: the header needs columns 'id' and 'choice' (has {reader.fieldnames})")
            for record in reader:
                rows.append((reader.line_num, record, ""))
    else:
        for number, record in read_lines(path, unreadable):
            if not isinstance(record, dict) or "id" not in record or "choice" not in record:
                rows.append((number, None, "expected an object with 'id' and 'choice'"))
                continue
            rows.append((number, record, ""))
    out, bad, seen = [], list(unreadable), {}
    for number, record, error in rows:
        if error:
            bad.append((number, f"{path}:{number}: {error}"))
            continue
        pid, raw = str(record["id"]).strip(), str(record.get("choice") or "").strip()
        if pid not in pair_ids:
            bad.append((number, f"{path}:{number}: 'id': unknown pair {pid!r} (not in pairs.jsonl)"))
            continue
        choice = CHOICES.get(raw.lower(), None) if raw else ""
        if choice is None:
            bad.append((number, f"{path}:{number}: 'choice': {raw!r} is not one of left, right, tie, skip (or A, B)"))
            continue
        if pid in seen and seen[pid][0] != choice:
            bad.append((number, f"{path}:{number}: 'id': {pid!r} was already annotated {seen[pid][0]!r} on line "
                                f"{seen[pid][1]}"))
            continue
        if pid not in seen:
            seen[pid] = (choice, number)
            out.append((pid, choice, number))
    _raise(bad)
    return out


def _raise(bad: list[tuple[int, str]]) -> None:
    """One error naming every bad line (the first ``MAX_REPORTED``, in line order): ``(line, message)``."""
    bad = [message for _, message in sorted(bad, key=lambda b: b[0])]
    if bad:
        more = f"\n... and {len(bad) - MAX_REPORTED} more bad lines" if len(bad) > MAX_REPORTED else ""
        raise AnnotationError("\n".join(bad[:MAX_REPORTED]) + more)


def to_preferences(pairs: dict[str, dict], choices: list[tuple[str, str, int]], confidence: float = 0.95) -> tuple[list[dict], dict]:
    """The preference records of the decided choices, and the counts (with model A's win rate among
    the pairs annotated left, right or tie; ties count half)."""
    from raylm.eval.judge import wilson

    records = []
    counts = {"pairs": len(pairs), "annotated": 0, "preferences": 0, "ties": 0, "skips": 0, "unannotated": 0,
              "unusable": 0}
    a_score, judged = 0.0, 0
    annotated = {pid for pid, choice, _ in choices if choice}
    counts["unannotated"] = len(pairs) - len(annotated)
    for pid, choice, _ in choices:
        if not choice:
            continue
        counts["annotated"] += 1
        pair = pairs[pid]
        if choice == "skip":
            counts["skips"] += 1
            continue
        judged += 1
        if choice == "tie":
            counts["ties"] += 1
            a_score += 0.5
            continue
        winner, loser = ("left", "right") if choice == "left" else ("right", "left")
        a_score += float(pair[f"{winner}_model"] == pair.get("model_a", pair["left_model"]))
        chosen, rejected = pair[winner], pair[loser]
        if not chosen.strip() or not rejected.strip() or chosen == rejected:
            counts["unusable"] += 1  # an empty or identical response is no preference for a reward model
            continue
        records.append({"prompt": pair["prompt"], "chosen": chosen, "rejected": rejected, "pair_id": pid,
                        "chosen_model": pair[f"{winner}_model"], "rejected_model": pair[f"{loser}_model"],
                        "source": "human"})
    counts["preferences"] = len(records)
    low, high = wilson(a_score, judged, confidence)
    counts.update(win_rate_a=a_score / judged if judged else float("nan"), win_rate_a_low=low, win_rate_a_high=high,
                  n_judged=judged)
    return records, counts


def human_export(cfg, checkpoints: dict[str, str], generation, seed: int, output_path: Path, cache: dict) -> dict:
    records, answers = pair_completions(cfg, "human_export", checkpoints, generation, seed, cache)
    pairs = make_pairs([r[cfg.prompt_field] for r in records], answers["model_a"], answers["model_b"],
                       cfg.model_a, cfg.model_b, seed)
    paths = write_pairs(pairs, output_path / "human_eval")
    return {"n_pairs": len(pairs), **{k: str(v) for k, v in paths.items()}}


def human_import(cfg, output_path: Path) -> dict:
    try:
        pairs = read_pairs(cfg.pairs)
        records, counts = to_preferences(pairs, read_choices(cfg.choices, set(pairs)), cfg.confidence)
    except AnnotationError as e:
        raise ConfigError(f"human_import: {e}") from None
    output = Path(cfg.output) if cfg.output else output_path / "human_preferences.jsonl"
    write_jsonl(records, output)
    return {**counts, "output": str(output)}
