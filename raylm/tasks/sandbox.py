"""Running untrusted Python (a model's code, a user's reward function) in a child process.

What the child gets: ``python -I`` (no PYTHON* variables, no user site-packages, not the working
directory on its path), a fresh temporary directory as its working directory (deleted after), an
environment with nothing of the parent's but PATH and the locale (no tokens or keys inherited),
its own session (the whole process group is killed on timeout), and ``resource`` limits on CPU
seconds, address space, file size, open files and core dumps.

What it does not get, and cannot be given here without OS support (namespaces, seccomp, a
container): no network isolation and no file-system isolation beyond its working directory and
the user's permissions. Run the rewards of untrusted users inside a container or a VM.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass


@dataclass
class Limits:
    timeout_s: float = 5.0          # wall clock
    cpu_s: int | None = 10          # RLIMIT_CPU (None: none, for a long-lived process)
    memory_mb: int | None = 1024    # RLIMIT_AS (address space: Python itself takes ~30 MB; None: none)
    file_size_mb: int = 16          # RLIMIT_FSIZE
    open_files: int = 64            # RLIMIT_NOFILE


@dataclass
class SandboxResult:
    returncode: int | None          # None: killed on timeout
    stdout: str
    stderr: str
    timed_out: bool

    @property
    def ok(self) -> bool:
        return not self.timed_out and self.returncode == 0

    def reason(self) -> str:
        """Why it failed, in one line ("ok" when it did not)."""
        if self.timed_out:
            return "timed out"
        if self.returncode == 0:
            return "ok"
        last = [line for line in self.stderr.strip().splitlines() if line.strip()]
        if self.returncode < 0:
            return f"killed by signal {signal.Signals(-self.returncode).name}" + (f": {last[-1]}" if last else "")
        return f"exited with status {self.returncode}" + (f": {last[-1]}" if last else "")


def clean_env() -> dict[str, str]:
    """PATH and locale only: nothing secret of the parent's reaches the child."""
    keep = ("PATH", "LANG", "LC_ALL", "TZ")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONIOENCODING="utf-8")  # -I ignores these; set for children it starts
    return env


def limits_code(limits: Limits) -> str:
    """Python lines that set the limits, run by the child itself before anything else (no
    ``preexec_fn``: forking from a threaded parent, a Ray actor, must not run Python in between)."""
    mb = 1024 * 1024
    lines = ["import resource as _r"]
    if limits.cpu_s is not None:
        lines.append(f"_r.setrlimit(_r.RLIMIT_CPU, ({limits.cpu_s}, {limits.cpu_s + 1}))")
    if limits.memory_mb is not None:
        lines.append(f"_r.setrlimit(_r.RLIMIT_AS, ({limits.memory_mb * mb}, {limits.memory_mb * mb}))")
    lines += [f"_r.setrlimit(_r.RLIMIT_FSIZE, ({limits.file_size_mb * mb}, {limits.file_size_mb * mb}))",
              f"_r.setrlimit(_r.RLIMIT_NOFILE, ({limits.open_files}, {limits.open_files}))",
              "_r.setrlimit(_r.RLIMIT_CORE, (0, 0))", "del _r"]
    return "\n".join(lines) + "\n"


def python_command(*args: str, site: bool = False) -> list[str]:
    """The child's interpreter line: isolated mode; without ``site`` no site-packages at all."""
    return [sys.executable, "-I", *(() if site else ("-S",)), *args]


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def run_python(code: str, stdin: str = "", limits: Limits | None = None, site: bool = False) -> SandboxResult:
    """Run ``code`` as the script ``main.py`` in a fresh temporary directory under the limits;
    stdout and stderr come back as text (each cut to its last 64 KiB)."""
    limits = limits or Limits()
    with tempfile.TemporaryDirectory(prefix="raylm-sandbox-") as tmp:
        script = os.path.join(tmp, "main.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(code)
        # The limits first, then the code as __main__ (its own first line stays line 1).
        bootstrap = limits_code(limits) + "import runpy\nrunpy.run_path('main.py', run_name='__main__')\n"
        process = subprocess.Popen(
            python_command("-c", bootstrap, site=site), cwd=tmp, env=clean_env(), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = process.communicate(stdin.encode("utf-8"), timeout=limits.timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            kill_group(process)
            out, err = process.communicate()
            timed_out = True
        finally:
            if process.poll() is None:
                kill_group(process)
    tail = 64 * 1024
    return SandboxResult(None if timed_out else process.returncode,
                         out[-tail:].decode("utf-8", "replace"), err[-tail:].decode("utf-8", "replace"), timed_out)
