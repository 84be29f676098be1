"""The configuration reference: `raylm config STAGE` prints the resolved config with a description
per key (and it reads back as the same config), and docs/config.md is current."""

from __future__ import annotations

import pytest
import yaml

from raylm.cli import main
from raylm.config import load_config, resolved_dict
from raylm.config_reference import DOC, key_rows, markdown
from raylm.stages import COMMANDS, stage_module


def test_docs_config_md_is_current():
    assert DOC.exists(), "docs/config.md is missing: python -m raylm.config_reference --write"
    assert DOC.read_text() == markdown(), "docs/config.md is out of date: python -m raylm.config_reference --write"


def test_reference_lists_every_command_and_key():
    text = markdown()
    for command in COMMANDS:
        assert f"## `raylm {command}`" in text
    for key in ("`checkpoint`", "`data.builtin`", "`train.steps`", "`tracking.registry`", "`submit.excludes`",
                "`tasks[].path`", "`stage_files`"):
        assert key in text, key


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "pretrain", "eval", "run"])
def test_printed_config_reads_back_as_the_same_config(tmp_path, capsys, stage):
    path = tmp_path / "stage.yaml"
    path.write_text("seed: 7\n")
    assert main(["config", stage, str(path), "--set", "output_dir=elsewhere"]) == 0
    printed = capsys.readouterr().out
    first = printed.split("\n---\n")[0]  # `run` goes on with each stage's resolved section
    module = stage_module(stage)
    expected = resolved_dict(load_config(module.Config, path, ["output_dir=elsewhere"]))
    assert yaml.safe_load(first) == expected
    # every top-level key the stage shares is described, beside it
    for line in first.splitlines():
        if line.startswith(("output_dir:", "seed:", "tracking:", "ray:")):
            assert "  # " in line, line
    assert "output_dir: elsewhere  # " in first and "seed: 7  # " in first


def test_lifecycle_config_shows_each_stage_resolved(capsys):
    from pathlib import Path

    laptop = Path(__file__).resolve().parents[1] / "examples" / "laptop.yaml"
    assert main(["config", "run", str(laptop)]) == 0
    docs = capsys.readouterr().out.split("\n---\n")
    assert len(docs) == 1 + len(yaml.safe_load(laptop.read_text())["stages"])
    pretrain = yaml.safe_load(docs[2])
    out = laptop.parents[1] / "out" / "laptop"  # the file's output_dir, relative to its folder
    assert pretrain["output_dir"] == str(out / "pretrain") and pretrain["train"]["steps"] == 500
    assert pretrain["data_dir"] == str(out / "data")  # lineage: what the data stage wrote


def test_shared_keys_and_own_sections_are_described():
    from raylm.pipelines import lifecycle, reward, sft, submit

    for cls in (sft.Config, reward.Config, lifecycle.Config, submit.SubmitOptions):
        rows = dict(key_rows(cls))
        own = [k for k in rows if k.split(".")[0] in ("output_dir", "seed", "tracking", "ray", "data", "stages",
                                                      "stage_files", "sections", "command", "working_dir", "excludes")]
        missing = [k for k in own if not rows[k]]
        assert not missing, f"{cls.__qualname__}: keys without a description: {missing}"


def test_invalid_config_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("seeds: 1\n")
    assert main(["config", "sft", str(path)]) == 2
    assert "seeds: unknown key" in capsys.readouterr().err


def test_every_key_of_every_command_is_described():
    """Each key of each command's config (nested sections, list items and mappings included) has a
    one-line description: the comment beside (or above) its field, or its section class's docstring."""
    from raylm.config_reference import config_class

    missing = [f"{command}: {key}" for command in COMMANDS for key, description in key_rows(config_class(command))
               if not description.strip()]
    assert not missing, "keys without a description (comment their fields):\n" + "\n".join(missing)
