"""Typed stage configurations: YAML file + ``--set a.b=c`` overrides -> a validated pydantic model.

Every section refuses unknown keys, so a typo fails before any Ray work starts. Errors are raised as
``ConfigError`` naming the file and the dotted key; the CLI turns them into exit status 2.
Defaults run on a laptop.
"""

from __future__ import annotations

import copy
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raylm.models.config import PRESETS, TransformerConfig


class ConfigError(Exception):
    """A configuration that cannot run; the message names the file and the key."""


class FromConfigFolder:
    """Marks a config field that names an input (a file, a folder, a glob): a relative path written
    in a config file is relative to that file's folder, so a config runs the same from any current
    directory. Values given with ``--set`` are typed in a shell and stay relative to the current
    directory; defaults too. ``keep`` lists words that are not paths (e.g. ``embedded``)."""

    def __init__(self, keep: tuple[str, ...] = ()):
        self.keep = keep

    def resolve(self, value: Any, base: Path) -> Any:
        if not isinstance(value, str) or not value or value in self.keep or "://" in value:
            return value
        path = os.path.expanduser(value)
        if os.path.isabs(path):
            return path
        return os.path.normpath(base / path)


# An input file or folder named in a config file: relative to the config file's folder.
InputPath = Annotated[str, FromConfigFolder()]
# Where a stage writes, named in a config file: relative to the config file's folder too, so the
# outputs of one stage file are found by the next stage file as written.
OutputDir = Annotated[str, FromConfigFolder()]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrackingConfig(Section):
    uri: str | None = None  # None: sqlite:///<output_dir>/mlflow.db
    experiment: str = "raylm"
    registry: bool = True  # register each stage's model (<experiment>-<stage>) in the Model Registry


class RayConfig(Section):
    address: str | None = None  # None: start (or join, inside a Ray job) a local Ray
    num_cpus: int | None = Field(default=None, ge=1)
    object_store_memory: int | None = Field(default=None, ge=78643200)  # Ray's minimum, 75 MiB
    # Modules that a local Ray's workers import as they start, before any task or actor asks for them
    # (Ray's `preload_python_modules`). None: the stage's own (`torch` for eval's scorer actors); [] for none.
    # A cluster started with `ray start` takes them from RAY_preload_python_modules on each node instead.
    preload_modules: list[str] | None = None


class StageConfig(Section):
    """What every stage has: where it writes, its seed, its tracking and its Ray."""

    output_dir: OutputDir = "out"
    seed: int = 0
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)


def check_one_data_source(data: Section) -> Section:
    """A data section with ``builtin`` and ``train``/``validation`` files names two data sets:
    refuse it rather than train on one and ignore the other (a stage file's ``builtin`` under a
    user's ``--set data.train=...`` was the usual way in)."""
    files = [key for key in ("train", "validation") if getattr(data, key) is not None]
    if data.builtin is not None and files:
        named = " and ".join(f"data.{key}" for key in files)
        raise ValueError(f"builtin: {data.builtin!r} and {named} are both set: train on your files by "
                         f"dropping data.builtin (`--set data.builtin=null`), or on the built-in set by "
                         f"dropping {named}")
    return data


def where_relative(path: str | None, config_path=None) -> str:
    """For a missing input file: where a relative path was looked for. A path written in a config
    file was already made relative to its folder (``resolve_input_paths``); a ``--set`` value is
    relative to the current directory."""
    if path is None or Path(path).is_absolute():
        return ""
    return f" (looked for at {Path(path).resolve()}; paths in a config file are relative to its folder, --set values to the current directory)"


def expand_model_preset(data: Any) -> Any:
    """``model: {preset: small, dim: 640}`` -> the preset's fields with the explicit keys on top."""
    if isinstance(data, dict) and "preset" in data:
        data = dict(data)
        name = data.pop("preset")
        if name not in PRESETS:
            raise ValueError(f"preset: unknown model preset {name!r}; known: {', '.join(PRESETS)}")
        data = {**PRESETS[name], **data}
    return data


class ModelStageConfig(StageConfig):
    """A stage that builds a model from an architecture (not from a checkpoint)."""

    # the architecture: a preset's fields (preset: debug, tiny, small, ...) with explicit keys on top
    model: TransformerConfig = Field(default_factory=lambda: TransformerConfig(**PRESETS["debug"]))

    @field_validator("model", mode="before")
    @classmethod
    def _preset(cls, value):
        return expand_model_preset(value)


def _path_kind(annotation) -> tuple[str, Any] | None:
    """How a field's annotation holds input paths: ("path", marker), ("list"|"dict", inner kind),
    ("model", the Section class), or None."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *extras = typing.get_args(annotation)
        marker = next((e for e in extras if isinstance(e, FromConfigFolder)), None)
        return ("path", marker) if marker is not None else _path_kind(base)
    if origin in (typing.Union, types.UnionType):
        kinds = [k for k in (_path_kind(a) for a in typing.get_args(annotation)) if k is not None]
        return kinds[0] if kinds else None
    if origin in (list, tuple):
        inner = _path_kind(typing.get_args(annotation)[0]) if typing.get_args(annotation) else None
        return ("list", inner) if inner is not None else None
    if origin is dict:
        inner = _path_kind(typing.get_args(annotation)[1])
        return ("dict", inner) if inner is not None else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return ("model", annotation)
    return None


def _resolve_value(value: Any, kind: tuple[str, Any], base: Path) -> Any:
    what, inner = kind
    if what == "path":
        return inner.resolve(value, base)
    if what == "list" and isinstance(value, list):
        return [_resolve_value(v, inner, base) for v in value]
    if what == "dict" and isinstance(value, dict):
        return {k: _resolve_value(v, inner, base) for k, v in value.items()}
    if what == "model" and isinstance(value, dict):
        return resolve_input_paths(value, inner, base)
    return value


def resolve_input_paths(data: dict, cls: type[BaseModel], base: str | Path) -> dict:
    """``data`` (a config file's mapping for ``cls``) with every relative input path made relative
    to ``base`` (the file's folder) instead of the current directory. Keys ``cls`` does not know
    are left for validation to name."""
    base = Path(base)
    out = dict(data)
    for name, field in cls.model_fields.items():
        if name not in out:
            continue
        kind = _path_kind(field.annotation) if not field.metadata else _path_kind(
            Annotated[(field.annotation, *field.metadata)])
        if kind is not None:
            out[name] = _resolve_value(out[name], kind, base)
    hook = getattr(cls, "resolve_nested_input_paths", None)  # sections typed only at run time
    return hook(out, base) if hook is not None else out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], c parsed as a YAML scalar, so 3 is an int and true a bool)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set model.dim=256")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {e}") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def deep_merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``, key by key through nested mappings; any other value (lists included)
    in ``top`` replaces ``base``'s."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def format_validation_error(source: str, error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        loc = [str(p) for p in err["loc"]]
        msg = err["msg"].removeprefix("Value error, ")
        # TransformerConfig.validate() messages start with the field they are about.
        head, sep, rest = msg.partition(": ")
        if sep and head.isidentifier():
            loc, msg = loc + [head], rest
        if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif "input" in err and err["type"] not in ("value_error", "assertion_error"):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"{source}: {'.'.join(loc) or '(top level)'}: {msg}")
    return "\n".join(lines)


def load_config(cls: type[StageConfig], path: str | Path | None, overrides: list[str] = (),
                ignore: tuple[str, ...] = ()) -> StageConfig:
    """Read, override, validate. Raises ConfigError naming the file and the key. Top-level keys in
    ``ignore`` belong to another command (e.g. ``submit``: how `raylm submit` sends the config)."""
    source = str(path) if path is not None else "(defaults)"
    data = read_yaml(path) if path is not None else {}
    for key in ignore:
        data.pop(key, None)
    if path is not None:  # before the overrides, which are typed in a shell: relative to the current directory
        data = resolve_input_paths(data, cls, Path(path).parent)
    overrides = [o for o in overrides if o.split("=", 1)[0].split(".", 1)[0] not in ignore]
    data = apply_overrides(data, list(overrides))
    if overrides:
        source += " (with --set overrides)"
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(source, e)) from None


def resolved_dict(config: BaseModel) -> dict:
    """The config as plain data, every default filled in (what is logged and saved)."""
    return config.model_dump(mode="json")


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
