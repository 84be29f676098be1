"""Synthetic data from a model: the prompts, parsing, selection and provenance behind `raylm synth`,
and the weighted mix of human and synthetic instruction data that `raylm sft` trains on.

Three kinds of record, each in a format a later stage already reads:

- instructions (self-instruct, Wang et al. 2023): a plain-text prompt shows a few seed tasks and
  asks for the next one (``self_instruct_prompt``); the model's continuation up to its first line
  break is the new instruction (``parse_instruction``), which the same model then answers in its
  chat template. Written as SFT's ``{"prompt", "response"}``;
- preference pairs: several sampled answers per prompt, scored; the best is ``chosen``, the worst
  ``rejected`` (``choose_pair``: a prompt whose answers all score the same gives no pair). Written
  as reward / DPO's ``{"prompt", "chosen", "rejected"}``;
- rephrased pretraining text (WRAP, Maini et al. 2024): each chunk of a document rewritten in a
  given style. Written as the data stage's ``{"id", "text", "source"}`` documents.

Every record carries ``provenance``: the model checkpoint and its fingerprint, the mode, the seed
task / prompt / document ids it came from, the sampling parameters, the MLflow run id and the time.
The readers of SFT, reward and DPO ignore the extra key, so the files are used as they are.

Quality filtering and deduplication are the data stage's own: ``DocumentFilter`` (normalisation,
Gopher / C4 / FineWeb rules, bad words, PII) and MinHash signatures, LSH bucket links and connected
components (``actors/data/minhash_dedup.py``, ``connected_components.py``), run here on the
synthetic texts of one run (``filter_reasons``, ``duplicate_rows``).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from pathlib import Path

import numpy as np

from raylm.data.jsonl import records


class SyntheticDataError(ValueError):
    """Bad synthetic-stage input; the message names the file, the line and the key."""


# ---- reading the inputs -------------------------------------------------------------------------

def _read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    path = Path(path)
    if not path.is_file():
        raise SyntheticDataError(f"{path}: no such file")
    out = []
    with path.open("rb") as f:
        for line_no, record in records(f, path, error=SyntheticDataError):
            if not isinstance(record, dict):
                raise SyntheticDataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            out.append((line_no, record))
    if not out:
        raise SyntheticDataError(f"{path}: no records")
    return out


def _record_id(record: dict, path: Path, line_no: int) -> str:
    value = record.get("id")
    return str(value) if value is not None else f"{path.name}:{line_no}"


def read_seed_tasks(path: str | Path) -> list[dict]:
    """Seed tasks: ``{"instruction"[, "response"][, "id"]}``, or SFT records (``{"prompt",
    "response"}``, ``{"messages": [...]}``: the first user turn is the instruction). -> ``{"id",
    "instruction"}``; a record without an instruction is an error naming file and line."""
    path = Path(path)
    tasks, seen = [], set()
    for line_no, record in _read_jsonl(path):
        where = f"{path}:{line_no}"
        if "instruction" in record:
            text = record["instruction"]
        elif "prompt" in record:
            text = record["prompt"]
        elif isinstance(record.get("messages"), list):
            text = next((m.get("content") for m in record["messages"] if isinstance(m, dict) and m.get("role") == "user"),
                        None)
        else:
            raise SyntheticDataError(f"{where}: key 'instruction' is missing (or give 'prompt' or 'messages')")
        if not isinstance(text, str) or not text.strip():
            raise SyntheticDataError(f"{where}: the seed task's instruction must be a non-empty string")
        task_id = _record_id(record, path, line_no)
        if task_id in seen:
            raise SyntheticDataError(f"{where}: id {task_id!r} is used twice")
        seen.add(task_id)
        tasks.append({"id": task_id, "instruction": " ".join(text.split())})
    return tasks


def read_prompt_records(path: str | Path) -> list[dict]:
    """Prompts to sample answers for: ``{"prompt"[, "id"][, "reference"][, "reward"] ...}`` (RLHF's
    prompt records: a rule reward reads ``reference`` and the record's own ``reward`` spec)."""
    path = Path(path)
    prompts = []
    for line_no, record in _read_jsonl(path):
        if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise SyntheticDataError(f"{path}:{line_no}: key 'prompt' must be a non-empty string")
        prompts.append({**record, "id": _record_id(record, path, line_no)})
    return prompts


def read_documents(path: str | Path) -> list[dict]:
    """Documents to rephrase: JSONL ``{"text"[, "id"]}``, or a text file (one document)."""
    path = Path(path)
    if path.suffix in (".txt", ".md"):
        if not path.is_file():
            raise SyntheticDataError(f"{path}: no such file")
        return [{"id": path.name, "text": path.read_text(encoding="utf-8")}]
    documents = []
    for line_no, record in _read_jsonl(path):
        if not isinstance(record.get("text"), str):
            raise SyntheticDataError(f"{path}:{line_no}: key 'text' must be a string")
        if record["text"].strip():
            documents.append({"id": _record_id(record, path, line_no), "text": record["text"]})
    return documents


# ---- prompts and parsing ------------------------------------------------------------------------

SELF_INSTRUCT_HEADER = "Come up with a new task, different from the ones below.\n\n"


def self_instruct_prompt(examples: list[str]) -> str:
    """The plain-text prompt of self-instruct: numbered seed tasks, then the next number, left for the
    model to continue (a base model continues it as well as a chat model)."""
    lines = [f"Task {i}: {text}" for i, text in enumerate(examples, 1)]
    return SELF_INSTRUCT_HEADER + "\n".join(lines) + f"\nTask {len(examples) + 1}:"


def sample_seed_sets(tasks: list[dict], n_prompts: int, per_prompt: int, seed: int) -> list[list[dict]]:
    """``n_prompts`` sets of ``per_prompt`` distinct seed tasks each, drawn with ``seed``."""
    rng = random.Random(seed)
    k = min(per_prompt, len(tasks))
    return [rng.sample(tasks, k) for _ in range(n_prompts)]


_NEXT_TASK = re.compile(r"\bTask \d+:")


def normalise_instruction(text: str) -> str:
    return " ".join(text.lower().split())


def parse_instruction(generated: str, min_words: int, max_words: int, seeds: set[str] = frozenset()) -> tuple[str, str]:
    """A continuation of ``self_instruct_prompt`` -> (instruction, "") or ("", why it is refused):
    ``empty``, ``too_short``, ``too_long`` or ``copies_seed`` (the same text as a seed task,
    compared lower-cased with whitespace collapsed; ``seeds`` holds them so)."""
    text = generated.split("\n", 1)[0]
    text = _NEXT_TASK.split(text, 1)[0]
    text = " ".join(text.split()).strip(" \"'")
    if not text:
        return "", "empty"
    words = len(text.split())
    if words < min_words:
        return "", "too_short"
    if words > max_words:
        return "", "too_long"
    if normalise_instruction(text) in seeds:
        return "", "copies_seed"
    return text, ""


REPHRASE_PROMPT = "Rephrase the following text {style}. Keep every fact.\n\n{text}"


def rephrase_prompt(text: str, style: str) -> str:
    return REPHRASE_PROMPT.format(style=style, text=text)


def content_seed(seed: int, text: str) -> int:
    """A sampling seed from the run's seed and a prompt's text: the same text is sampled the same way
    wherever it occurs (identical inputs give identical outputs, which the dedup then removes)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=4).digest(), "little") >> 1


def word_chunks(text: str, max_words: int) -> list[str]:
    """A document in pieces of at most ``max_words`` words, cut between paragraphs where they allow
    (a paragraph longer than ``max_words`` is cut between words); every word is in one piece."""
    chunks, current, size = [], [], 0
    for paragraph in re.split(r"\n\s*\n", text):
        words = paragraph.split()
        while words:
            if size and size + len(words) > max_words:
                chunks.append("\n\n".join(current))
                current, size = [], 0
            take = words[:max_words - size] if size + len(words) > max_words else words
            current.append(" ".join(take))
            size += len(take)
            words = words[len(take):]
    if current:
        chunks.append("\n\n".join(current))
    return chunks


# ---- selection ----------------------------------------------------------------------------------

def choose_pair(samples: list[str], scores: list[float], tolerance: float = 1e-9) -> tuple[int, int] | None:
    """(index of the best sample, index of the worst), or None when they tie: every sample scores
    the same within ``tolerance`` (no preference to learn). The first of equally best and the last
    of equally worst are taken. (Equal or near-equal texts: ``similar_answers``.)"""
    if len(samples) < 2:
        return None
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], -i))
    if scores[best] - scores[worst] <= tolerance:
        return None
    return best, worst


def similar_answers(a: str, b: str, dedup, max_jaccard: float) -> str:
    """Why a chosen / rejected pair teaches nothing: "identical" (the same text, whitespace collapsed),
    "near_identical" (the estimated Jaccard similarity of their word n-gram shingles, the data
    stage's MinHash with ``dedup``'s settings, is at least ``max_jaccard``), else ""."""
    from raylm.actors.data.minhash_dedup import estimated_jaccard, minhash_signature

    if " ".join(a.split()) == " ".join(b.split()):
        return "identical"
    if estimated_jaccard(minhash_signature(a, dedup), minhash_signature(b, dedup)) >= max_jaccard:
        return "near_identical"
    return ""


def answer_pairs(group_sizes: list[int]) -> list[tuple[int, int, int]]:
    """(group, i, j) for every pair i < j of answers within each group: the pairs a judge compares."""
    return [(k, i, j) for k, n in enumerate(group_sizes) for i in range(n) for j in range(i + 1, n)]


def judged_scores(group_sizes: list[int], verdicts: list) -> list[list[float]]:
    """Per answer, its mean debiased score over its pairs (``raylm.eval.judge.debiased_scores``: 1 win,
    0.5 tie, 0 loss, both orders averaged). ``verdicts``: two per pair of ``answer_pairs`` (i shown
    first, then j first). A pair with no parseable verdict counts for neither answer; an answer with
    no counted pair scores 0.5."""
    from raylm.eval.judge import debiased_scores

    pairs = answer_pairs(group_sizes)
    if len(verdicts) != 2 * len(pairs):
        raise ValueError(f"judged_scores: {len(verdicts)} verdicts for {len(pairs)} pairs (two each)")
    totals = [[[0.0, 0] for _ in range(n)] for n in group_sizes]
    for (k, i, j), score in zip(pairs, debiased_scores(verdicts[0::2], verdicts[1::2])):
        if score is None:
            continue
        for answer, value in ((i, score), (j, 1.0 - score)):
            totals[k][answer][0] += value
            totals[k][answer][1] += 1
    return [[total / n if n else 0.5 for total, n in answers] for answers in totals]


def filter_reasons(texts: list[str], filters, quality: bool = True) -> list[str]:
    """The data stage's filters (``DocumentFilter``) on each text: "" kept, else the reason (e.g.
    ``gopher_repetition:duplicate_lines_ratio``), as the data stage counts them. ``quality=False``:
    as the data stage treats a curated input: no quality rules or classifier; normalisation and
    bad words still apply."""
    from raylm.actors.data.quality_filters import DocumentFilter

    document_filter = DocumentFilter(filters)
    return [document_filter.filter_one(text, quality)[1] for text in texts]


def redact(text: str, filters) -> str:
    """PII redaction as the data stage applies it to what it keeps (when ``filters.pii`` is enabled)."""
    from raylm.actors.data.text_cleanup import redact_pii

    return redact_pii(text, filters.pii)[0] if filters.pii.enabled else text


def duplicate_rows(texts: list[str], dedup, work_dir: str | Path) -> tuple[list[int], dict]:
    """The rows of ``texts`` that are exact or near duplicates of an earlier row, with the data
    stage's counts: MinHash signatures (``MinHashSignatures``), LSH bucket links (``bucket_edges``,
    one call per bucket shard, from a parquet file as in the data stage) and their connected
    components (``components_in_process``); each cluster keeps its first row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raylm.actors.data.connected_components import components_in_process
    from raylm.actors.data.minhash_dedup import MinHashSignatures, bucket_edges

    if not texts or not (dedup.exact or dedup.near):
        return [], {"exact_duplicates_removed": 0, "near_duplicates_removed": 0}
    table = pa.table({"key": pa.array(range(len(texts)), pa.int64()), "text": pa.array(texts, pa.string()),
                      "reason": pa.array([""] * len(texts), pa.string())})
    table = MinHashSignatures(dedup)(table)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / "signatures.parquet"
    pq.write_table(table, path)
    links = [bucket_edges([str(path)], shard, dedup) for shard in range(dedup.bucket_shards)]
    removed, stats = components_in_process(links, dedup.bucket_shards)
    path.unlink()
    return sorted(int(k) for k in removed), {key: stats[key] for key in ("exact_duplicates_removed",
                                                                        "near_duplicates_removed", "clusters")}


# ---- provenance ---------------------------------------------------------------------------------

def checkpoint_fingerprint(folder: str | Path) -> str:
    """A short hash of a checkpoint folder: config.json and each weight file's safetensors header
    (names, shapes, dtypes) and size; cheap for any model size, changes with architecture and files."""
    folder = Path(folder)
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for weights in sorted(folder.glob("*.safetensors")):
        with weights.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(header_len, 100 << 20)))
        digest.update(str(weights.stat().st_size).encode())
    return digest.hexdigest()[:16]


def provenance(mode: str, checkpoint: str | Path, fingerprint: str, sampling: dict, run_id: str | None,
               created: str, **sources) -> dict:
    """The ``provenance`` field of one synthetic record: what made it and from what."""
    return {"synthetic": True, "mode": mode, "model": str(checkpoint), "model_fingerprint": fingerprint,
            "sampling": sampling, "run_id": run_id, "created": created, **sources}


# ---- writing ------------------------------------------------------------------------------------

def split_records(rows: list[dict], validation_fraction: float, seed: int) -> dict[str, list[dict]]:
    """Train and validation sets (at least one record each), shuffled with ``seed``."""
    if len(rows) < 2:
        raise SyntheticDataError(f"{len(rows)} record(s) left after filtering: a train and a validation "
                                 "file need at least 2 (generate more, or relax the filters)")
    order = np.random.default_rng(seed).permutation(len(rows))
    n_val = min(len(rows) - 1, max(1, int(len(rows) * validation_fraction)))
    return {"train": [rows[i] for i in order[n_val:]], "validation": [rows[i] for i in order[:n_val]]}


# ---- mixing human and synthetic instruction data ------------------------------------------------

def mix_counts(sizes: list[int], weights: list[float], total: int) -> list[int]:
    """How many records each source gives a mix of ``total``: proportional to its weight (largest
    remainders round), whatever its own size (a small source is repeated, a large one sampled)."""
    weight_sum = sum(weights)
    if weight_sum <= 0:
        raise SyntheticDataError("mix: the weights sum to 0")
    exact = [total * w / weight_sum for w in weights]
    counts = [math.floor(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[:total - sum(counts)]:
        counts[i] += 1
    for size, count, weight in zip(sizes, counts, weights):
        if count and not size:
            raise SyntheticDataError("mix: a source with weight > 0 holds no records")
    return counts


def mix_records(sources: list[dict], total: int | None, seed: int) -> tuple[list[dict], dict[str, int]]:
    """``sources``: ``{"name", "path", "weight"}`` JSONL files of SFT records. -> (the mixed records,
    shuffled, each with ``"mix_source": name``; records per source). ``total`` None: as many as the
    sources hold together. Each record is checked as SFT reads it (a bad line names file and line)."""
    from raylm.data.sft import SFTDataError, conversation_of

    rng = np.random.default_rng(seed)
    loaded = []
    for source in sources:
        rows = []
        try:
            for line_no, record in _read_jsonl(source["path"]):
                conversation_of(record, f"{source['path']}:{line_no}")
                rows.append(record)
        except SFTDataError as e:
            raise SyntheticDataError(str(e)) from None
        loaded.append(rows)
    sizes = [len(r) for r in loaded]
    total = sum(sizes) if total is None else total
    counts = mix_counts(sizes, [s["weight"] for s in sources], total)
    mixed = []
    for source, rows, count in zip(sources, loaded, counts):
        whole, rest = divmod(count, len(rows)) if rows else (0, 0)
        picks = [i for _ in range(whole) for i in range(len(rows))]
        picks += sorted(rng.choice(len(rows), rest, replace=False).tolist()) if rest else []
        mixed += [{**rows[i], "mix_source": source["name"]} for i in picks]
    order = rng.permutation(len(mixed))
    return [mixed[i] for i in order], {s["name"]: c for s, c in zip(sources, counts)}
