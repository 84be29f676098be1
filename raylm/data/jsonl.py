"""JSONL files: reading them line by line, with the file and line number of anything that cannot
be read, and writing them whole.

The SFT and preference readers open a file in binary mode and iterate ``records(f, path, ...)``:
each line is decoded on its own, so a line that is not UTF-8 is reported as ``file:line`` (with
the offending byte) instead of an exception from deep inside the text decoder, and under
``on_bad_line: skip`` it is quarantined like any other bad line while every valid line is kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, BinaryIO, Iterator


class JSONLError(ValueError):
    """A line of a JSONL file that cannot be read; the message names the file and the line."""


def decode_error(path: str | Path, line_no: int, error: UnicodeDecodeError) -> str:
    byte = error.object[error.start:error.start + 1].hex()
    return f"{path}:{line_no}: not UTF-8 (byte 0x{byte} at column {error.start + 1})"


def numbered(f: BinaryIO, path: str | Path, bad: list[dict] | None = None,
             error: type[Exception] = JSONLError) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every line of the binary file ``f`` (1-based, blank lines
    included; a UTF-8 byte-order mark on the first line is dropped). A line that is not UTF-8
    raises ``error`` naming the file and line, or, when ``bad`` is a list, is appended to it as
    ``{"file", "line", "field": "(line)", "error"}`` and skipped."""
    for line_no, raw in enumerate(f, 1):
        try:
            text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
        except UnicodeDecodeError as e:
            message = decode_error(path, line_no, e)
            if bad is None:
                raise error(message) from None
            bad.append({"file": str(path), "line": line_no, "field": "(line)",
                        "error": message.split(": ", 1)[1]})
            continue
        yield line_no, text


def records(f: BinaryIO, path: str | Path, bad: list[dict] | None = None,
            error: type[Exception] = JSONLError) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed JSON)`` of every non-blank line of the binary file ``f``. A line that
    is not UTF-8 or not JSON raises ``error`` naming the file and line, or, when ``bad`` is a list,
    is appended to it as ``{"file", "line", "field": "(line)", "error"}`` and skipped."""
    for line_no, text in numbered(f, path, bad, error):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            message = f"not valid JSON ({e.msg})"
            if bad is None:
                raise error(f"{path}:{line_no}: {message}") from None
            bad.append({"file": str(path), "line": line_no, "field": "(line)", "error": message})
            continue
        yield line_no, record


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """``rows`` as one JSON object a line, written whole (a temporary file, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path
