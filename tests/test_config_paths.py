"""Relative paths in a config file are relative to that file's folder, so a config runs the same from
any current directory; `--set` values are typed in a shell and stay relative to the current
directory, and so do defaults. No Ray work: config loading, `raylm config` and the stages' checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from raylm import cli
from raylm.config import load_config, read_yaml, resolve_input_paths
from raylm.stages import stage_module


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A current directory that is not the config's folder."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_config_files_inputs_resolve_against_its_folder_and_set_values_against_the_cwd(tmp_path, elsewhere):
    config = write(tmp_path / "project" / "configs" / "sft.yaml", {
        "output_dir": "../out/sft", "checkpoint": "../models/start",
        "data": {"train": "data/train.jsonl", "validation": "/abs/validation.jsonl", "tokenizer": "~/tok.json"}})
    sft = load_config(stage_module("sft").Config, config, ["data.validation=mine/validation.jsonl"])
    folder = tmp_path / "project" / "configs"
    assert sft.checkpoint == os.path.normpath(folder / "../models/start")
    assert sft.data.train == str(folder / "data" / "train.jsonl")
    assert sft.output_dir == os.path.normpath(folder / "../out/sft")
    assert sft.data.validation == "mine/validation.jsonl"  # --set: relative to the current directory
    assert sft.data.tokenizer == os.path.expanduser("~/tok.json")
    # defaults are not the file's and stay as they are
    assert load_config(stage_module("sft").Config, write(folder / "bare.yaml", {"seed": 1})).checkpoint == "out/pretrain/hf"


def test_words_and_urls_that_are_not_paths_stay(tmp_path, elsewhere):
    config = write(tmp_path / "c" / "data.yaml", {
        "inputs": [{"path": "embedded"}, {"path": "s3://bucket/*.jsonl"}, {"path": "raw/*.jsonl.gz"}]})
    data = load_config(stage_module("data").Config, config)
    assert [i.path for i in data.inputs] == ["embedded", "s3://bucket/*.jsonl", str(tmp_path / "c" / "raw" / "*.jsonl.gz")]


def test_lifecycle_stage_files_and_sections_resolve_against_their_own_files(tmp_path, elsewhere):
    root = tmp_path / "repo"
    write(root / "stages" / "sft.yaml", {"data": {"train": "sft_train.jsonl", "validation": "sft_val.jsonl"}})
    lifecycle = write(root / "run.yaml", {
        "output_dir": "out/run", "stages": ["sft", "eval"],
        "stage_files": {"sft": "stages/sft.yaml"},
        "sections": {"sft": {"checkpoint": "models/start"}, "eval": {"tasks": [{"path": "tasks/t.yaml"}]}}})
    module = stage_module("run")
    config = load_config(module.Config, lifecycle)
    assert config.stage_files["sft"] == str(root / "stages" / "sft.yaml")
    assert config.output_dir == str(root / "out" / "run")
    _, sft = module.stage_config(config, "sft", lifecycle)
    assert sft.data.train == str(root / "stages" / "sft_train.jsonl")  # the stage file's folder
    assert sft.checkpoint == str(root / "models" / "start")  # the lifecycle file's folder
    assert sft.output_dir == str(root / "out" / "run" / "sft")
    _, evaluation = module.stage_config(config, "eval", lifecycle)
    assert evaluation.tasks[0].path == str(root / "tasks" / "t.yaml")


def test_a_reward_functions_file_resolves_against_the_config_folder_and_set_values_against_the_cwd(tmp_path,
                                                                                                  elsewhere):
    """reward.rule names a function by its file ("file.py:fn", or {function: ...}): the file is an
    input path like any other; a rule name or a module's function stays as written. The function
    then loads and scores from another current directory."""
    from raylm.tasks.rewards import make_scorer

    folder = tmp_path / "proj"
    (folder / "rewards").mkdir(parents=True)
    (folder / "rewards" / "score.py").write_text("def reward(prompt, completion):\n    return len(completion)\n")
    rlhf = stage_module("rlhf").Config

    def rule(value, overrides=()):
        path = write(folder / "rlhf.yaml", {"reward": {"checkpoint": None, "rule": value}})
        return load_config(rlhf, path, list(overrides)).reward.rule

    assert rule("rewards/score.py:reward") == f"{folder / 'rewards' / 'score.py'}:reward"
    assert rule("rewards/score.py") == str(folder / "rewards" / "score.py")  # the function defaults to reward
    assert rule({"function": "rewards/score.py:reward", "timeout_s": 2}) == {
        "function": f"{folder / 'rewards' / 'score.py'}:reward", "timeout_s": 2}
    assert rule("/abs/score.py:fn") == "/abs/score.py:fn"
    for word in ("numeric", "my_rewards.module:fn", {"rule": "regex", "pattern": "a+"}):
        assert rule(word) == word
    assert rule("numeric", ["reward.rule=rewards/mine.py:fn"]) == "rewards/mine.py:fn"  # --set: the cwd
    scorer = make_scorer(rule("rewards/score.py:reward"))
    try:
        assert scorer("a prompt", "four", {}).score == 4.0
    finally:
        scorer.close()
    # synth's rule (preferences mode) is the same kind of spec
    synth = write(folder / "synth.yaml", {"mode": "preferences", "preferences": {"rule": "rewards/score.py"}})
    assert load_config(stage_module("synth").Config, synth).preferences.rule == str(folder / "rewards" / "score.py")


def test_every_shipped_example_resolves_to_files_of_the_repository(monkeypatch, tmp_path):
    """The examples name their inputs relative to their own folders: from any current directory
    each input path that a shipped file names (not an output of another stage) exists."""
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    for path in sorted((repo / "examples").glob("**/*.yaml")):
        if "tasks" in path.relative_to(repo / "examples").parts:
            continue  # lm-evaluation-harness task files, not raylm configs
        stage = "run" if path.parent == repo / "examples" else path.stem.split("_")[0]
        cls = stage_module(stage).Config
        resolved = resolve_input_paths(read_yaml(path), cls, path.parent)
        for value in _strings(resolved):
            if value.startswith(str(repo / "examples")) and "/out/" not in value and "*" not in value:
                assert Path(value).exists(), f"{path.relative_to(repo)} names {value}, which does not exist"


def _strings(data):
    if isinstance(data, dict):
        for v in data.values():
            yield from _strings(v)
    elif isinstance(data, list):
        for v in data:
            yield from _strings(v)
    elif isinstance(data, str):
        yield data


def test_raylm_config_run_from_elsewhere_prints_the_resolved_paths(tmp_path, elsewhere, capsys):
    folder = tmp_path / "proj"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    config = write(folder / "sft.yaml", {"data": {"train": "data/train.jsonl"}})
    assert cli.main(["config", "sft", str(config)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["train"] == str(folder / "data" / "train.jsonl")


def test_a_missing_input_is_named_where_it_was_looked_for(tmp_path, elsewhere, capsys):
    folder = tmp_path / "proj"
    config = write(folder / "pretrain.yaml", {"data_dir": "shards"})
    assert cli.main(["pretrain", str(config)]) == 2
    assert str(folder / "shards") in capsys.readouterr().err
