"""The pairwise sections of `raylm eval` (preference, judge, human_export): their prompts, the checkpoints
they name, whether they speak in chat templates, each model's responses, and the reward-model win rate."""

from __future__ import annotations

from pathlib import Path

from raylm.config import ConfigError
from raylm.data.jsonl import records
from raylm.eval.engines import generate_texts, reward_scores
from raylm.eval.metrics import win_rate


def read_prompts(path, prompt_field: str = "prompt", limit: int | None = None, label_field: str | None = None,
                 key: str = "") -> list[dict]:
    """The prompt lines of a pairwise section's ``prompts`` file, at most ``limit`` (the whole record: the judge reads
    its label field). A line that is not JSON or lacks the prompt field is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}.prompts: {path} does not exist")
    prompts = []
    with open(path, "rb") as f:
        for number, record in records(f, path, error=ConfigError):
            if not isinstance(record, dict) or not isinstance(record.get(prompt_field), str):
                raise ConfigError(f"{path}:{number}: field {prompt_field!r} missing or not text")
            if label_field is not None:
                label = str(record.get(label_field, "")).strip().upper()
                record[label_field] = {"TIE": "tie"}.get(label, label)
                if record[label_field] not in ("A", "B", "tie"):
                    raise ConfigError(f"{path}:{number}: field {label_field!r}: {record.get(label_field)!r} is not A, B or tie")
            prompts.append(record)
    if not prompts:
        raise ConfigError(f"{key}.prompts: {path} holds no prompts")
    return prompts[:limit] if limit else prompts


def pair_folders(section, key: str, checkpoints: dict[str, str]) -> dict[str, str]:
    """The checkpoints a pairwise section (preference, judge, human_export) reads, by its keys: a name from
    ``checkpoints`` or a folder."""
    names = ("model_a", "model_b") + {"judge": ("model",), "preference": ("reward_model",)}.get(key, ())
    return {name: checkpoints.get(getattr(section, name), getattr(section, name)) for name in names}


def pair_chat(section, key: str, checkpoints: dict[str, str], config_path=None) -> bool:
    """A pairwise section's ``chat``, or unset: whether all its checkpoints have a chat template."""
    from raylm.data.chat_template import has_chat_template

    if section.chat is not None:
        return section.chat
    have = {name: has_chat_template(folder) for name, folder in pair_folders(section, key, checkpoints).items()}
    if all(have.values()) or not any(have.values()):
        return all(have.values())
    raise ConfigError(f"{config_path}: {key}.chat: {', '.join(k for k, v in have.items() if v)} have a chat "
                      f"template and {', '.join(k for k, v in have.items() if not v)} not: set chat: true or false")


def pair_completions(section, key: str, checkpoints: dict[str, str], generation, seed: int, cache: dict) -> tuple[list[dict], dict[str, list[str]]]:
    """A pairwise section's prompt records and each model's responses (generated once per checkpoint,
    prompts and settings: the judge and the human export share them)."""
    records = read_prompts(section.prompts, section.prompt_field, section.limit, getattr(section, "label_field", None),
                           key)
    prompts = [r[section.prompt_field] for r in records]
    chat = pair_chat(section, key, checkpoints)
    folders = pair_folders(section, key, checkpoints)
    out = {}
    for name in ("model_a", "model_b"):
        folder = folders[name]
        cache_key = (folder, tuple(prompts), section.max_new_tokens, section.temperature, chat)
        if cache_key not in cache:
            cache[cache_key] = generate_texts(folder, prompts, section.max_new_tokens, [], generation,
                                              seed, section.temperature, chat=chat)
        out[name] = cache[cache_key]
    return records, out


def preference_win_rate(pref, checkpoints: dict[str, str], generation, scorer, seed: int) -> dict:
    prompts = [record[pref.prompt_field] for record in read_prompts(pref.prompts, pref.prompt_field, pref.limit, key="preference")]
    folders = pair_folders(pref, "preference", checkpoints)
    chat = pair_chat(pref, "preference", checkpoints)
    completions = {
        key: generate_texts(folders[key], prompts, pref.max_new_tokens, [], generation, seed, pref.temperature,
                            chat=chat)
        for key in ("model_a", "model_b")
    }
    scores_a, scores_b = reward_scores(pref.reward_model, chat, prompts, completions["model_a"],
                                       completions["model_b"], scorer)
    result = win_rate(scores_a, scores_b, pref.confidence)
    result.update(model_a=pref.model_a, model_b=pref.model_b, confidence=pref.confidence)
    return result
