"""The embedded default corpus: real English text that every Python install carries.

Sources, all read from the running interpreter's standard library (nothing is downloaded):
- ``pydoc_topics``: the language reference topics behind ``help("if")`` (``pydoc_data.topics``);
- ``module_docs``: module docstrings;
- ``docstrings``: class and function docstrings;
- ``comments``: runs of consecutive ``#`` comment lines.

Source files are parsed with ``ast``/``tokenize``, never imported, and walked in sorted order, so the
corpus is deterministic for a given Python install. It contains real exact duplicates (methods that
repeat their base class's docstring, modules copied inside the library such as ``lib2to3``'s
tokenizer) and real near duplicates (``_pyio`` vs ``io`` docs, ``_pydecimal`` context methods,
``distutils`` vs ``sysconfig``), which is what the dedup stages are measured on.
"""

from __future__ import annotations

import ast
import functools
import io
import json
import sysconfig
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Left out: the test suite and IDLE (large, mostly fixtures), third-party packages, build files.
SKIPPED_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "turtledemo", "ensurepip"}
MIN_DOC_WORDS = 8  # shorter docstrings ("Return self==value.") are noise for a pretraining corpus
MIN_COMMENT_WORDS = 20


@dataclass(frozen=True)
class StdlibFunction:
    qualified_name: str  # e.g. "json.dumps" or "collections.OrderedDict.move_to_end"
    signature: str  # e.g. "(obj, *, skipkeys=False, ...)"
    docstring: str  # cleaned (inspect.cleandoc)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """(module name, path) of every stdlib source file we read, sorted by module name."""
    root = root or stdlib_dir()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in SKIPPED_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("_sysconfigdata"):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts:
            continue
        files.append((".".join(parts), path))
    return sorted(files)


def _parse(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):  # a few stdlib files are Python-2 fixtures (lib2to3 data)
        return None


def _walk_definitions(module: str, tree: ast.Module) -> Iterator[tuple[str, ast.AST]]:
    """(qualified name, node) of the classes and functions of a module, nested ones included."""
    stack: list[tuple[str, ast.AST]] = [(module, tree)]
    while stack:
        prefix, node = stack.pop(0)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}"
                yield name, child
                stack.append((name, child))


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    return f"({ast.unparse(node.args)}){returns}"


def iter_stdlib_functions(public_only: bool = True) -> Iterator[StdlibFunction]:
    """Every documented stdlib function and method as (qualified_name, signature, docstring), in a
    fixed order. ``public_only`` drops private modules and names starting with ``_`` (dunder
    methods such as ``__init__`` are kept when documented)."""
    for module, path in stdlib_source_files():
        if public_only and any(p.startswith("_") for p in module.split(".")):
            continue
        tree = _parse(path)
        if tree is None:
            continue
        for name, node in _walk_definitions(module, tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            short = name.rsplit(".", 1)[1]
            if public_only and short.startswith("_") and not (short.startswith("__") and short.endswith("__")):
                continue
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield StdlibFunction(name, _signature(node), doc)


def _comment_blocks(source: bytes) -> Iterator[tuple[int, str]]:
    """(first line, text) of each run of consecutive comment lines."""
    lines: list[str] = []
    start = last = 0
    try:
        tokens = list(tokenize.tokenize(io.BytesIO(source).readline))
    except (tokenize.TokenError, SyntaxError, UnicodeDecodeError):
        return
    for tok in tokens:
        if tok.type != tokenize.COMMENT:
            continue
        row = tok.start[0]
        text = tok.string.lstrip("#").strip()
        if text.startswith("!") or text.startswith("-*-"):  # shebangs and coding lines
            continue
        if lines and row != last + 1:
            yield start, "\n".join(lines)
            lines = []
        if not lines:
            start = row
        lines.append(text)
        last = row
    if lines:
        yield start, "\n".join(lines)


def iter_corpus_documents() -> Iterator[dict]:
    """The corpus as JSONL records ``{"id", "source", "text"}`` in a fixed order."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield {"id": f"pydoc:{name}", "source": "pydoc_topics", "text": text}
    for module, path in stdlib_source_files():
        source = path.read_bytes()
        tree = _parse(path)
        if tree is not None:
            doc = ast.get_docstring(tree, clean=True)
            if doc and len(doc.split()) >= MIN_DOC_WORDS:
                yield {"id": f"module:{module}", "source": "module_docs", "text": doc}
            for name, node in _walk_definitions(module, tree):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc.split()) >= MIN_DOC_WORDS:
                    yield {"id": f"doc:{name}:{node.lineno}", "source": "docstrings", "text": doc}
        for line, text in _comment_blocks(source):
            if len(text.split()) >= MIN_COMMENT_WORDS:
                yield {"id": f"comment:{module}:{line}", "source": "comments", "text": text}


def build_embedded_corpus(out_dir: str | Path, max_documents: int | None = None) -> Path:
    """Write the corpus as ``<out_dir>/stdlib.jsonl`` (one document a line) and return that path.
    Rewritten only when missing or different (the content is deterministic)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "stdlib.jsonl"
    lines = _corpus_lines()[:max_documents]
    data = ("\n".join(lines) + "\n").encode()
    if not path.exists() or path.read_bytes() != data:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path


@functools.lru_cache(maxsize=1)
def _corpus_lines() -> tuple[str, ...]:
    """The corpus as JSONL lines, computed once per process (parsing the stdlib takes ~10 s)."""
    return tuple(json.dumps(record, ensure_ascii=False) for record in iter_corpus_documents())
