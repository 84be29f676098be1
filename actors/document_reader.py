"""Reading raw documents: JSONL (plain, .gz, .zst), text files and parquet, local or on any filesystem
pyarrow opens (s3://, gs://, hdfs://).

Each input file is one Ray Data task that yields batches of documents, so a terabyte of files streams
through bounded memory. Every record gets a ``key``: ``file_index << 40 | record_index``, unique and in
input order, which is what "keep the first copy" means everywhere downstream. Bad records are not
raised: they come out with ``reason = "quarantine:<why>"`` and their raw content, to be written to the
quarantine file, while every valid record of the same file goes on.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

RECORD_BITS = 40  # up to 2**40 records per file, 2**23 files
QUARANTINE_EXCERPT = 10_000  # chars of a bad record kept in the quarantine file
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def detect_format(path: str) -> str:
    name = path.lower()
    for codec in (".gz", ".zst", ".zstd", ".bz2", ".lz4"):
        name = name.removesuffix(codec)
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    raise ValueError(f"{path}: cannot tell the format from the name; set `format:` (jsonl, text, parquet)")


def expand_paths(pattern: str) -> list[str]:
    """A file, a directory (every file under it) or a glob -> sorted file paths (URIs stay URIs)."""
    if "://" in pattern:
        fs, root = pafs.FileSystem.from_uri(pattern)
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
            scheme = pattern.split("://", 1)[0]
            return sorted(f"{scheme}://{i.path}" for i in infos if i.type == pafs.FileType.File)
        return [pattern]
    path = Path(pattern)
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if path.is_file():
        return [str(path)]
    return sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())


def _open(path: str):
    if "://" in path:
        fs, inner = pafs.FileSystem.from_uri(path)
    else:
        fs, inner = pafs.LocalFileSystem(), str(Path(path).resolve())
    return fs.open_input_stream(inner, compression="detect")  # .gz / .zst / .bz2 / .lz4 by extension


def _record(key, source, file, line, text="", doc_id="", url="", reason="", raw="", size=0):
    return {"key": key, "id": doc_id, "source": source, "url": url, "text": text, "reason": reason,
            "file": file, "line": line, "raw": raw, "bytes": size or len(raw) or len(text)}


def _jsonl_records(path: str, file_index: int, source: str, max_chars: int) -> Iterator[dict]:
    base = file_index << RECORD_BITS
    with _open(path) as stream:
        for n, raw in enumerate(_lines(stream), start=1):
            key = base + n
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield _record(key, source, path, n, reason="quarantine:invalid_utf8",
                              raw=raw[:QUARANTINE_EXCERPT].decode("utf-8", "replace") + f" [{e.reason} at byte {e.start}]")
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield _record(key, source, path, n, reason="quarantine:malformed_json", raw=f"{e.msg}: {line[:QUARANTINE_EXCERPT]}")
                continue
            if not isinstance(obj, dict):
                yield _record(key, source, path, n, reason="quarantine:not_an_object", raw=line[:QUARANTINE_EXCERPT])
                continue
            text = obj.get("text")
            reason = _text_problem(text, max_chars)
            if reason:
                yield _record(key, source, path, n, reason=f"quarantine:{reason}", raw=line[:QUARANTINE_EXCERPT])
                continue
            yield _record(key, str(obj.get("source") or source), path, n, text=text,
                          doc_id=str(obj.get("id", "")), url=str(obj.get("url") or ""), size=len(raw))


def _lines(stream) -> Iterator[bytes]:
    """Lines of a binary stream, read in 1 MiB chunks (no whole-file read)."""
    rest = b""
    while chunk := stream.read(1 << 20):
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        yield from parts
    if rest:
        yield rest


def _text_problem(text, max_chars: int) -> str:
    if text is None:
        return "missing_text"
    if not isinstance(text, str):
        return "non_string_text"
    if not text.strip():
        return "empty_text"
    if len(text) > max_chars:
        return "huge_document"
    return ""


def _text_records(path: str, file_index: int, source: str, max_chars: int) -> Iterator[dict]:
    key = (file_index << RECORD_BITS) + 1
    with _open(path) as stream:
        data = stream.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        yield _record(key, source, path, 0, reason="quarantine:invalid_utf8",
                      raw=f"[{e.reason} at byte {e.start}] " + data[:QUARANTINE_EXCERPT].decode("utf-8", "replace"))
        return
    reason = _text_problem(text, max_chars)
    if reason:
        yield _record(key, source, path, 0, reason=f"quarantine:{reason}", raw=text[:QUARANTINE_EXCERPT])
    else:
        yield _record(key, source, path, 0, text=text, doc_id=Path(path).name)


def _parquet_records(path: str, file_index: int, source: str, max_chars: int, text_column: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    if "://" in path:
        fs, inner = pafs.FileSystem.from_uri(path)
        parquet = pq.ParquetFile(inner, filesystem=fs)
    else:
        parquet = pq.ParquetFile(path)
    names = set(parquet.schema_arrow.names)
    if text_column not in names:
        raise ValueError(f"{path}: no column {text_column!r}; columns: {sorted(names)}")
    columns = [c for c in (text_column, "id", "source", "url") if c in names]
    n = 0
    for batch in parquet.iter_batches(batch_size=1024, columns=columns):
        rows = batch.to_pylist()
        for row in rows:
            n += 1
            key = (file_index << RECORD_BITS) + n
            text = row.get(text_column)
            reason = _text_problem(text, max_chars)
            if reason:
                yield _record(key, source, path, n, reason=f"quarantine:{reason}", raw=repr(row)[:QUARANTINE_EXCERPT])
            else:
                yield _record(key, str(row.get("source") or source), path, n, text=text,
                              doc_id=str(row.get("id") or ""), url=str(row.get("url") or ""))


def read_file_records(path: str, file_index: int, source: str, fmt: str, max_chars: int,
                      text_column: str = "text") -> Iterator[dict]:
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "jsonl":
        yield from _jsonl_records(path, file_index, source, max_chars)
    elif fmt == "text":
        yield from _text_records(path, file_index, source, max_chars)
    elif fmt == "parquet":
        yield from _parquet_records(path, file_index, source, max_chars, text_column)
    else:
        raise ValueError(f"{path}: unknown format {fmt!r}")


def read_files(batch: dict, max_chars: int, batch_rows: int = 1024) -> Iterator[pa.Table]:
    """Ray Data ``map_batches`` function: a batch of file descriptions -> batches of documents."""
    rows: list[dict] = []
    for path, index, source, fmt, text_column in zip(batch["path"], batch["file_index"], batch["source"],
                                                     batch["format"], batch["text_column"]):
        for record in read_file_records(str(path), int(index), str(source), str(fmt), max_chars, str(text_column)):
            rows.append(record)
            if len(rows) == batch_rows:
                yield pa.Table.from_pylist(rows, schema=DOCUMENT_SCHEMA)
                rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=DOCUMENT_SCHEMA)


DOCUMENT_SCHEMA = pa.schema([
    ("key", pa.int64()), ("id", pa.string()), ("source", pa.string()), ("url", pa.string()),
    ("text", pa.string()), ("reason", pa.string()), ("file", pa.string()), ("line", pa.int64()),
    ("raw", pa.string()), ("bytes", pa.int64()),
])
