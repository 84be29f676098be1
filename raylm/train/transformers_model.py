"""The generic fallback: fine-tune a Hugging Face checkpoint whose family raylm does not implement
(GPT-2, Gemma, Phi, ...) through transformers' own module, with data parallelism / FSDP2 only.

``implementation: auto`` (a stage config key) trains a checkpoint with raylm's model when its
``model_type`` is one raylm implements (exact, every parallelism), else with transformers';
``raylm`` or ``transformers`` choose one. transformers' modules are not split by raylm's tensor,
pipeline, context or expert parallelism, so those are refused by name; so are the features that
reach into raylm's blocks (PEFT, freezing by depth, torch.compile, selective activation
checkpointing), and a model that does not honour the document mask of packed sequences.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

IMPLEMENTATIONS = ("auto", "raylm", "transformers")


def resolve_implementation(hf: dict, implementation: str) -> str:
    """'raylm' or 'transformers' for a checkpoint's config.json."""
    if implementation != "auto":
        return implementation
    from raylm.models.config import FAMILY_BLOCKS

    return "raylm" if hf.get("model_type") in FAMILY_BLOCKS else "transformers"


def unsupported_settings(config) -> list[tuple[str, str]]:
    """(key, why) of every setting of a fine-tuning stage config that the transformers path cannot run."""
    problems = []
    for key in ("tp", "pp", "cp", "ep"):
        if getattr(config.parallel, key) > 1:
            problems.append((f"parallel.{key}", "transformers' modules run with data parallelism / FSDP2 only "
                                                "(parallel.dp_shard, parallel.dp_replicate)"))
    peft = getattr(config, "peft", None)
    if peft is not None and peft.method != "none":
        problems.append(("peft.method", f"{peft.method} is applied to raylm's blocks only"))
    freeze = getattr(config, "freeze", None)
    if freeze is not None and freeze.train_layers is not None:
        problems.append(("freeze.train_layers", "freezing by depth reads raylm's blocks"))
    if config.train.compile:
        problems.append(("train.compile", "raylm compiles its own blocks only"))
    if config.train.activation_checkpointing == "selective":
        problems.append(("train.activation_checkpointing", "selective (every other block) is raylm's; use full or off"))
    return problems


def max_positions(checkpoint) -> int | None:
    import transformers

    return getattr(transformers.AutoConfig.from_pretrained(checkpoint), "max_position_embeddings", None)


class TransformersCausalLM(nn.Module):
    """transformers' causal LM behind raylm's call: ``model(tokens, positions, attn_mask)`` -> logits."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        self.config = hf_model.config

    def forward(self, tokens, positions=None, attn_mask=None):
        return self.hf(input_ids=tokens, position_ids=positions, attention_mask=attn_mask, use_cache=False).logits

    def blocks(self) -> list[nn.Module]:
        """The repeated decoder blocks (the classes transformers itself keeps whole when sharding)."""
        names = set(getattr(self.hf, "_no_split_modules", None) or ())
        return [m for m in self.hf.modules() if type(m).__name__ in names]

    def flops_per_token(self, seq_len: int) -> float:
        """6 per weight (an untied input embedding counted too: an overestimate by its size) plus
        attention's QK^T and AV products, as raylm counts its own models."""
        cfg = self.config
        weights = sum(p.numel() for p in self.hf.parameters())
        return 6.0 * weights + 12.0 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def greedy_continuations(model: nn.Module, prompts: list[list[int]], max_new_tokens: int,
                         end_ids: list[int]) -> list[list[int]]:
    """transformers' own greedy ``generate`` of each prompt (the SFT answer samples)."""
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=end_ids, pad_token_id=end_ids[0])
            outputs.append(ids[0, len(prompt):].tolist())
    return outputs


def load_transformers_model(checkpoint) -> TransformersCausalLM:
    """The checkpoint through ``AutoModelForCausalLM`` (safetensors only, fp32 master weights),
    checked to honour packed sequences' document masks."""
    import transformers

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, use_safetensors=True)
    model = TransformersCausalLM(hf_model)
    check_packed_documents(model, checkpoint)
    return model


def check_packed_documents(model: TransformersCausalLM, checkpoint) -> None:
    """Raylm packs several examples into a sequence, with a document mask and positions restarting at
    each example. A model that cannot take them (a custom mask it drops, absolute positions it
    recomputes) would train on attention across examples: refused, naming the family."""
    from raylm.models.transformer import document_causal_mask, document_positions

    documents = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4])
    tokens = torch.arange(documents.shape[1])[None] % model.config.vocab_size
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(tokens, document_positions(documents), document_causal_mask(documents))
            alone = torch.cat([model(tokens[:, documents[0] == d]) for d in range(3)], dim=1)
    except Exception as e:  # noqa: BLE001 - any failure to take the mask is the same refusal
        packed, alone = None, e
    finally:
        model.train(was_training)
    if packed is None or not torch.allclose(packed, alone, atol=1e-4 * max(alone.abs().max().item(), 1.0)):
        why = f"it raised {alone!r}" if packed is None else "its logits differ from the documents run one by one"
        raise ValueError(f"{checkpoint}: model_type {model.config.model_type!r} through transformers does not honour "
                         f"packed sequences' document masks ({why}); raylm's SFT packs examples")


def save_transformers_checkpoint(config, state: dict[str, torch.Tensor], folder, tokenizer_file=None) -> Path:
    """The trained weights (the wrapper's names) written by transformers' ``save_pretrained`` as the
    same family (safetensors), with the tokenizer files beside them."""
    import transformers

    from raylm.models.hf_checkpoint import write_tokenizer_files

    folder = Path(folder)
    hf_model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k.removeprefix("hf."): v for k, v in state.items()}
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    tied = set(getattr(hf_model, "_tied_weights_keys", None) or ())
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"export: missing {missing}, unexpected {unexpected}")
    hf_model.save_pretrained(folder)
    if tokenizer_file is not None:  # raylm's own tokenizer gets its chat template, another keeps its files
        token_ids = SimpleNamespace(max_seq_len=getattr(config, "max_position_embeddings", None),
                                    **{k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
        write_tokenizer_files(Path(tokenizer_file), folder, token_ids)
    return folder
