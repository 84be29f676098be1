"""The document reader: formats, compression, paths, and bad input quarantined without losing valid records."""

from __future__ import annotations

import gzip
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.actors.data.document_reader import (DOCUMENT_SCHEMA, FILE_QUARANTINE, RECORD_BITS, expand_paths, file_records,
                                          read_file_records, read_files)

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
        ("p one", "a", ""), ("", "b", "quarantine:missing_text"), ("p three", "dflt", "")]  # the row's own source
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


def corrupt(data: bytes, at: int) -> bytes:
    """The bytes with a run of garbage in the middle: a truncated download, a bad disk sector."""
    return data[:at] + bytes(range(256)) * 4 + data[at + 1024:]


def many_lines(n=3000):
    return [json.dumps({"id": i, "text": f"Record {i} of a long file, with enough text to compress. " * 3}).encode()
            for i in range(n)]


@pytest.mark.parametrize("name,compression", [("c.jsonl.gz", "gzip"), ("c.jsonl.zst", "zstd")])
def test_corrupt_compressed_file_is_one_named_quarantine_row(tmp_path, name, compression):
    """Corruption mid-file: records before it may be read, then the error; the file ends in one
    FILE_QUARANTINE row (record 0) naming why, and nothing is raised."""
    good = write_jsonl(tmp_path / ("good" + name[1:]), many_lines(), compression)
    path = tmp_path / name
    path.write_bytes(corrupt(good.read_bytes(), len(good.read_bytes()) // 2))
    with pytest.raises(Exception):  # noqa: B017 - the bare reader does raise (pyarrow's error)
        list(read_file_records(str(path), 5, "s", "auto", 10_000))
    rows = list(file_records(str(path), 5, "s", "auto", 10_000))
    last = rows[-1]
    assert last["reason"].startswith(FILE_QUARANTINE) and last["key"] == 5 << RECORD_BITS and last["file"] == str(path)
    assert last["reason"] == FILE_QUARANTINE + "corrupt_file" and last["raw"]
    assert all(not r["reason"].startswith(FILE_QUARANTINE) for r in rows[:-1])
    assert len(rows) - 1 < 3000
    ok = list(file_records(str(good), 6, "s", "auto", 10_000))
    assert len(ok) == 3000 and not any(r["reason"] for r in ok)


def test_whole_file_problems_are_named(tmp_path):
    rng = random.Random(0)
    cases = {
        "notparquet.parquet": (b"this is not a parquet file at all\n" * 10, "not_parquet"),
        "random.jsonl": (rng.randbytes(20_000), "binary_file"),
        "random.txt": (rng.randbytes(20_000), "binary_file"),
        "notes.csv": (b"a,b\n1,2\n", "unknown_format"),
        "empty.jsonl.gz": (b"", None),  # an empty file: no records, no error
        "truncated.jsonl.gz": (gzip.compress(b'{"text": "hello there"}\n' * 100)[:40], "corrupt_file"),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        rows = list(file_records(str(tmp_path / name), 1, "s", "auto", 1000))
        if reason is None:
            assert rows == [] or rows[-1]["reason"].startswith(FILE_QUARANTINE), (name, rows)
            continue
        assert rows[-1]["reason"] == FILE_QUARANTINE + reason, (name, rows[-1]["reason"], rows[-1]["raw"])
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "other.parquet")
    rows = list(file_records(str(tmp_path / "other.parquet"), 1, "s", "auto", 1000))
    assert rows[-1]["reason"] == FILE_QUARANTINE + "missing_text_column" and "body" in rows[-1]["raw"]
    unreadable = tmp_path / "gone.jsonl"
    rows = list(file_records(str(unreadable), 1, "s", "auto", 1000))
    assert rows[-1]["reason"] == FILE_QUARANTINE + "unreadable_file"


def test_held_out_shapes_of_valid_and_bad_records(tmp_path):
    """Numeric ids, NUL and U+2028 in text, a byte-order mark, CRLF endings, a line far over max_chars,
    a lone surrogate escape: each valid record kept as it is, each bad one quarantined with its id."""
    lines = [
        b"\xef\xbb\xbf" + json.dumps({"id": 7, "text": "first, after a BOM"}).encode() + b"\r",
        json.dumps({"id": 0, "text": "zero id\u0000with a NUL and \u2028 a line separator"}).encode() + b"\r",
        json.dumps({"id": 2.5, "source": "wiki", "text": 42}).encode(),
        b'{"id": "s", "text": "lone \\ud800 surrogate"}',
        json.dumps({"id": None, "text": "x" * 5000}).encode(),
        json.dumps({"id": "last", "text": "the end"}).encode(),
    ]
    path = write_jsonl(tmp_path / "shapes.jsonl", lines)
    rows = list(read_file_records(str(path), 1, "s", "auto", max_chars=100))
    kept = [(r["line"], r["id"], r["text"]) for r in rows if not r["reason"]]
    assert kept == [(1, "7", "first, after a BOM"), (2, "0", "zero id\x00with a NUL and \u2028 a line separator"),
                    (6, "last", "the end")]
    bad = {r["line"]: (r["reason"], r["id"], r["source"]) for r in rows if r["reason"]}
    assert bad == {3: ("quarantine:non_string_text", "2.5", "wiki"), 4: ("quarantine:invalid_unicode", "s", "s"),
                   5: ("quarantine:huge_document", "", "s")}
    pa.Table.from_pylist(rows, schema=DOCUMENT_SCHEMA)  # every row is storable (no lone surrogates)
    # a single line of 5 MB with max_chars 100 is not held whole: quarantined from a bounded excerpt
    huge = write_jsonl(tmp_path / "huge.jsonl", [b'{"text": "' + b"y" * 5_000_000 + b'"}', good_lines()[0]])
    rows = list(read_file_records(str(huge), 1, "s", "auto", max_chars=100))
    assert [r["reason"] for r in rows] == ["quarantine:huge_document", ""] and len(rows[0]["raw"]) <= 10_100


def test_configured_source_names_every_record(tmp_path):
    path = write_jsonl(tmp_path / "w.jsonl", [json.dumps({"text": "a b c", "source": "own"}).encode(), b"{bad"])
    batch = {"path": [str(path)] * 2, "file_index": [1, 2], "source": ["web", "w"], "source_is_set": [True, False],
             "format": ["auto"] * 2, "text_column": ["text"] * 2}
    table = pa.concat_tables(list(read_files(batch, max_chars=1000)))
    assert table["source"].to_pylist() == ["web", "web", "own", "w"]
