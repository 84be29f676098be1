"""Bring your own Hugging Face model: each family raylm loads, on a random-init checkpoint that
transformers itself writes, against transformers in fp32 (logits, loss, every parameter's
gradient), exported back in the same family and reloaded by transformers; and every config field
raylm does not implement refused, naming it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from raylm.models.hf_checkpoint import config_from_hf, load_checkpoint, save_checkpoint, to_hf_state_dict
from raylm.models.transformer import causal_lm_loss

VOCAB = 160
SEQ = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.15, bos_token_id=1, eos_token_id=2, pad_token_id=0)
MOE = dict(moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2)

# (name, transformers config class, its arguments, model_type written)
FAMILIES = [
    ("llama", "LlamaConfig", dict(tie_word_embeddings=True), "llama"),
    ("llama3-rope", "LlamaConfig", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}, eos_token_id=[2, 7]), "llama"),
    ("llama-yarn", "LlamaConfig", dict(rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}), "llama"),
    ("llama-linear", "LlamaConfig", dict(rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}),
     "llama"),
    ("llama-dynamic", "LlamaConfig", dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}),
     "llama"),
    ("mistral", "MistralConfig", dict(sliding_window=None, head_dim=24), "mistral"),
    ("qwen2", "Qwen2Config", dict(tie_word_embeddings=True), "qwen2"),
    ("qwen3", "Qwen3Config", dict(head_dim=24, tie_word_embeddings=True), "qwen3"),
    ("qwen3-moe", "Qwen3MoeConfig", dict(head_dim=24, norm_topk_prob=False, **MOE), "qwen3_moe"),
    ("qwen3-moe-norm-topk", "Qwen3MoeConfig", dict(norm_topk_prob=True, **MOE), "qwen3_moe"),
    ("olmo2", "Olmo2Config", dict(), "olmo2"),
    ("mixtral", "MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None), "mixtral"),
]


def write_hf_checkpoint(folder, config_class: str, overrides: dict, seed: int = 0):
    """A random-init model written by transformers. Norm weights and biases, which transformers
    initialises to ones and zeros, get noise too, so that a misplaced one shows in the logits."""
    config = getattr(transformers, config_class)(**{**COMMON, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(folder)
    return model.eval()


@pytest.fixture(scope="module", params=FAMILIES, ids=[f[0] for f in FAMILIES])
def family(request, tmp_path_factory):
    name, config_class, overrides, model_type = request.param
    folder = tmp_path_factory.mktemp(name)
    reference = write_hf_checkpoint(folder, config_class, overrides)
    return name, folder, reference, model_type


def tokens_for(seed=1, batch=2, seq=SEQ):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_logits_loss_and_gradients_match_transformers(family):
    name, folder, reference, model_type = family
    model = load_checkpoint(folder)
    assert model.config.hf_model_type == model_type
    tokens = tokens_for()
    ours, theirs = model(tokens), reference(tokens).logits
    scale = theirs.abs().max().item()
    assert (ours - theirs).abs().max().item() < 1e-4 * max(scale, 1.0), name
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.99

    # The loss (raylm's labels are already shifted; transformers shifts them itself) and the gradient
    # of every parameter, mapped to Hugging Face names by the same adapter as the weights.
    model.zero_grad()
    reference.zero_grad()
    labels = torch.cat([tokens[:, 1:], torch.full((tokens.shape[0], 1), -100)], dim=1)
    loss = causal_lm_loss(model, tokens, labels).ce_loss
    ref_loss = reference(tokens, labels=tokens).loss
    assert abs(loss.item() - ref_loss.item()) < 1e-5, name
    loss.backward()
    ref_loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ours_by_hf_name = to_hf_state_dict(model.config, grads)
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    # transformers 5 may hold experts fused; its state dict is what the checkpoint holds
    ref_grads = _as_checkpoint_names(reference, ref_grads)
    assert set(ref_grads) <= set(ours_by_hf_name) | {"lm_head.weight"}, set(ref_grads) - set(ours_by_hf_name)
    for hf_name, ref_grad in ref_grads.items():
        if hf_name not in ours_by_hf_name:  # tied head: its gradient is in the embedding's
            continue
        grad = ours_by_hf_name[hf_name]
        tol = 1e-4 * max(ref_grad.abs().max().item(), 1e-3)
        assert (grad - ref_grad).abs().max().item() < tol, f"{name}: gradient of {hf_name}"


def _as_checkpoint_names(reference, grads: dict) -> dict:
    """Gradients under the names the checkpoint file uses (per-expert tensors), whatever layout
    transformers keeps in memory."""
    out = {}
    for name, grad in grads.items():
        if name.endswith("experts.gate_up_proj"):  # [E, 2 * hidden, dim]: gate rows then up rows
            prefix = name.removesuffix("gate_up_proj")
            for e, g in enumerate(grad):
                gate, up = g.chunk(2)
                out[f"{prefix}{e}.gate_proj.weight"], out[f"{prefix}{e}.up_proj.weight"] = gate, up
        elif name.endswith("experts.down_proj"):  # [E, dim, hidden]
            prefix = name.removesuffix("down_proj")
            for e, g in enumerate(grad):
                out[f"{prefix}{e}.down_proj.weight"] = g
        else:
            out[name] = grad
    if any(".block_sparse_moe." in n or ".mlp.experts." in n for n in out) and reference.config.model_type == "mixtral":
        out = {n.replace(".mlp.experts.", ".block_sparse_moe.experts.").replace(".mlp.gate.", ".block_sparse_moe.gate.")
               .replace(".gate_proj.", ".w1.").replace(".up_proj.", ".w3.").replace(".down_proj.", ".w2."): g
               for n, g in out.items()}
    return out


def test_export_is_the_same_family_and_reloads_with_the_same_logits(family, tmp_path):
    name, folder, reference, model_type = family
    model = load_checkpoint(folder)
    save_checkpoint(model, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    source = json.loads((folder / "config.json").read_text())
    assert written["model_type"] == model_type and written["architectures"] == source["architectures"]
    assert written["eos_token_id"] == source["eos_token_id"]  # Llama 3 style lists of end ids kept
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(reloaded) is type(reference)
    tokens = tokens_for(seed=2)
    with torch.no_grad():
        expected = reference(tokens).logits
        assert (reloaded(tokens).logits - expected).abs().max().item() < 1e-4 * max(expected.abs().max().item(), 1.0)
    again = load_checkpoint(tmp_path)  # and raylm reads its export back to the same config
    assert again.config == model.config


def test_llama3_rope_scaling_matters_at_these_positions(tmp_path):
    """The test above would catch an ignored rope_scaling: loading the llama3 checkpoint with plain
    RoPE gives other logits at the positions used."""
    name, config_class, overrides, _ = FAMILIES[1]
    reference = write_hf_checkpoint(tmp_path, config_class, overrides)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert config_from_hf(hf).rope_type == "llama3"
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    unscaled = load_checkpoint(tmp_path)
    tokens = tokens_for()
    with torch.no_grad():
        expected = reference(tokens).logits
        diff = (unscaled(tokens) - expected).abs().max().item()
    assert diff > 0.05 * expected.abs().max().item(), diff  # 500x the tolerance the tests above hold


def test_dynamic_rope_is_exact_up_to_max_position_embeddings_and_longer_inputs_are_refused(tmp_path):
    """Dynamic NTK scaling raises RoPE's base only for a call longer than max_position_embeddings
    (transformers: from the longest position of that call, and kept for later calls until one is
    short again; vLLM: never, without max_trained_positions). raylm runs a checkpoint up to
    max_position_embeddings, where the frequencies are the unscaled ones: its logits equal
    transformers' at every position up to the last, and a longer input is refused by name."""
    _, config_class, overrides, _ = next(f for f in FAMILIES if f[0] == "llama-dynamic")
    reference = write_hf_checkpoint(tmp_path, config_class, overrides)
    model = load_checkpoint(tmp_path).eval()
    assert (model.config.rope_type, model.config.rope_factor, model.config.max_seq_len) == ("dynamic", 4.0, 256)
    tokens = tokens_for(seed=8, batch=1, seq=256)
    with torch.no_grad():
        expected = reference(tokens).logits
        assert (model(tokens) - expected).abs().max().item() < 1e-4 * max(expected.abs().max().item(), 1.0)
        # Past it transformers' scaling starts: the last positions' logits move once the call is longer.
        longer = torch.cat([tokens, tokens_for(seed=9, batch=1, seq=64)], dim=1)
        assert (reference(longer).logits[:, :256] - expected).abs().max().item() > 1e-2
        with pytest.raises(ValueError, match="320 positions: longer than the model's max_seq_len [(]256"):
            model(longer)


# (family, a config.json change raylm must refuse, the key its error names)
REFUSALS = [
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "alpha": 2.0}}, "rope_parameters.alpha"),
    ("llama", {"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_scaling.rope_type"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "mscale": 0.7,
                                   "original_max_position_embeddings": 32}}, "rope_parameters.mscale"),
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "rope_parameters.partial_rotary_factor"),
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("llama", {"attention_dropout": 0.1}, "attention_dropout"),
    ("llama", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ("llama", {"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ("mistral", {"sliding_window": 64}, "sliding_window"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 64}, "sliding_window"),
    ("qwen2", {"use_mrope": True}, "use_mrope"),
    ("qwen3-moe", {"decoder_sparse_step": 2}, "decoder_sparse_step"),
    ("qwen3-moe", {"mlp_only_layers": [0]}, "mlp_only_layers"),
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise"),
    ("llama", {"model_type": "gemma2"}, "model_type"),
]


@pytest.mark.parametrize("family_name,change,key", REFUSALS, ids=[f"{r[0]}-{r[2]}" for r in REFUSALS])
def test_unimplemented_config_fields_are_refused_by_name(tmp_path, family_name, change, key):
    _, config_class, overrides, _ = next(f for f in FAMILIES if f[0] == family_name)
    config = getattr(transformers, config_class)(**{**COMMON, **overrides})
    hf = {**json.loads(config.to_json_string()), **change}
    config_from_hf(json.loads(config.to_json_string()))  # the unchanged config loads
    with pytest.raises(ValueError, match=f"config.json: {key.replace('.', '[.]')}"):
        config_from_hf(hf)


def test_greedy_generation_matches_transformers(tmp_path):
    """raylm's KV-cache generator on a brought-in Qwen3 checkpoint: the tokens transformers' greedy
    generate picks."""
    from raylm.models.generate import SamplingParams, generate

    _, config_class, overrides, _ = next(f for f in FAMILIES if f[0] == "qwen3")
    reference = write_hf_checkpoint(tmp_path, config_class, overrides)
    model = load_checkpoint(tmp_path).eval()
    prompts = [[5, 9, 11, 40], [7, 8]]
    ours = generate(model, prompts, SamplingParams(max_new_tokens=12, temperature=0.0))
    for prompt, completion in zip(prompts, ours):
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        theirs = out[0, len(prompt):].tolist()
        assert completion == theirs[: len(completion)] and (len(completion) == 12 or completion[-1] == 2)
    with torch.no_grad():  # and log-probs of one sequence
        seq = torch.tensor([prompts[0] + ours[0]])
        assert torch.allclose(F.log_softmax(model(seq), -1), F.log_softmax(reference(seq).logits, -1), atol=1e-4)


def run_on_two_ranks(worker, names: list[str], tmp_path) -> None:
    """``worker(rank, folders, init_file)`` in 2 gloo processes, on a checkpoint of each family named."""
    import torch.multiprocessing as mp

    folders = []
    for name in names:
        _, config_class, overrides, _ = next(f for f in FAMILIES if f[0] == name)
        write_hf_checkpoint(tmp_path / name, config_class, overrides)
        folders.append(str(tmp_path / name))
    mp.spawn(worker, args=(folders, str(tmp_path / "init")), nprocs=2, join=True)


def _tensor_parallel_worker(rank: int, folders: list[str], init_file: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from raylm.distributed import checkpoint as ckpt
    from raylm.distributed.tensor_parallel import apply_tp, unpermute_state_dict

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        tokens = tokens_for(seed=3)
        labels = torch.cat([tokens[:, 1:], torch.full((tokens.shape[0], 1), -100)], dim=1)
        for folder in folders:
            plain, sharded = load_checkpoint(folder), load_checkpoint(folder)
            cfg = plain.config
            loss = causal_lm_loss(plain, tokens, labels).loss
            loss.backward()
            apply_tp(sharded, mesh)
            attention = sharded.layers["0"].attention
            assert attention.wqkv.weight.to_local().shape[0] == attention.wqkv.weight.shape[0] // 2
            if cfg.attention_bias:  # sharded with its rows
                assert attention.wqkv.bias.to_local().shape[0] == attention.wqkv.bias.shape[0] // 2
            if cfg.qk_norm == "full":  # each rank holds the slice of the norm that scales its heads
                assert attention.q_norm.weight.to_local().shape[0] == cfg.n_heads * cfg.head_dim // 2
            out = causal_lm_loss(sharded, tokens, labels)
            assert abs(out.loss.item() - loss.item()) < 1e-5, folder
            out.loss.backward()
            with torch.no_grad():
                assert torch.allclose(sharded(tokens), plain(tokens), atol=1e-5), folder
            grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
                     for n, p in sharded.named_parameters()}
            grads = unpermute_state_dict(grads, cfg, 2)
            for name, param in plain.named_parameters():
                tol = 1e-5 * max(param.grad.abs().max().item(), 1e-3)
                assert torch.allclose(grads[name], param.grad, atol=tol), (folder, name)
            # The export's gather: the plain model's weights under their own names.
            state = unpermute_state_dict(ckpt.full_model_state_dict(sharded, on_every_rank=True), cfg, 2)
            for name, value in plain.state_dict().items():
                assert torch.equal(state[name], value), (folder, name)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_tensor_parallel_matches_one_process_per_family(tmp_path):
    """tp=2 (2 gloo processes) on Qwen2 (q/k/v biases sharded with their rows), Qwen3 (per-head q/k
    norms on each rank's heads, their gradients summed over the ranks) and OLMo2 (q/k norm over the
    whole projection: the mean square summed over the ranks, the weight sharded): the same logits,
    loss, every gradient (gathered, rows put back) and gathered weights as one process."""
    run_on_two_ranks(_tensor_parallel_worker, ["qwen2", "qwen3", "olmo2"], tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sft_fine_tunes_a_brought_in_qwen3_checkpoint_and_exports_it_as_qwen3(tmp_path):
    """`raylm sft` from a Qwen3 folder that transformers wrote (with a tokenizer.json beside it), on
    2 FSDP2 workers: the export is a Qwen3 checkpoint again, transformers computes the same logits
    from it as raylm, its weights moved and its held-out loss went down."""
    import shutil

    import ray

    from raylm import cli
    from sft_fixtures import stdlib_instructions, write_jsonl_splits
    from raylm.data.tokenizer import train_tokenizer

    examples = stdlib_instructions(limit=120)
    splits = write_jsonl_splits(examples, tmp_path / "data", 0.1, seed=0)
    train_tokenizer((e["prompt"] + "\n" + e["response"] for e in examples), 512, tmp_path / "tokenizer.json")
    _, config_class, overrides, _ = next(f for f in FAMILIES if f[0] == "qwen3")
    start = tmp_path / "qwen3"
    write_hf_checkpoint(start, config_class, {**overrides, "vocab_size": 512})
    shutil.copyfile(tmp_path / "tokenizer.json", start / "tokenizer.json")
    config = tmp_path / "sft.json"
    config.write_text(json.dumps({
        "output_dir": str(tmp_path / "out"), "seed": 0, "ray": {"num_cpus": 2},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, "checkpoint": str(start),
        "data": {"train": splits["train"], "validation": splits["validation"]}, "epochs": None, "samples": 0,
        "train": {"steps": 6, "batch_size": 4, "seq_len": 128, "log_every": 2, "eval_every": 6, "eval_batches": 2,
                  "checkpoint_every": 100},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "parallel": {"num_workers": 2},
    }))
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        assert cli.main(["sft", str(config)]) == 0
    finally:
        ray.shutdown()
    export = tmp_path / "out" / "hf"
    written = json.loads((export / "config.json").read_text())
    assert written["model_type"] == "qwen3" and written["architectures"] == ["Qwen3ForCausalLM"]
    assert written["head_dim"] == 24
    tuned = load_checkpoint(export).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    tokens = torch.randint(3, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(tokens).logits
        assert (tuned(tokens) - expected).abs().max().item() < 1e-4 * max(expected.abs().max().item(), 1.0)
    before = load_checkpoint(start)
    assert not torch.equal(before.layers["1"].attention.q_norm.weight, tuned.layers["1"].attention.q_norm.weight)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("raylm").experiment_id])
    losses = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert losses[-1].value < losses[0].value


def test_reward_model_on_a_brought_in_backbone_exports_as_the_family_classifier(tmp_path):
    """A scalar head on a Qwen2 backbone (how `raylm reward` starts from a causal-LM folder) is
    written as Qwen2ForSequenceClassification, whose score transformers computes the same."""
    _, config_class, overrides, _ = next(f for f in FAMILIES if f[0] == "qwen2")
    write_hf_checkpoint(tmp_path / "hf", config_class, overrides)
    reward = load_checkpoint(tmp_path / "hf", scalar_head=True)
    with torch.no_grad():
        reward.score.weight.normal_(0, 0.1)
    save_checkpoint(reward, tmp_path / "reward")
    assert json.loads((tmp_path / "reward" / "config.json").read_text())["architectures"] == [
        "Qwen2ForSequenceClassification"]
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "reward", dtype=torch.float32)
    tokens = tokens_for(seed=4, batch=1, seq=40)
    with torch.no_grad():
        expected = theirs.eval()(tokens).logits[0, 0]
        ours = reward.eval().sequence_scores(tokens, torch.ones_like(tokens))[0]
    assert abs(ours.item() - expected.item()) < 1e-4


def test_lora_on_qwen2_merges_with_the_biases_kept(tmp_path):
    """LoRA wraps the fused q/k/v projection, bias included; the merged model keeps the biases."""
    from raylm.peft.lora import LoRASettings, apply_lora, merge_lora

    _, config_class, overrides, _ = next(f for f in FAMILIES if f[0] == "qwen2")
    write_hf_checkpoint(tmp_path, config_class, overrides)
    adapted = apply_lora(load_checkpoint(tmp_path), LoRASettings(rank=4, alpha=8))
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    merged = merge_lora(adapted)
    assert merged.layers["0"].attention.wqkv.bias.abs().sum() > 0
    tokens = tokens_for(seed=5)
    with torch.no_grad():
        assert (adapted(tokens) - merged(tokens)).abs().max().item() < 1e-4


def _context_parallel_worker(rank: int, folders: list[str], init_file: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from raylm.distributed.context_parallel import apply_context_parallel, shard_sequence

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        tokens = tokens_for(seed=6)
        labels = torch.cat([tokens[:, 1:], torch.full((tokens.shape[0], 1), -100)], dim=1)
        for folder in folders:
            plain, split = load_checkpoint(folder), load_checkpoint(folder)
            n_labels = int((labels != -100).sum())
            F.cross_entropy(plain(tokens).flatten(0, 1), labels.flatten(), reduction="sum").div(n_labels).backward()
            apply_context_parallel(split, mesh)
            local_tokens, local_labels, positions, mask = shard_sequence(tokens, labels, None, rank, 2)
            logits = split(local_tokens, positions, mask)
            loss = F.cross_entropy(logits.flatten(0, 1), local_labels.flatten(), reduction="sum").div(n_labels)
            loss.backward()
            total = loss.detach().clone()
            dist.all_reduce(total)
            for name, param in split.named_parameters():
                grad = param.grad.clone()
                dist.all_reduce(grad)  # each rank's gradient is its chunk's share
                expected = dict(plain.named_parameters())[name].grad
                assert torch.allclose(grad, expected, atol=1e-5 * max(expected.abs().max().item(), 1e-3)), (folder, name)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_context_parallel_ranks_match_one_process_per_family(tmp_path):
    """cp=2 (2 gloo processes, each half of every sequence) on Qwen3 (per-head q/k norms), OLMo2
    (post-norms, whole-projection q/k norms) and Llama 3 (scaled RoPE at global positions): every
    parameter's gradient summed over the ranks equals one process's on the whole sequence."""
    run_on_two_ranks(_context_parallel_worker, ["qwen3", "olmo2", "llama3-rope"], tmp_path)


@pytest.mark.parametrize("name", ["olmo2", "qwen3-moe", "llama3-rope"])
def test_pipeline_stages_of_a_family_compose_to_the_whole_model(tmp_path, name):
    """Two pipeline stages (split_stage: the first keeps the embeddings, the last the norm and head)
    run one after the other give the whole model's logits: the families' differences stay inside
    the blocks that stages keep whole."""
    from raylm.distributed.pipeline_parallel import split_stage

    _, config_class, overrides, _ = next(f for f in FAMILIES if f[0] == name)
    write_hf_checkpoint(tmp_path, config_class, overrides)
    whole = load_checkpoint(tmp_path).eval()
    first, last = split_stage(load_checkpoint(tmp_path), 2, 0).eval(), split_stage(load_checkpoint(tmp_path), 2, 1).eval()
    assert list(first.layers) == ["0"] and list(last.layers) == ["1"]
    tokens = tokens_for(seed=7)
    with torch.no_grad():
        assert torch.equal(last(first(tokens)), whole(tokens))


def test_raylm_sft_refuses_an_unimplemented_field_before_any_ray_work(tmp_path, capsys):
    from raylm import cli

    _, config_class, overrides, _ = next(f for f in FAMILIES if f[0] == "mistral")
    write_hf_checkpoint(tmp_path / "hf", config_class, {**overrides, "sliding_window": 64})
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    config = tmp_path / "sft.json"
    config.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "checkpoint": str(tmp_path / "hf"),
                                  "data": {"train": str(data), "validation": str(data)}, "train": {"seq_len": 128}}))
    assert cli.main(["sft", str(config)]) == 2
    assert f"checkpoint: {tmp_path / 'hf'}/config.json: sliding_window: 64" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dpo_on_a_brought_in_llama3_checkpoint_keeps_its_family_and_rope_scaling(tmp_path):
    """`raylm dpo` from a Llama 3 folder (llama3 rope scaling, two end ids) that transformers wrote,
    on the arithmetic family's preference pairs: the export is a Llama checkpoint with the same
    rope scaling and end ids, transformers computes the same logits from it as raylm, and the DPO
    loss on the training pairs went down from log 2 (the policy starts equal to its reference)."""
    import shutil

    import ray
    from mlflow.tracking import MlflowClient

    from raylm import cli
    from raylm.data.tokenizer import train_tokenizer
    from raylm.tasks.files import write_task_files

    files = write_task_files("arithmetic", tmp_path / "tasks", n_train=256, n_heldout=48, seed=0,
                             parts=("preference",))
    texts = [line for split in ("train", "heldout") for line in Path(files[f"preference_{split}"]).read_text().splitlines()]
    train_tokenizer(texts, 512, tmp_path / "tokenizer.json")
    _, config_class, overrides, _ = next(f for f in FAMILIES if f[0] == "llama3-rope")
    start = tmp_path / "llama3"
    write_hf_checkpoint(start, config_class, {**overrides, "vocab_size": 512})
    shutil.copyfile(tmp_path / "tokenizer.json", start / "tokenizer.json")
    config = tmp_path / "dpo.json"
    config.write_text(json.dumps({
        "output_dir": str(tmp_path / "out"), "seed": 0, "ray": {"num_cpus": 2},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, "checkpoint": str(start),
        "data": {"train": files["preference_train"], "validation": files["preference_heldout"]},
        "loss": {"kind": "sigmoid", "beta": 0.1},
        "train": {"steps": 30, "batch_size": 16, "seq_len": 96, "log_every": 10, "eval_every": 30,
                  "checkpoint_every": 1000},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "parallel": {"num_workers": 1},
    }))
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        assert cli.main(["dpo", str(config)]) == 0
    finally:
        ray.shutdown()
    export = tmp_path / "out" / "hf"
    written, original = (json.loads((f / "config.json").read_text()) for f in (export, start))
    assert written["model_type"] == "llama" and written["architectures"] == ["LlamaForCausalLM"]
    rope = lambda c: c.get("rope_parameters") or c.get("rope_scaling")  # noqa: E731
    assert rope(written) == rope(original)
    assert json.loads((export / "generation_config.json").read_text())["eos_token_id"] == [2, 7]
    tuned = load_checkpoint(export).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    tokens = torch.randint(3, 512, (2, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(tokens).logits
        assert (tuned(tokens) - expected).abs().max().item() < 1e-4 * max(expected.abs().max().item(), 1.0)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("raylm").experiment_id])
    margins = sorted(client.get_metric_history(run.info.run_id, "val_logp_margin"), key=lambda m: m.step)
    assert [m.step for m in margins] == [0, 30]
    losses = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert losses[0].value == pytest.approx(math.log(2), abs=0.02)
    assert losses[-1].value < losses[0].value - 0.1, [(m.step, m.value) for m in losses]
