"""Reading raw documents: JSONL (plain, .gz, .zst), text files and parquet, local or on any filesystem
pyarrow opens (s3://, gs://, hdfs://).

Each input file is one Ray Data task that yields batches of documents, so a terabyte of files streams
through bounded memory. Every record gets a ``key``: ``file_index << 40 | record_index``, unique and in
input order, which is what "keep the first copy" means everywhere downstream. Bad records are not
raised: they come out with ``reason = "quarantine:<why>"`` and their raw content, to be written to the
quarantine file, while every valid record of the same file goes on.

A file that cannot be read as a whole (corrupt compression, unreadable, binary, not the format its
name says) ends with one row ``reason = "quarantine_file:<why>"`` (record index 0, ``raw`` the error)
instead of an exception, so one bad file never ends a run. The driver then quarantines every record
of that file, those read before the error included: a file is kept whole or not at all.
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
FILE_QUARANTINE = "quarantine_file:"  # the reason prefix of the row that condemns a whole file
SNIFF_BYTES = 8192  # the start of a file that decides "binary"
BINARY_FRACTION = 0.3  # control bytes and invalid UTF-8 beyond this share of the start: not text
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


def _field(value) -> str:
    """An id / source / url field as text: numbers as written (7, not 7.0 for an int), None as ""."""
    if value is None:
        return ""
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool | int | float):
        text = json.dumps(value)
    else:
        text = json.dumps(value, ensure_ascii=False, default=str)
    return _utf8(text)


def _utf8(text: str) -> str:
    """Text Arrow can store: lone surrogates (from JSON "\ud800" escapes) become U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def looks_binary(sample: bytes) -> bool:
    """Compressed, image or executable bytes, not text: many control bytes or invalid UTF-8."""
    if not sample:
        return False
    text = sample.decode("utf-8", "replace")
    bad = sum(1 for c in text if c == "\ufffd" or (c < " " and c not in "\t\n\r\f\b"))
    return bad / len(text) > BINARY_FRACTION


def _jsonl_records(path: str, file_index: int, source: str, max_chars: int) -> Iterator[dict]:
    base = file_index << RECORD_BITS
    # JSON escapes can take 6 bytes per character: a longer line is over max_chars whatever it holds
    max_line_bytes = 6 * max_chars + (64 << 10)
    with _open(path) as stream:
        for n, (raw, whole) in enumerate(_lines(stream, max_line_bytes), start=1):
            key = base + n
            if n == 1:
                if looks_binary(raw[:SNIFF_BYTES]):
                    raise BadFile("binary_file", "the start of the file is not text")
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
            if not whole:
                yield _record(key, source, path, n, reason="quarantine:huge_document",
                              raw=raw[:QUARANTINE_EXCERPT].decode("utf-8", "replace") + " [line truncated]")
                continue
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
            except (json.JSONDecodeError, RecursionError) as e:
                msg = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
                yield _record(key, source, path, n, reason="quarantine:malformed_json", raw=f"{msg}: {line[:QUARANTINE_EXCERPT]}")
                continue
            if not isinstance(obj, dict):
                yield _record(key, source, path, n, reason="quarantine:not_an_object", raw=line[:QUARANTINE_EXCERPT])
                continue
            doc_id = _field(obj.get("id"))
            doc_source = _field(obj.get("source")) or source
            text = obj.get("text")
            reason = _text_problem(text, max_chars)
            if reason:
                yield _record(key, doc_source, path, n, doc_id=doc_id, reason=f"quarantine:{reason}",
                              raw=_utf8(line[:QUARANTINE_EXCERPT]))
                continue
            yield _record(key, doc_source, path, n, text=text, doc_id=doc_id, url=_field(obj.get("url")), size=len(raw))


def _lines(stream, max_bytes: int) -> Iterator[tuple[bytes, bool]]:
    """(line, whole) of a binary stream, read in 1 MiB chunks (no whole-file read). A line longer than
    ``max_bytes`` is not held: its first ``max_bytes`` come with ``whole = False``."""
    parts: list[bytes] = []  # the current line's pieces: joined once, not re-copied per chunk
    held = 0
    overflow = False
    while chunk := stream.read(1 << 20):
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            piece = chunk[start:end]
            if not overflow:
                parts.append(piece)
            line = b"".join(parts)
            yield (line[:max_bytes], False) if overflow or len(line) > max_bytes else (line, True)
            parts, held, overflow = [], 0, False
            start = end + 1
        rest = chunk[start:]
        if rest and not overflow:
            parts.append(rest)
            held += len(rest)
            if held > max_bytes:
                parts, overflow = [b"".join(parts)[:max_bytes]], True
    if parts or overflow:
        line = b"".join(parts)
        yield (line[:max_bytes], False) if overflow or len(line) > max_bytes else (line, True)


class BadFile(Exception):
    """A file that cannot be read as a whole: it is quarantined with ``reason`` and ``detail``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _text_problem(text, max_chars: int) -> str:
    if text is None:
        return "missing_text"
    if not isinstance(text, str):
        return "non_string_text"
    if not text.strip():
        return "empty_text"
    if len(text) > max_chars:
        return "huge_document"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON "\ud800" escape: not Unicode text
        return "invalid_unicode"
    return ""


def _text_records(path: str, file_index: int, source: str, max_chars: int) -> Iterator[dict]:
    key = (file_index << RECORD_BITS) + 1
    with _open(path) as stream:
        data = stream.read(4 * max_chars + 1)
    if looks_binary(data[:SNIFF_BYTES]):
        raise BadFile("binary_file", "the start of the file is not text")
    if len(data) > 4 * max_chars:  # more bytes than max_chars characters can take in UTF-8
        yield _record(key, source, path, 0, reason="quarantine:huge_document",
                      raw=data[:QUARANTINE_EXCERPT].decode("utf-8", "replace"))
        return
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        yield _record(key, source, path, 0, reason="quarantine:invalid_utf8",
                      raw=f"[{e.reason} at byte {e.start}] " + data[:QUARANTINE_EXCERPT].decode("utf-8", "replace"))
        return
    reason = _text_problem(text, max_chars)
    if reason:
        yield _record(key, source, path, 0, doc_id=Path(path).name, reason=f"quarantine:{reason}", raw=text[:QUARANTINE_EXCERPT])
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
            doc_id, doc_source = _field(row.get("id")), _field(row.get("source")) or source
            reason = _text_problem(text, max_chars)
            if reason:
                yield _record(key, doc_source, path, n, doc_id=doc_id, reason=f"quarantine:{reason}",
                              raw=_utf8(repr(row)[:QUARANTINE_EXCERPT]))
            else:
                yield _record(key, doc_source, path, n, text=text, doc_id=doc_id, url=_field(row.get("url")))


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


def file_problem(error: Exception) -> tuple[str, str]:
    """(reason, detail) for an error that ended the reading of a file."""
    if isinstance(error, BadFile):
        return error.reason, error.detail
    detail = f"{type(error).__name__}: {error}"[:2000]
    if isinstance(error, ValueError) and ("cannot tell the format" in str(error) or "unknown format" in str(error)):
        return "unknown_format", detail
    if isinstance(error, ValueError) and "no column" in str(error):
        return "missing_text_column", detail
    if isinstance(error, PermissionError | FileNotFoundError | IsADirectoryError):
        return "unreadable_file", detail
    if isinstance(error, pa.ArrowInvalid) and "parquet" in str(error).lower():
        return "not_parquet", detail
    return "corrupt_file", detail


def file_records(path: str, file_index: int, source: str, fmt: str, max_chars: int,
                 text_column: str = "text") -> Iterator[dict]:
    """``read_file_records``, but an error that stops the file becomes its last row (``FILE_QUARANTINE``)."""
    try:
        yield from read_file_records(path, file_index, source, fmt, max_chars, text_column)
    except Exception as e:  # noqa: BLE001 - any failure of one file is that file's, never the run's
        reason, detail = file_problem(e)
        yield _record(file_index << RECORD_BITS, source, path, 0, reason=FILE_QUARANTINE + reason, raw=_utf8(detail))


def read_files(batch: dict, max_chars: int, batch_rows: int = 1024) -> Iterator[pa.Table]:
    """Ray Data ``map_batches`` function: a batch of file descriptions -> batches of documents."""
    rows: list[dict] = []
    # an input's configured source names all its records; otherwise a record's own, else the default
    configured = batch["source_is_set"] if "source_is_set" in batch else [False] * len(batch["path"])
    for path, index, source, fmt, text_column, forced in zip(batch["path"], batch["file_index"], batch["source"],
                                                             batch["format"], batch["text_column"], configured):
        for record in file_records(str(path), int(index), str(source), str(fmt), max_chars, str(text_column)):
            if forced:
                record["source"] = str(source)
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
