"""Bad data inputs are named, not tracebacks: a JSONL line that is not UTF-8 (file and line, or
quarantined under on_bad_line: skip with every valid line kept), and a data section that names both a
built-in set and the user's files (an error at config time, before anything starts)."""

from __future__ import annotations

import json

import pytest

from raylm.cli import main
from raylm.config import ConfigError, load_config
from raylm.data.jsonl import JSONLError, numbered
from raylm.pipelines import dpo, reward, sft
from raylm.data.preferences import PreferenceDataError, read_preferences
from raylm.data.sft import SFTDataError, read_conversations

LATIN1 = "Größe".encode("latin-1")  # b"Gr\xf6\xdfe": not UTF-8


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_numbered_reports_the_line_and_byte(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [b"\xef\xbb\xbf{}", b"{}", b'{"a": "' + LATIN1 + b'"}', b"{}"])
    with path.open("rb") as f:
        with pytest.raises(JSONLError, match=rf"{path}:3: not UTF-8 \(byte 0xf6 at column 10\)"):
            list(numbered(f, path))
    bad = []
    with path.open("rb") as f:
        rows = list(numbered(f, path, bad))
    assert [n for n, _ in rows] == [1, 2, 4] and rows[0][1] == "{}\n"  # the byte-order mark is dropped
    assert bad == [{"file": str(path), "line": 3, "field": "(line)", "error": "not UTF-8 (byte 0xf6 at column 10)"}]


def test_sft_file_that_is_not_utf8_names_file_and_line(tmp_path):
    good = json.dumps({"prompt": "p", "response": "r"}).encode()
    path = write_lines(tmp_path / "train.jsonl", [good, good, b'{"prompt": "' + LATIN1 + b'", "response": "r"}'])
    with pytest.raises(SFTDataError, match=rf"{path}:3: not UTF-8"):
        read_conversations(path)


def test_preferences_not_utf8_error_or_quarantine(tmp_path):
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode()
    bad_line = b'{"prompt": "' + LATIN1 + b'", "chosen": "a", "rejected": "b"}'
    path = write_lines(tmp_path / "pairs.jsonl", [good, bad_line, good, b"not json"])
    with pytest.raises(PreferenceDataError) as err:
        read_preferences(path)
    assert f"{path}:2: not UTF-8" in str(err.value) and f"{path}:4: not valid JSON" in str(err.value)
    pairs, bad = read_preferences(path, "skip")
    assert len(pairs) == 2 and [b["line"] for b in sorted(bad, key=lambda b: b["line"])] == [2, 4]


@pytest.mark.parametrize("module,builtin", [(sft, "stdlib-instructions"), (reward, "stdlib-docstrings"),
                                            (dpo, "stdlib-docstrings")])
def test_builtin_and_a_users_file_is_an_error(tmp_path, module, builtin):
    path = tmp_path / "stage.yaml"
    path.write_text(f"data:\n  builtin: {builtin}\n")
    with pytest.raises(ConfigError) as err:
        load_config(module.Config, path, ["data.train=missing.jsonl"])
    assert f"{path} (with --set overrides): data.builtin:" in str(err.value)
    assert "data.train are both set" in str(err.value) and "--set data.builtin=null" in str(err.value)
    # the way out the message gives works: the user's file is then what is checked
    config = load_config(module.Config, path, ["data.train=missing.jsonl", "data.builtin=null"])
    assert config.data.builtin is None and config.data.train == "missing.jsonl"


def test_cli_refuses_builtin_with_a_users_file_before_any_work(tmp_path, capsys):
    path = tmp_path / "sft.yaml"
    path.write_text(f"output_dir: {tmp_path / 'out'}\ndata:\n  builtin: stdlib-instructions\n")
    assert main(["sft", str(path), "--set", "data.train=missing.jsonl"]) == 2
    assert "data.builtin: 'stdlib-instructions' and data.train are both set" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_missing_relative_file_says_where_it_was_looked_for(tmp_path, monkeypatch):
    """A relative path that is still relative after loading came from --set: it was looked for in
    the current directory, and the hint says so and how config-file paths resolve."""
    from raylm.config import where_relative

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    hint = where_relative("train.jsonl", tmp_path / "configs" / "sft.yaml")
    assert f"looked for at {elsewhere / 'train.jsonl'}" in hint
    assert "paths in a config file are relative to its folder, --set values to the current directory" in hint
    assert where_relative("/abs/train.jsonl", "x.yaml") == ""
