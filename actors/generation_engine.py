"""Generation engines as Ray actors: a vLLM engine, or raylm's own KV-cache generator where vLLM
cannot be installed, behind one method surface:

- ``generate(prompts, max_new_tokens, temperature, top_p, top_k, seed, logprobs)`` -> one dict per
  prompt: ``tokens`` (new tokens), ``logprobs`` (of those tokens, or None), ``policy_version``.
  The log-probabilities are those of the distribution the tokens were sampled from:
  softmax(logits / temperature) (vLLM's ``processed_logprobs``; with top-k / top-p also renormalised
  over the kept tokens, which a trainer does not reproduce); greedy decoding gives softmax(logits).
  ``seed``: one int for the whole batch, or one per prompt (a list), so a run can replay a step;
- ``prompt_logprobs(sequences)`` -> log p(token | prefix) for every token after the first;
- ``load_weights(hf_state, version)`` -> seconds: new policy weights (Hugging Face names), handed
  over as one object-store reference, so every engine reads the same single copy;
- ``load_weight_buckets(bucket_refs, version)`` -> seconds: the same, as a list of object-store
  references to buckets (``pack_weight_buckets``: many tensors packed into one flat buffer each),
  loaded bucket by bucket inside one layerwise reload;
- ``load_lora_buckets(bucket_refs, adapter_config, version)`` -> seconds: a LoRA policy's adapter
  only (PEFT's tensor names, bucketed the same way), applied by vLLM's LoRA support on the
  engine's unchanged base (an engine started with ``max_lora_rank``);
- ``load_adapter_buckets(bucket_refs, version)`` -> seconds: the trained weights of a bottleneck or
  prompt-tuning policy (raylm's names). vLLM serves a soft prompt (prompt tuning) as input
  embeddings before each prompt's own (an engine started with ``soft_prompt_tokens``); raylm's
  generator applies either method as the trainer does (an engine started with ``peft``);
- ``version()``: the policy version the engine currently serves.

The vLLM engine runs in-process in the actor (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the weights
reach the model runner as tensors, and are loaded with vLLM's layerwise reload (a plain
``model.load_weights`` on a running engine is not enough on CPU).
"""

from __future__ import annotations

import logging
import os
import time

import ray
import torch

from raylm.peft.config import PeftConfig

log = logging.getLogger("raylm.generation")
BUCKET_TIMEOUT_S = 300  # fetching one published weight bucket from the object store


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def pack_weight_buckets(hf_state: dict[str, torch.Tensor], bucket_bytes: int = 64 << 20) -> list[dict]:
    """Pack tensors into buckets of about ``bucket_bytes``: ``{"names", "shapes", "dtype", "offsets",
    "data"}``, ``data`` one flat uint8 numpy buffer (the object store hands it over without copies).
    A bucket holds one dtype; a tensor larger than ``bucket_bytes`` gets a bucket of its own."""
    buckets, current = [], []

    def close():
        if not current:
            return
        flat = torch.cat([t.detach().contiguous().view(-1).view(torch.uint8) for _, t in current])
        offsets, offset = [], 0
        for _, t in current:
            offsets.append(offset)
            offset += t.numel() * t.element_size()
        buckets.append({"names": [n for n, _ in current], "shapes": [list(t.shape) for _, t in current],
                        "dtype": str(current[0][1].dtype).removeprefix("torch."), "offsets": offsets,
                        "data": flat.numpy()})
        current.clear()

    size = 0
    for name, tensor in hf_state.items():
        tensor = tensor.detach().cpu()
        nbytes = tensor.numel() * tensor.element_size()
        if current and (size + nbytes > bucket_bytes or tensor.dtype != current[0][1].dtype):
            close()
            size = 0
        current.append((name, tensor))
        size += nbytes
    close()
    return buckets


def unpack_weight_bucket(bucket: dict) -> list[tuple[str, torch.Tensor]]:
    """A bucket -> (name, tensor) pairs, views of one writable copy of its buffer."""
    dtype = getattr(torch, bucket["dtype"])
    flat = torch.from_numpy(bucket["data"].copy())  # the object store's buffer is read-only
    out = []
    for name, shape, offset in zip(bucket["names"], bucket["shapes"], bucket["offsets"]):
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        out.append((name, flat[offset:offset + nbytes].view(dtype).view(shape)))
    return out


class WeightReloadExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``); called through ``collective_rpc``."""

    def raylm_begin_reload(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model_runner.model)

    def raylm_load_bucket(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        # A layer is processed as soon as all of its weights have arrived, whichever bucket brings them.
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config):
            self.model_runner.model.load_weights(weights)

    def raylm_finish_reload(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self.model_runner.model, self.model_config)
        self._retie_output_head()

    def raylm_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        model = self.model_runner.model
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(model)
            model.load_weights(weights)
            finalize_layerwise_reload(model, self.model_config)
        self._retie_output_head()

    def raylm_token_embeddings(self) -> torch.Tensor:
        """The embedding of every vocabulary entry (in-process engine: the tensor itself)."""
        with torch.no_grad():
            return self.model_runner.model.embed_input_ids(torch.arange(self.model_config.get_vocab_size())).clone()

    def _retie_output_head(self) -> None:
        """With tied embeddings no tensor names the output head, so the layerwise reload skips it
        ("ParallelLMHead: Failed to load weights") and the head keeps what it derived from the old
        weights (on CPU, a prepacked GEMM copy): make sure it shares the new embedding and redo
        its post-load processing."""
        model = self.model_runner.model
        if not getattr(self.model_config.hf_config, "tie_word_embeddings", False):
            return
        head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
        if head is None or embed is None:
            return
        if head.weight is not embed.weight:
            rows = min(head.weight.shape[0], embed.weight.shape[0])
            with torch.no_grad():
                head.weight.data[:rows].copy_(embed.weight.data[:rows])
        method = getattr(head, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(head)


def _eos_token_id(checkpoint_dir: str) -> int:
    import json
    from pathlib import Path

    eos = json.loads((Path(checkpoint_dir) / "config.json").read_text()).get("eos_token_id", 2)
    return eos[0] if isinstance(eos, list) else eos


@ray.remote
class VLLMEngine:
    def __init__(self, checkpoint_dir: str, dtype: str = "float32", max_model_len: int = 512, seed: int = 0,
                 gpu_memory_utilization: float = 0.2, enforce_eager: bool = True, max_lora_rank: int | None = None,
                 soft_prompt_tokens: int = 0):
        """``max_lora_rank``: serve the policy as a LoRA adapter of at most this rank on the base
        (``load_lora_buckets``); None: full weights only. ``soft_prompt_tokens``: serve a
        prompt-tuned policy (``load_adapter_buckets``): the prompts go in as embeddings, the soft
        prompt's before the tokens' own (vLLM's prompt-embeds input)."""
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        lora = {}
        if max_lora_rank is not None:
            # vLLM takes a few fixed rank capacities; the smallest that holds the adapter.
            capacity = next((r for r in (8, 16, 32, 64, 128, 256, 512) if r >= max_lora_rank), None)
            if capacity is None:
                raise ValueError(f"max_lora_rank {max_lora_rank}: vLLM serves LoRA ranks up to 512")
            lora = dict(enable_lora=True, max_lora_rank=capacity, max_loras=1)
        self.lora_request = None  # the adapter every generation applies, once one is loaded
        self.lora_dir = None
        self.soft_prompt_tokens = soft_prompt_tokens
        self.soft_prompt = None  # [n, dim]: the prompt-tuned policy's soft prompt, once one is loaded
        self.token_embeddings = None  # the base's embedding matrix (frozen under prompt tuning), read once
        self.eos_token_id = _eos_token_id(checkpoint_dir)
        self.llm = LLM(
            model=checkpoint_dir,
            skip_tokenizer_init=True,  # raylm hands token ids in and reads token ids out
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,  # on CPU: the fraction of host RAM reserved
            enforce_eager=enforce_eager,
            worker_extension_cls=f"{__name__}.WeightReloadExtension",
            # Log-probs of the tokens under the temperature-scaled distribution they were sampled from
            # (vLLM's default, raw_logprobs, is before temperature): what PPO's ratios need.
            logprobs_mode="processed_logprobs",
            # No partial prefills: vLLM rewinds a seeded request's generator after one, and CPU
            # generators cannot rewind ("CPU Generator does not use offset"); a prompt that does
            # not fit the step's token budget waits for the next step instead.
            enable_chunked_prefill=False,
            enable_prompt_embeds=soft_prompt_tokens > 0,
            **lora,
        )
        self.policy_version = 0

    def ready(self) -> bool:
        return True

    def backend(self) -> str:
        return "vllm"

    def version(self) -> int:
        return self.policy_version

    def generate(self, prompts: list[list[int]], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | list[int] | None = None, logprobs: bool = False,
                 stop_token_ids: list[int] | None = None) -> list[dict]:
        """``stop_token_ids``: tokens that end a completion besides EOS (e.g. the chat's ``<|end|>``);
        the stop token is kept as the completion's last token. ``seed``: one for every prompt, or a
        list with one per prompt (identical prompts with one seed would sample identical answers)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        seeds = seed if isinstance(seed, list) else [seed] * len(prompts)
        if len(seeds) != len(prompts):
            raise ValueError(f"generate: {len(seeds)} seeds for {len(prompts)} prompts")
        params = [SamplingParams(
            max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else 0,
            seed=s, logprobs=0 if logprobs else None, stop_token_ids=[self.eos_token_id, *(stop_token_ids or [])],
            detokenize=False,
        ) for s in seeds]
        outputs = self.llm.generate(self._inputs(prompts), params, use_tqdm=False, lora_request=self.lora_request)
        results = []
        for out in outputs:
            completion = out.outputs[0]
            tokens = list(completion.token_ids)
            token_logprobs = None
            if logprobs:
                token_logprobs = [step[t].logprob for step, t in zip(completion.logprobs, tokens)]
            results.append({"tokens": tokens, "logprobs": token_logprobs, "policy_version": self.policy_version})
        return results

    def _inputs(self, prompts: list[list[int]]) -> list:
        """Token prompts, or with a soft prompt loaded, embeddings: the soft prompt's, then the tokens'."""
        from vllm.inputs import TokensPrompt

        if self.soft_prompt is None:
            return [TokensPrompt(prompt_token_ids=p) for p in prompts]
        if self.token_embeddings is None:
            self.token_embeddings = self.llm.collective_rpc("raylm_token_embeddings")[0]
        return [{"prompt_embeds": torch.cat([self.soft_prompt, self.token_embeddings[torch.tensor(p, dtype=torch.long)]])}
                for p in prompts]

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.soft_prompt is not None:
            raise NotImplementedError("prompt_logprobs: not with a soft prompt (vLLM scores prompt tokens, not embeddings)")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False,
                                    lora_request=self.lora_request)
        return [[step[t].logprob for step, t in zip(out.prompt_logprobs[1:], seq[1:])] for out, seq in zip(outputs, sequences)]

    def load_weights(self, hf_state: dict[str, torch.Tensor], version: int) -> float:
        start = time.perf_counter()
        self.llm.collective_rpc("raylm_load_weights", args=(list(hf_state.items()),))
        # Cached prefixes were computed with the old weights.
        self.llm.reset_prefix_cache()
        self.policy_version = version
        return time.perf_counter() - start

    def load_weight_buckets(self, bucket_refs: list, version: int) -> float:
        """Load a published policy (``pack_weight_buckets``) bucket by bucket in one layerwise reload."""
        start = time.perf_counter()
        self.llm.collective_rpc("raylm_begin_reload")
        for ref in bucket_refs:
            self.llm.collective_rpc("raylm_load_bucket", args=(unpack_weight_bucket(ray.get(ref, timeout=BUCKET_TIMEOUT_S)),))
        self.llm.collective_rpc("raylm_finish_reload")
        self.llm.reset_prefix_cache()
        self.policy_version = version
        return time.perf_counter() - start

    def load_lora_buckets(self, bucket_refs: list, adapter_config: dict, version: int) -> float:
        """A LoRA policy's adapter (``pack_weight_buckets`` of PEFT-named A and B matrices), served from
        now on in place of the previous one. vLLM reads an adapter from a folder, so it is written
        to a local temporary one (the engine's own disk: nothing more crosses the network)."""
        import json
        import shutil
        import tempfile
        from pathlib import Path

        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        start = time.perf_counter()
        tensors = dict(pair for ref in bucket_refs for pair in unpack_weight_bucket(ray.get(ref, timeout=BUCKET_TIMEOUT_S)))
        folder = Path(tempfile.mkdtemp(prefix=f"raylm-lora-v{version}-"))
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(adapter_config))
        # A fresh id per load (from 1, as vLLM wants): one version may be published twice.
        lora_id = self.lora_request.lora_int_id + 1 if self.lora_request is not None else 1
        request = LoRARequest(f"policy-{lora_id}-v{version}", lora_id, str(folder))
        self.llm.llm_engine.add_lora(request)
        if self.lora_request is not None:
            self.llm.llm_engine.remove_lora(self.lora_request.lora_int_id)
            shutil.rmtree(self.lora_dir, ignore_errors=True)
        self.lora_request, self.lora_dir = request, folder
        self.llm.reset_prefix_cache()
        self.policy_version = version
        return time.perf_counter() - start

    def load_adapter_buckets(self, bucket_refs: list, version: int) -> float:
        """A prompt-tuned policy's soft prompt (``tok_embeddings.prompt``), put before every prompt
        from now on. Other adapters (bottleneck) change the model's layers, which vLLM cannot."""
        start = time.perf_counter()
        tensors = dict(pair for ref in bucket_refs for pair in unpack_weight_bucket(ray.get(ref, timeout=BUCKET_TIMEOUT_S)))
        if set(tensors) != {"tok_embeddings.prompt"} or not self.soft_prompt_tokens:
            raise ValueError(f"load_adapter_buckets: the vLLM engine serves a soft prompt only (an engine started with "
                             f"soft_prompt_tokens), not {sorted(tensors)[:3]}")
        prompt = tensors["tok_embeddings.prompt"]
        if prompt.shape[0] != self.soft_prompt_tokens:
            raise ValueError(f"load_adapter_buckets: a soft prompt of {prompt.shape[0]} tokens; the engine was "
                             f"started for {self.soft_prompt_tokens}")
        self.soft_prompt = prompt.float()
        self.llm.reset_prefix_cache()
        self.policy_version = version
        return time.perf_counter() - start


@ray.remote
class TorchEngine:
    """raylm's own KV-cache generator behind the same interface (used where vLLM is missing, and for
    policies whose adapters vLLM cannot serve). ``peft``: a ``peft:`` section (bottleneck adapters
    or prompt tuning) applied to the model as the policy trainer applies it; a soft prompt is
    generated without a KV cache (the prompt-tuning hooks prepend it to whole sequences)."""

    def __init__(self, checkpoint_dir: str, dtype: str = "float32", max_model_len: int = 512, seed: int = 0,
                 peft: PeftConfig | None = None, **_):
        from raylm.models.hf_checkpoint import load_checkpoint

        self.model = load_checkpoint(checkpoint_dir, dtype=getattr(torch, dtype)).eval()
        self.use_cache = True
        if peft is not None:
            from raylm.peft.lora import apply_peft

            apply_peft(self.model, peft)
            self.use_cache = peft.method != "prompt_tuning"
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.policy_version = 0

    def ready(self) -> bool:
        return True

    def backend(self) -> str:
        return "torch"

    def version(self) -> int:
        return self.policy_version

    def generate(self, prompts: list[list[int]], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | list[int] | None = None, logprobs: bool = False,
                 stop_token_ids: list[int] | None = None) -> list[dict]:
        """As ``VLLMEngine.generate``; a list of seeds seeds the whole batch with its first one
        (one generator samples the batch), which replays the same batch the same way."""
        from raylm.models.generate import SamplingParams, generate

        if isinstance(seed, list):
            seed = seed[0] if seed else None
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
        else:  # like vLLM without a per-request seed: one stream for the engine's life
            generator = self.generator
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        completions = generate(self.model, prompts, params, generator, use_cache=self.use_cache)
        if stop_token_ids:  # raylm's generator stops on EOS only: cut after the first stop token
            stops = set(stop_token_ids)
            completions = [c[:next((i + 1 for i, t in enumerate(c) if t in stops), len(c))] for c in completions]
        scale = temperature if temperature > 0 else 1.0  # greedy: the unscaled distribution, as vLLM
        token_logprobs = self.prompt_logprobs([p + c for p, c in zip(prompts, completions)], scale) if logprobs else None
        return [
            {"tokens": c, "logprobs": token_logprobs[i][len(prompts[i]) - 1 :] if logprobs else None,
             "policy_version": self.policy_version}
            for i, c in enumerate(completions)
        ]

    @torch.no_grad()
    def prompt_logprobs(self, sequences: list[list[int]], temperature: float = 1.0) -> list[list[float]]:
        out = []
        for seq in sequences:
            tokens = torch.tensor([seq])
            logp = (self.model(tokens).float() / temperature).log_softmax(-1)[0, :-1]
            out.append(logp.gather(-1, tokens[0, 1:, None]).squeeze(-1).tolist())
        return out

    def load_weights(self, hf_state: dict[str, torch.Tensor], version: int) -> float:
        from raylm.models.hf_checkpoint import from_hf_state_dict

        start = time.perf_counter()
        state = from_hf_state_dict(self.model.config, hf_state)
        self.model.load_state_dict(state, strict=True)
        self.policy_version = version
        return time.perf_counter() - start

    def load_weight_buckets(self, bucket_refs: list, version: int) -> float:
        start = time.perf_counter()
        hf_state = dict(pair for ref in bucket_refs for pair in unpack_weight_bucket(ray.get(ref, timeout=BUCKET_TIMEOUT_S)))
        self.load_weights(hf_state, version)
        return time.perf_counter() - start

    def load_adapter_buckets(self, bucket_refs: list, version: int) -> float:
        """The trained weights of a bottleneck or prompt-tuning policy (raylm's names): exactly the
        model's trainable tensors (an engine started with the same ``peft``)."""
        start = time.perf_counter()
        state = dict(pair for ref in bucket_refs for pair in unpack_weight_bucket(ray.get(ref, timeout=BUCKET_TIMEOUT_S)))
        trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        if set(state) != trainable:
            raise ValueError(f"load_adapter_buckets: tensors {sorted(set(state) ^ trainable)[:4]} are not the engine "
                             "model's adapter weights (was the engine started with the policy's peft section?)")
        self.model.load_state_dict(state, strict=False)
        self.policy_version = version
        return time.perf_counter() - start


def make_generation_engine(checkpoint_dir: str, backend: str = "auto", num_cpus: float = 1, num_gpus: float = 0, **kwargs):
    """Start one engine actor. ``backend``: "vllm", "torch", or "auto" (vLLM when it imports)."""
    if backend == "auto":
        backend = "vllm" if vllm_available() else "torch"
        if backend == "torch":
            log.warning("vLLM is not installed here: generation falls back to raylm's own KV-cache generator")
    cls = {"vllm": VLLMEngine, "torch": TorchEngine}[backend]
    return cls.options(num_cpus=num_cpus, num_gpus=num_gpus).remote(str(checkpoint_dir), **kwargs)
