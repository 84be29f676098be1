"""What reaches the console: raylm's own lines; Ray's, Ray Train's and vLLM's go to the run's log.

A stage's Ray workers (Ray Train controllers and workers, vLLM engines, Ray Data tasks) write a
great deal to stdout/stderr: start-up banners, INFO logs, retries that end well, C++ ``E`` lines
about actors that were meant to die. Ray forwards all of it to the driver. Unless ``--verbose``,
raylm takes Ray's place as the receiver of those lines (``install``): every line goes, with Ray's
``(actor pid=...)`` prefix, to the stage's ``logs/ray.log`` (logged to its MLflow run), and only
lines that raylm's own code printed (``[stage] ...``, ``raylm ...``) reach the console, once each.

On a terminal, training-step lines (``[sft] step 40/300 loss ...``) redraw one progress bar in
place; in a pipe (CI, ``| tee``, a Ray job's log) every one is a plain line, and nothing raylm or
Ray prints carries colour codes (``NO_COLOR``, ``RAY_COLOR_PREFIX=0``).
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import re
import sys
import threading
from pathlib import Path
from typing import TextIO

HANDLER = "raylm_console"  # the name of our handler on Ray's worker-output dispatcher
# A worker line that raylm's own code printed: "[sft] step 3/10 ...", "[rlhf] ...", "raylm eval: ...".
RAYLM_LINE = re.compile(r"^(\[(data|pretrain|sft|reward|rlhf|dpo|eval|export|fault injection)\] |raylm[ :])")
STEP_LINE = re.compile(r"^\[(\w+)\] step (\d+)/(\d+)\b")
# Python loggers whose INFO chatter belongs in the log file, not on the console.
QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "vllm", "mlflow", "urllib3", "filelock",
                 "transformers", "torch.distributed")


class Console:
    """Process-wide console state: verbose or not, the current log file, what was printed."""

    def __init__(self):
        self.verbose = os.environ.get("RAYLM_VERBOSE", "") not in ("", "0")
        self.log_path: Path | None = None
        self._log: TextIO | None = None
        self._lock = threading.Lock()
        self._recent: collections.deque[str] = collections.deque(maxlen=512)
        self._bar_open = False  # a progress bar is drawn on the terminal's current line
        self._native_fd = None  # the real stderr, once capture_native_stderr took fd 2 over
        self.stdout: TextIO | None = None  # the console's stream while sys.stdout goes to the log (None: sys.stdout)

    # ---- where the log goes -----------------------------------------------------------------

    def log_to(self, path: str | Path | None) -> None:
        """Send worker output (and quiet loggers) to ``path`` from now on (None: nowhere)."""
        with self._lock:
            if self._log is not None:
                self._log.close()
            self._log, self.log_path = None, None
            if path is not None:
                path = Path(path)
                path.parent.mkdir(parents=True, exist_ok=True)
                self._log, self.log_path = path.open("a", encoding="utf-8", errors="replace"), path

    def write_log(self, text: str) -> None:
        with self._lock:
            if self._log is not None:
                self._log.write(text if text.endswith("\n") else text + "\n")
                self._log.flush()

    # ---- what reaches the console -------------------------------------------------------------

    def show(self, line: str, stream: TextIO | None = None, once: bool = False) -> None:
        """Print one of raylm's lines, as a bar redrawn in place on a terminal when it is a training
        step; ``once``: not if the same line was shown lately (a line every rank printed)."""
        stream = stream or sys.stdout
        with self._lock:
            if once and line in self._recent:
                return
            self._recent.append(line)
            tty = _isatty(stream)
            if tty and STEP_LINE.match(line):
                stream.write("\r\x1b[K" + progress_bar(line))
                self._bar_open = True
            else:
                if self._bar_open:
                    stream.write("\n")
                    self._bar_open = False
                stream.write(line + "\n")
            stream.flush()

    def on_worker_output(self, data: dict) -> None:
        """Ray's dispatcher calls this with a batch of lines of one worker."""
        lines = data.get("lines") or []
        if data.get("pid") == "autoscaler":
            return
        who = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({who + ' ' if who else ''}pid={data.get('pid')}{'' if data.get('ip') == data.get('localhost') else ', ip=' + str(data.get('ip'))})"
        self.write_log("\n".join(f"{prefix} {line}" for line in lines))
        for line in lines:
            if RAYLM_LINE.match(line):
                self.show(line, self.stdout or sys.stdout, once=True)

    @contextlib.contextmanager
    def library_prints_to_log(self):
        """What a library prints on the driver itself with ``print`` (Ray Tune's experiment and
        trial tables, which it prints even at ``verbose=0``) goes to the log file, not the console
        (unless ``--verbose``); the workers' raylm lines still reach the console."""
        if self.verbose:
            yield
            return
        self.stdout = sys.stdout
        log = _LogStream(self)
        try:
            with contextlib.redirect_stdout(log):
                yield
        finally:
            log.flush()
            self.stdout = None


class _LogStream(io.TextIOBase):
    """A text stream whose lines go to the console's log file."""

    def __init__(self, console: Console):
        self.console, self.partial = console, ""

    def write(self, text: str) -> int:
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            self.console.write_log(line)
        return len(text)

    def flush(self) -> None:
        if self.partial:
            self.console.write_log(self.partial)
            self.partial = ""


CONSOLE = Console()


class LogFileHandler(logging.Handler):
    """Records of the quiet loggers (and of Ray Data's, through its logging config), into the
    current log file."""

    def emit(self, record):
        try:
            CONSOLE.write_log(self.format(record))
        except Exception:  # never let logging break a stage
            pass


_FILE_HANDLER = LogFileHandler()
_FILE_HANDLER.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))


# Ray Data sets up its "ray.data" logger again for every dataset, from this config when the
# environment names one: its file in Ray's session folder as by default, and the run's log instead
# of the console.
RAY_DATA_LOGGING = {
    "version": 1, "disable_existing_loggers": False,
    "formatters": {"ray": {"format": "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"}},
    "handlers": {"file": {"class": "ray.data._internal.logging.SessionFileHandler", "formatter": "ray",
                          "filename": "ray-data.log"},
                 "raylm": {"class": "raylm.console.LogFileHandler", "formatter": "ray", "level": "INFO"}},
    "loggers": {"ray.data": {"level": "DEBUG", "handlers": ["file", "raylm"], "propagate": False}},
}
# A line of Ray's C++ core (glog format), which this process writes to file descriptor 2 itself.
NATIVE_LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,.]+ [DIWEF] \d+ \d+\] ")


def capture_native_stderr() -> None:
    """Route what native code writes to this process's stderr (Ray's C++ core worker: ``E ...
    core_worker.cc`` lines about actors that ended as planned) through a pipe: its log lines go to
    the run's log, anything else to the real stderr. Python's own ``sys.stderr`` writes straight to
    the real one. Only for a process whose stderr nobody else has taken over (not under pytest's
    capture), and undone at exit so that nothing written later can block on the pipe."""
    import atexit
    import io

    if CONSOLE.verbose or CONSOLE._native_fd is not None or sys.stderr is not sys.__stderr__:
        return
    try:
        sys.stderr.flush()
        real = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
    except OSError:
        return
    CONSOLE._native_fd = real
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(os.fdopen(os.dup(real), "wb", buffering=0),
                                                   encoding="utf-8", errors="replace", line_buffering=True)

    def pump():
        with os.fdopen(read_end, "rb") as pipe:
            for raw in pipe:
                line = raw.decode("utf-8", errors="replace")
                if NATIVE_LOG_LINE.match(line):
                    CONSOLE.write_log(line)
                else:
                    os.write(real, raw)

    threading.Thread(target=pump, name="raylm-native-stderr", daemon=True).start()
    atexit.register(lambda: os.dup2(real, 2))


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(line: str, width: int = 24) -> str:
    """``[sft] step 40/300 loss 2.1 ...`` -> ``[sft] ███░░░ 40/300 loss 2.1 ...``."""
    match = STEP_LINE.match(line)
    stage, step, total = match.group(1), int(match.group(2)), int(match.group(3))
    filled = round(width * min(step, total) / max(total, 1))
    rest = line[match.end():]
    return f"[{stage}] {'█' * filled}{'░' * (width - filled)} {step}/{total}{rest}"


def set_verbose(verbose: bool) -> None:
    """Before Ray or vLLM start: ``--verbose`` shows everything, as Ray prints it."""
    CONSOLE.verbose = verbose
    os.environ["RAYLM_VERBOSE"] = "1" if verbose else "0"
    if not _isatty(sys.stdout):
        # No colour codes in a pipe: Ray's worker prefixes, vLLM's and others' loggers.
        os.environ.setdefault("NO_COLOR", "1")
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if not verbose:
        import mlflow  # noqa: F401  (it sets up its loggers as it is imported: quiet them after)

        # Ray's own line deduplication adds "[repeated Nx across cluster]" lines; the log file keeps
        # every line and the console shows each of raylm's lines once.
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        os.environ.setdefault("TQDM_DISABLE", "1")  # Hugging Face and vLLM download / load bars
        if "RAY_DATA_LOGGING_CONFIG" not in os.environ:
            import tempfile

            import yaml

            path = Path(tempfile.gettempdir()) / f"raylm-ray-data-logging-{os.getpid()}.yaml"
            path.write_text(yaml.safe_dump(RAY_DATA_LOGGING))
            os.environ["RAY_DATA_LOGGING_CONFIG"] = str(path)
        for name in QUIET_LOGGERS:
            logger = logging.getLogger(name)
            logger.setLevel(logging.INFO if name.startswith(("ray", "vllm")) else logging.WARNING)
            for handler in list(logger.handlers):
                if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                    logger.removeHandler(handler)
            if _FILE_HANDLER not in logger.handlers:
                logger.addHandler(_FILE_HANDLER)
            logger.propagate = False


def install() -> None:
    """After ``ray.init``: receive the workers' output instead of Ray's printer (not ``--verbose``)."""
    if CONSOLE.verbose:
        return
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler(HANDLER)
    dispatcher.add_handler(HANDLER, CONSOLE.on_worker_output)
    # The raylet's messages ("A worker died ...", most often one Ray Train or vLLM meant to end) do
    # not go through the dispatcher: Ray's error listener prints them with this function.
    import ray._private.worker as ray_worker

    if hasattr(ray_worker, "print_to_stdstream"):
        ray_worker.print_to_stdstream = lambda data, ignore_prefix=False: CONSOLE.on_worker_output(data)
    set_verbose(False)  # ray.init configured the "ray" loggers again: send them to the file
    try:  # Ray Data's bars are for terminals
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = _isatty(sys.stderr)
    except Exception:
        pass
