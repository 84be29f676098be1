"""vLLM's own OpenAI-compatible server, owned by a Ray actor.

The actor starts ``python -m vllm.entrypoints.openai.api_server`` as its child process on
``host:port`` (a free port when ``port`` is 0), waits for ``/health``, and stops it when asked or
when the actor dies: the child is in its own process group (so a stop reaches vLLM's engine-core
process too) and is told by the kernel to exit when the actor's process goes
(``PR_SET_PDEATHSIG``), so a killed actor leaves no server behind.

The server formats chats with the checkpoint's own chat template (``tokenizer_config.json``'s
``chat_template``, or ``chat_template.jinja``), the template raylm trained with; LoRA adapters in
PEFT's format are served by name beside the base model (``--lora-modules name=path``).

Method surface: ``wait_ready(timeout_s) -> seconds``, ``url()``, ``models()``, ``alive()``,
``log_tail(lines)``, ``stop()``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import ray

LORA_RANK_CAPACITIES = (8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM's --max-lora-rank accepts


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Runs in the child before exec: its own process group, and SIGTERM when the actor's process dies."""
    import ctypes

    os.setsid()
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def server_command(checkpoint: str, host: str, port: int, model_name: str, lora: dict[str, str],
                   max_lora_rank: int | None, max_model_len: int | None, dtype: str, seed: int,
                   memory_fraction: float, generation_config: str | None = None) -> list[str]:
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint,
               "--served-model-name", model_name, "--host", host, "--port", str(port), "--dtype", dtype,
               "--seed", str(seed), "--enforce-eager",  # no graph capture / compile: a fast start on CPU
               "--gpu-memory-utilization", str(memory_fraction),  # on CPU: the share of host RAM for the KV cache
               "--distributed-executor-backend", "uni",  # one worker, in the engine-core process: one process fewer
               "--disable-uvicorn-access-log"]
    if generation_config is not None:  # a folder with a generation_config.json (the stop ids, defaults)
        command += ["--generation-config", generation_config]
    if max_model_len is not None:
        command += ["--max-model-len", str(max_model_len)]
    if lora:
        rank = max_lora_rank or 8
        capacity = next((r for r in LORA_RANK_CAPACITIES if r >= rank), None)
        if capacity is None:
            raise ValueError(f"LoRA rank {rank}: vLLM serves ranks up to {LORA_RANK_CAPACITIES[-1]}")
        command += ["--enable-lora", "--max-lora-rank", str(capacity), "--max-loras", str(len(lora)),
                    "--lora-modules", *[f"{name}={path}" for name, path in lora.items()]]
    return command


@ray.remote
class OpenAIServer:
    def __init__(self, checkpoint: str, host: str = "127.0.0.1", port: int = 0, model_name: str | None = None,
                 lora: dict[str, str] | None = None, max_lora_rank: int | None = None,
                 max_model_len: int | None = None, dtype: str = "float32", seed: int = 0,
                 memory_fraction: float = 0.1, generation_config: str | None = None, log_path: str | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.model_name = model_name or Path(checkpoint).name
        self.command = server_command(str(checkpoint), host, self.port, self.model_name, dict(lora or {}),
                                      max_lora_rank, max_model_len, dtype, seed, memory_fraction,
                                      generation_config)
        self.log_path = Path(log_path) if log_path else Path(checkpoint).parent / "serve.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "TQDM_DISABLE": "1"}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)

    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, timeout_s: float = 900) -> float:
        """Seconds from the actor's start until ``/health`` answers 200; raises, with the server's
        last log lines, if the server exits or does not answer in ``timeout_s``."""
        start, deadline = time.perf_counter(), time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM's OpenAI server exited with status {self.process.returncode} "
                                   f"(log: {self.log_path}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.host}:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return time.perf_counter() - start
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"vLLM's OpenAI server did not answer /health in {timeout_s:.0f} s "
                                   f"(log: {self.log_path}):\n{self.log_tail()}")
            time.sleep(1)

    def models(self) -> list[str]:
        """The names the server answers to: the base model's, then each LoRA adapter's."""
        with urllib.request.urlopen(f"{self.url()}/models", timeout=30) as r:
            return [m["id"] for m in json.loads(r.read())["data"]]

    def stop(self, timeout_s: float = 30) -> int | None:
        """SIGTERM to the server's process group (vLLM stops its engine core), SIGKILL if it lingers."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        return self.process.returncode

    def __del__(self):
        try:
            self.stop(timeout_s=10)
        except Exception:
            pass
