"""Config validation and the CLI's exit codes: every bad config exits 2 naming the file and key,
before any Ray work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from raylm.cli import main
from raylm.config import ConfigError, ModelStageConfig, apply_overrides, load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str, name="stage.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "yaml_text,overrides,expected",
    [
        ("model:\n  preset: debug\n  n_heads: 3\n", [], "model.n_heads: 3 heads do not divide dim 128"),
        ("model:\n  preset: debug\n  dimm: 3\n", [], "model.dimm: unknown key"),
        ("seeds: 3\n", [], "seeds: unknown key"),
        ("model:\n  dim: many\n", [], "model.dim: Input should be a valid integer"),
        ("ray:\n  num_cpus: 0\n", [], "ray.num_cpus: Input should be greater than or equal to 1"),
        ("model:\n  preset: huge\n", [], "model.preset: unknown model preset 'huge'"),
        ("model:\n  preset: moe-debug\n", ["model.top_k=9"], "model.top_k: 9 is not between 1 and n_experts (4)"),
        ("{}\n", ["tracking.experimentt=x"], "tracking.experimentt: unknown key"),
    ],
)
def test_config_errors_name_file_and_key(tmp_path, yaml_text, overrides, expected):
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(ModelStageConfig, path, overrides)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "model:\n  dim: 64\n  n_heads: [4\n")
    with pytest.raises(ConfigError, match=rf"{path}: line \d+, column \d+: not valid YAML"):
        load_config(ModelStageConfig, path)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(ModelStageConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(ModelStageConfig, write(tmp_path, "- a\n- b\n"))


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(ModelStageConfig, write(tmp_path, "model:\n  preset: debug\n"),
                      ["model.dim=256", "model.tie_embeddings=false", "seed=7", "ray.num_cpus=2"])
    assert cfg.model.dim == 256 and cfg.model.tie_embeddings is False and cfg.seed == 7 and cfg.ray.num_cpus == 2
    assert cfg.model.n_layers == 2  # the rest of the preset stays
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["model.dim"])
    with pytest.raises(ConfigError, match="'seed' is a value, not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_defaults_run_on_a_laptop():
    cfg = load_config(ModelStageConfig, None)
    assert cfg.model.dim == 128 and cfg.ray.address is None and cfg.tracking.uri is None


def test_cli_exits_2_on_invalid_config_before_any_work(tmp_path, capsys):
    path = write(tmp_path, "model:\n  preset: debug\n  n_kv_heads: 3\n")
    assert main(["export", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: model.n_kv_heads:" in err
    assert not (tmp_path / "out").exists()
    assert main(["export", str(path), "--set", "model.n_kv_heads=2", "--set", "checkpoint=/no/such/dir"]) == 2
    assert "checkpoint: /no/such/dir does not exist" in capsys.readouterr().err


def test_lifecycle_sections_are_validated_by_their_stage(tmp_path, capsys):
    path = write(tmp_path, "stages: [export]\nsections:\n  export:\n    model:\n      n_heads: 5\n")
    assert main(["run", str(path)]) == 2
    assert "sections.export" in capsys.readouterr().err
    path = write(tmp_path, "stages: [pretrian]\n", "typo.yaml")
    assert main(["run", str(path)]) == 2
    assert "unknown stage 'pretrian'" in capsys.readouterr().err


def test_submit_requires_an_address(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "raylm.cli", "submit", str(write(tmp_path, "{}\n"))],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "--address" in proc.stderr
