"""A user's reward as a Python function, run in a child process with a timeout per item.

The function is named ``"package.module:function"`` (importable from the caller's ``sys.path``) or
``"path/to/file.py:function"`` (``:reward`` when no name is given) and called as
``reward(prompt, completion)`` or, when it takes three parameters, ``reward(prompt, completion,
item)`` with the whole prompt record (its ``"reference"`` and any other fields).

It runs in one long-lived child per ``FunctionReward`` (started with ``raylm.tasks.sandbox``'s
isolation and limits, less the CPU-time limit, which would add up over the child's life), fed one
item at a time over a pipe. An exception (``SystemExit`` included), a result that is not a finite
real number, a timeout or the child dying is a scored failure with its reason, never an error of
the run: a timed-out or dead child is killed and the next item gets a fresh one. A function that
cannot be loaded at all is a ``RewardFunctionError`` when the ``FunctionReward`` is made.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

from raylm.config import ConfigError, FromConfigFolder
from raylm.tasks.common import RewardResult
from raylm.tasks.sandbox import Limits, clean_env, kill_group, limits_code, python_command

STARTUP_TIMEOUT_S = 60.0

# The child: loads the function, then answers one JSON line per JSON line read. Its own stdout is
# kept for the answers; fd 1 is pointed at stderr so that what the function prints cannot mix in.
_WORKER = r'''
import importlib, importlib.util, inspect, json, math, numbers, os, sys
answers = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
os.dup2(2, 1)
spec = json.loads(sys.argv[1])
sys.path[:0] = spec["path"]

def load(ref):
    target, _, name = ref.rpartition(":") if ":" in ref else (ref, None, "reward")
    if target.endswith(".py") or os.sep in target:
        module_spec = importlib.util.spec_from_file_location("raylm_user_reward", target)
        if module_spec is None:
            raise ImportError(f"cannot load {target}")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise AttributeError(f"{target} has no function {name!r}")
    return fn

try:
    fn = load(spec["ref"])
    n_params = len(inspect.signature(fn).parameters)
    if n_params not in (2, 3):
        raise TypeError(f"takes {n_params} parameters; a reward takes (prompt, completion) or (prompt, completion, item)")
except BaseException as e:
    answers.write(json.dumps({"ready": False, "error": f"{type(e).__name__}: {e}"}) + "\n")
    raise SystemExit(0)
answers.write(json.dumps({"ready": True}) + "\n")
for line in sys.stdin:
    request = json.loads(line)
    args = [request["prompt"], request["completion"]] + ([request["item"]] if n_params == 3 else [])
    try:
        value = fn(*args)
    except BaseException as e:
        answer = {"error": f"raised {type(e).__name__}: {e}"[:500]}
    else:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            answer = {"error": f"returned {type(value).__name__} {repr(value)[:60]}, not a number"}
        elif not math.isfinite(float(value)):
            answer = {"error": f"returned {float(value)}, not a finite number"}
        else:
            answer = {"score": float(value)}
    answers.write(json.dumps(answer) + "\n")
'''


class RewardFunctionError(ConfigError):
    """A reward function that cannot be loaded; the message names it and what is wrong."""


def file_of(ref: str) -> tuple[str, str] | None:
    """A file reference ``"path/to/file.py:fn"`` -> (the file's path, ``":fn"`` or ``""``); None for a
    module reference (``"package.module:fn"``)."""
    target, sep, name = ref.rpartition(":") if ":" in ref else (ref, "", "")
    return (target, sep + name) if target.endswith(".py") or os.sep in target else None


class FunctionFile(FromConfigFolder):
    """A reward spec written in a config file (``"file.py:fn"``, ``{function: "file.py:fn", ...}``):
    the function's file is an input path, relative to the config file's folder; a rule name or a
    module's function is not a path."""

    def resolve(self, value: Any, base: Path) -> Any:
        if isinstance(value, dict) and isinstance(value.get("function"), str):
            return {**value, "function": self.resolve(value["function"], base)}
        parts = file_of(value) if isinstance(value, str) else None
        return value if parts is None else super().resolve(parts[0], base) + parts[1]


# A config key holding a reward spec (raylm.tasks.rewards): a function's file resolves like any input path.
RewardSpec = Annotated[str | dict | None, FunctionFile()]


def resolve_ref(ref: str) -> str:
    """A file reference made absolute (the child runs in its own directory); a module one as is."""
    parts = file_of(ref)
    if parts is None:
        return ref
    path = Path(parts[0]).resolve()
    if not path.is_file():
        raise RewardFunctionError(f"reward function {ref!r}: {path} is not a file")
    return f"{path}{parts[1]}"


class FunctionReward:
    def __init__(self, ref: str, timeout_s: float = 5.0, failure_score: float = 0.0, limits: Limits | None = None):
        self.ref = resolve_ref(ref)
        self.timeout_s = timeout_s
        self.failure_score = failure_score
        # No CPU-time limit (it would add up over the child's life); room for numpy or torch.
        self.limits = limits or Limits(timeout_s=timeout_s, cpu_s=None, memory_mb=16384)
        self.restarts = 0
        self._process: subprocess.Popen | None = None
        self._stderr = None
        self._buffer = b""
        self._start()

    # -- the child --------------------------------------------------------------------------------
    def _start(self) -> None:
        self._workdir = tempfile.TemporaryDirectory(prefix="raylm-reward-")
        self._stderr = open(os.path.join(self._workdir.name, "stderr.txt"), "w+b")
        path = [p or os.getcwd() for p in sys.path]  # "" is the caller's working directory
        self._process = subprocess.Popen(
            python_command("-c", limits_code(self.limits) + _WORKER, json.dumps({"ref": self.ref, "path": path}),
                           site=True),
            cwd=self._workdir.name, env=clean_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr, start_new_session=True)
        self._buffer = b""
        line = self._read_line(STARTUP_TIMEOUT_S)
        if line is None:
            reason = self._death_reason()
            self._stop()
            raise RewardFunctionError(f"reward function {self.ref!r}: the child did not start ({reason})")
        ready = json.loads(line)
        if not ready.get("ready"):
            self._stop()
            raise RewardFunctionError(f"reward function {self.ref!r}: {ready['error']}")

    def _read_line(self, timeout_s: float) -> str | None:
        """One answer line, or None on timeout or when the child's stdout closed (then the child is
        waited for: it closes its files before its exit status can be read)."""
        deadline = time.monotonic() + timeout_s
        fd = self._process.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                try:
                    self._process.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    pass
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("utf-8")

    def _death_reason(self) -> str:
        code = self._process.poll()
        self._stderr.flush()
        self._stderr.seek(0)
        lines = [line for line in self._stderr.read().decode("utf-8", "replace").splitlines() if line.strip()]
        last = f": {lines[-1][:300]}" if lines else ""
        return ("still running" if code is None else f"exit status {code}") + last

    def _stop(self) -> None:
        if self._process is not None:
            if self._process.poll() is None:
                kill_group(self._process)
            for stream in (self._process.stdin, self._process.stdout):
                stream.close()
            self._process = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        self._workdir.cleanup()

    def close(self) -> None:
        self._stop()

    def __del__(self):
        try:
            self._stop()
        except Exception:
            pass

    # -- scoring ----------------------------------------------------------------------------------
    def _failure(self, reason: str) -> RewardResult:
        return RewardResult(self.failure_score, ok=False, reason=reason)

    def __call__(self, prompt: str, completion, item: dict | None = None) -> RewardResult:
        if self._process is None:
            self.restarts += 1
            try:
                self._start()
            except RewardFunctionError as e:  # it loaded once: whatever broke since fails this item only
                self._process = None
                return self._failure(f"could not restart the reward process: {e}")
        request = json.dumps({"prompt": prompt, "completion": completion, "item": item or {}}) + "\n"
        try:
            self._process.stdin.write(request.encode("utf-8"))
            self._process.stdin.flush()
        except BrokenPipeError:
            reason = self._death_reason()
            self._stop()
            return self._failure(f"the reward process had died ({reason})")
        line = self._read_line(self.timeout_s)
        if line is None:
            dead = self._process.poll() is not None
            reason = f"the reward process died ({self._death_reason()})" if dead else f"timed out after {self.timeout_s:g} s"
            self._stop()
            return self._failure(reason)
        answer = json.loads(line)
        if "error" in answer:
            return self._failure(answer["error"])
        return RewardResult(answer["score"])
