"""The document reader: formats, compression, paths, and bad input quarantined without losing valid records."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.actors.document_reader import DOCUMENT_SCHEMA, RECORD_BITS, expand_paths, read_file_records, read_files

pytestmark = pytest.mark.timeout(120)

GOOD = [{"text": f"Document number {i} says something.", "id": f"d{i}", "url": f"http://x/{i}"} for i in range(5)]


def write_jsonl(path, lines: list[bytes], compression=None):
    data = b"\n".join(lines) + b"\n"
    if compression is None:
        path.write_bytes(data)
    else:
        with pa.CompressedOutputStream(str(path), compression) as out:
            out.write(data)
    return path


def good_lines():
    return [json.dumps(d).encode() for d in GOOD]


@pytest.mark.parametrize("name,compression", [("a.jsonl", None), ("a.jsonl.gz", "gzip"), ("a.jsonl.zst", "zstd")])
def test_jsonl_plain_and_compressed(tmp_path, name, compression):
    path = write_jsonl(tmp_path / name, good_lines(), compression)
    rows = list(read_file_records(str(path), 3, "web", "auto", 1000))
    assert [r["text"] for r in rows] == [d["text"] for d in GOOD]
    assert [r["id"] for r in rows] == [d["id"] for d in GOOD] and rows[0]["url"] == "http://x/0"
    assert [r["key"] for r in rows] == [(3 << RECORD_BITS) + n for n in range(1, 6)]  # input order
    assert all(r["reason"] == "" and r["source"] == "web" for r in rows)


def test_bad_records_are_quarantined_and_nothing_valid_is_lost(tmp_path):
    good = good_lines()
    lines = [
        good[0],
        b'{"text": "unterminated',  # malformed JSON
        good[1],
        b'{"text": "caf\xe9 latin-1"}',  # invalid UTF-8
        b'{"id": "no-text"}',  # missing text
        b'{"text": "   "}',  # empty text
        b'{"text": 42}',  # non-string text
        b'["a", "list"]',  # not an object
        json.dumps({"text": "x" * 101}).encode(),  # huge (limit 100 below)
        good[2],
        b"",  # blank lines are skipped, not quarantined
        good[3],
        good[4],
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    rows = list(read_file_records(str(path), 1, "s", "jsonl", max_chars=100))
    kept = [r for r in rows if not r["reason"]]
    bad = {r["line"]: r["reason"] for r in rows if r["reason"]}
    assert [r["text"] for r in kept] == [d["text"] for d in GOOD]
    assert bad == {2: "quarantine:malformed_json", 4: "quarantine:invalid_utf8", 5: "quarantine:missing_text",
                   6: "quarantine:empty_text", 7: "quarantine:non_string_text", 8: "quarantine:not_an_object",
                   9: "quarantine:huge_document"}
    assert "unterminated" in next(r["raw"] for r in rows if r["line"] == 2)
    assert "caf" in next(r["raw"] for r in rows if r["line"] == 4)


def test_text_parquet_dirs_and_globs(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "one.txt").write_text("First file.\nTwo lines.")
    (tmp_path / "docs" / "two.md").write_bytes(b"\xff\xfe broken")
    (tmp_path / "docs" / ".hidden").write_text("skipped")
    pq.write_table(pa.table({"content": ["p one", None, "p three"], "source": ["a", "b", None]}), tmp_path / "t.parquet")
    assert expand_paths(str(tmp_path / "docs")) == [str(tmp_path / "docs" / "one.txt"), str(tmp_path / "docs" / "two.md")]
    assert expand_paths(str(tmp_path / "docs" / "*.txt")) == [str(tmp_path / "docs" / "one.txt")]
    assert expand_paths(str(tmp_path / "nothing*")) == []
    text = list(read_file_records(str(tmp_path / "docs" / "one.txt"), 1, "books", "auto", 1000))
    assert text[0]["text"] == "First file.\nTwo lines." and text[0]["id"] == "one.txt"
    broken = list(read_file_records(str(tmp_path / "docs" / "two.md"), 2, "books", "auto", 1000))
    assert broken[0]["reason"] == "quarantine:invalid_utf8"
    rows = list(read_file_records(str(tmp_path / "t.parquet"), 3, "dflt", "auto", 1000, text_column="content"))
    assert [(r["text"], r["source"], r["reason"]) for r in rows] == [
        ("p one", "a", ""), ("", "dflt", "quarantine:missing_text"), ("p three", "dflt", "")]
    with pytest.raises(ValueError, match="no column 'text'"):
        list(read_file_records(str(tmp_path / "t.parquet"), 3, "dflt", "auto", 1000))
    with pytest.raises(ValueError, match="cannot tell the format"):
        list(read_file_records(str(tmp_path / "docs" / ".hidden"), 4, "x", "auto", 1000))


def test_read_files_batches_have_the_schema(tmp_path):
    paths = [write_jsonl(tmp_path / f"{i}.jsonl", good_lines()) for i in range(2)]
    batch = {"path": [str(p) for p in paths], "file_index": [1, 2], "source": ["x", "y"], "format": ["auto"] * 2,
             "text_column": ["text"] * 2}
    tables = list(read_files(batch, max_chars=1000, batch_rows=4))
    assert all(t.schema == DOCUMENT_SCHEMA for t in tables)
    assert [len(t) for t in tables] == [4, 4, 2]
    table = pa.concat_tables(tables)
    assert table["source"].to_pylist() == ["x"] * 5 + ["y"] * 5
    assert table["key"].to_pylist() == sorted(table["key"].to_pylist())
