"""DPO and IPO losses against their formulas, response log-probs against a token-by-token sum, and
`raylm dpo` end to end on a real local Ray: the reference's log-probs are computed once, before
training, and the policy's held-out chosen-minus-rejected log-prob margin and preference accuracy
rise above where they started."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from preference_fixtures import VALIDATION_FRACTION, check_fault_drill, shared_sft_checkpoint, small_pair_inputs
from raylm.data.preferences import PairDataset
from raylm.train.losses import dpo_loss, dpo_pair_outputs, sequence_logprobs

pytestmark = pytest.mark.timeout(900)


def log_sigmoid(x: float) -> float:
    return -math.log(1 + math.exp(-x))


def test_dpo_and_ipo_losses_are_the_formulas():
    pc, pr = torch.tensor([-10.0, -4.0, -7.5]), torch.tensor([-12.0, -3.0, -7.5])
    rc, rr = torch.tensor([-11.0, -4.5, -6.0]), torch.tensor([-11.5, -2.0, -8.0])
    beta = 0.3
    h = [(a - c) - (b - d) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    out = dpo_loss(pc, pr, rc, rr, beta, "sigmoid")
    torch.testing.assert_close(out["loss"], torch.tensor([-log_sigmoid(beta * x) for x in h]))
    torch.testing.assert_close(out["chosen_rewards"], beta * (pc - rc))
    torch.testing.assert_close(out["rejected_rewards"], beta * (pr - rr))
    ipo = dpo_loss(pc, pr, rc, rr, beta, "ipo")
    torch.testing.assert_close(ipo["loss"], torch.tensor([(x - 1 / (2 * beta)) ** 2 for x in h]))
    # The policy equal to its reference: DPO loss log 2, IPO loss 1 / (2 beta)^2.
    same = dpo_loss(pc, pr, pc, pr, beta)
    torch.testing.assert_close(same["loss"], torch.full((3,), math.log(2)))
    torch.testing.assert_close(dpo_loss(pc, pr, pc, pr, beta, "ipo")["loss"], torch.full((3,), (1 / (2 * beta)) ** 2))
    with pytest.raises(ValueError, match="unknown kind"):
        dpo_loss(pc, pr, rc, rr, beta, "hinge")


def test_rpo_adds_the_chosen_answers_per_token_nll_to_each_pair():
    policy = torch.tensor([-10.0, -4.0, -12.0, -3.0], requires_grad=True)  # chosen, chosen, rejected, rejected
    reference = torch.tensor([[-11.0, -11.5], [-4.5, -2.0]])
    tokens = torch.tensor([5, 2, 6, 3])
    plain = dpo_pair_outputs(policy, reference, 0.1, "sigmoid")
    rpo = dpo_pair_outputs(policy, reference, 0.1, "sigmoid", tokens, nll_weight=0.5)
    torch.testing.assert_close(rpo["loss"] - plain["loss"], 0.5 * torch.tensor([10.0 / 5, 4.0 / 2]))
    # Its gradient reaches only the chosen rows: -w / tokens on each.
    grad_plain, = torch.autograd.grad(plain["loss"].sum(), policy)
    grad_rpo, = torch.autograd.grad(rpo["loss"].sum(), policy)
    torch.testing.assert_close(grad_rpo - grad_plain, torch.tensor([-0.5 / 5, -0.5 / 2, 0.0, 0.0]))
    assert torch.equal(rpo["correct"], plain["correct"])
    with pytest.raises(ValueError, match="answer_tokens"):
        dpo_pair_outputs(policy, reference, 0.1, "sigmoid", nll_weight=0.5)


def test_sequence_logprobs_sum_only_the_answer_tokens(tmp_path_factory):
    from raylm.models.hf_checkpoint import load_checkpoint

    folder = shared_sft_checkpoint(tmp_path_factory)
    model = load_checkpoint(folder).eval()
    pairs = [{"prompt": "What does `json.dumps(obj)` do?", "chosen": "Serialize obj to a JSON formatted str.",
              "rejected": "Return the sum."}]
    batch = PairDataset(pairs, folder / "tokenizer.json", 128, shuffle=False).batch([0])
    with torch.no_grad():
        got = sequence_logprobs(model, batch["tokens"], batch["labels"])
        for row in range(2):
            length = int(batch["attention_mask"][row].sum())
            tokens = batch["tokens"][row, :length]
            logp = F.log_softmax(model(tokens[None])[0], -1)
            expected = sum(logp[i, int(batch["labels"][row, i])].item()
                           for i in range(length) if batch["labels"][row, i] != -100)
            assert got[row].item() == pytest.approx(expected, abs=1e-4)


def policy_preferences(checkpoint, pairs, tokenizer) -> tuple[float, float]:
    """Held-out accuracy (log p(chosen) > log p(rejected)) and mean log-prob margin, in this process."""
    from raylm.models.hf_checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint).eval()
    data = PairDataset(pairs, tokenizer, 128, shuffle=False)
    margins = []
    with torch.no_grad():
        for batch in data.batches(64):
            logps = sequence_logprobs(model, batch["tokens"], batch["labels"])
            n = len(batch["index"])
            margins.append(logps[:n] - logps[n:])
    margins = torch.cat(margins)
    return (margins > 0).float().mean().item(), margins.mean().item()


@pytest.mark.slow
def test_raylm_dpo_raises_held_out_margin_and_accuracy(tmp_path, tmp_path_factory):
    import ray
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from raylm import cli

    start = shared_sft_checkpoint(tmp_path_factory)
    out = tmp_path / "out"
    config = tmp_path / "dpo.json"
    config.write_text(json.dumps({
        "output_dir": str(out), "seed": 0, "ray": {"num_cpus": 2},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, "checkpoint": str(start),
        "data": {"builtin": "stdlib-docstrings", "negatives": "random", "validation_fraction": VALIDATION_FRACTION},
        "loss": {"kind": "sigmoid", "beta": 0.1},
        "train": {"steps": 100, "batch_size": 16, "seq_len": 128, "log_every": 25, "eval_every": 50,
                  "checkpoint_every": 1000},
        "optim": {"lr": 1e-3, "warmup_steps": 10},
        "parallel": {"num_workers": 2},
    }))
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        assert cli.main(["dpo", str(config)]) == 0
    finally:
        ray.shutdown()
    pairs = {name: [json.loads(line) for line in (out / "pairs" / f"{name}.jsonl").read_text().splitlines()]
             for name in ("train", "validation")}
    held_out = pairs["validation"]
    reference = out / "reference_logprobs.safetensors"
    made = reference.stat().st_mtime_ns
    # Computed once: the same reference, data and length find the file and compute nothing.
    from raylm.config import load_config
    from raylm.pipelines import dpo

    assert dpo.reference_logprobs_file(load_config(dpo.Config, config), pairs, str(start / "tokenizer.json")) == reference
    assert reference.stat().st_mtime_ns == made
    ref = load_file(reference)
    assert ref["validation"].shape == (len(held_out), 2)
    tokenizer = start / "tokenizer.json"
    before_accuracy, before_margin = policy_preferences(start, held_out, tokenizer)
    assert (ref["validation"][:, 0] - ref["validation"][:, 1]).mean().item() == pytest.approx(before_margin, abs=1e-3)
    after_accuracy, after_margin = policy_preferences(out / "hf", held_out, tokenizer)
    assert after_margin > before_margin + 1.0, (before_margin, after_margin)
    assert after_accuracy > before_accuracy + 0.03, (before_accuracy, after_accuracy)
    # each held-out pair before and after, for the paired interval of the gain (raylm.eval.gains)
    rows = [json.loads(line) for line in (out / "held_out_preferences.jsonl").read_text().splitlines()]
    assert len(rows) == len(held_out)
    torch.testing.assert_close(torch.tensor([r["before"] for r in rows]), ref["validation"])
    tolerance = 1.5 / len(rows)  # a near-tie may fall either way between two processes' float sums
    assert sum(r["before_prefers_chosen"] for r in rows) / len(rows) == pytest.approx(before_accuracy, abs=tolerance)
    assert sum(r["after_prefers_chosen"] for r in rows) / len(rows) == pytest.approx(after_accuracy, abs=tolerance)
    assert any(r["after_prefers_chosen"] and not r["before_prefers_chosen"] for r in rows)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("raylm").experiment_id])
    history = client.get_metric_history(run.info.run_id, "val_logp_margin")
    assert history[0].step == 0 and history[0].value == pytest.approx(before_margin, abs=1e-2)
    assert history[-1].value == pytest.approx(after_margin, abs=1e-2)
    for name in ("loss", "chosen_reward", "rejected_reward", "reward_margin", "accuracy", "lr"):
        assert client.get_metric_history(run.info.run_id, name), name
    assert {"model", "config.yaml"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


# ---- peft methods and the fault drill through `raylm dpo` ----------------------------------------------

@pytest.fixture(scope="module")
def dpo_base(tmp_path_factory):
    """A random debug-size model (room for a soft prompt past 128 positions), a tokenizer, and pair
    files from 60 stdlib instructions (chosen: the function's docstring line, rejected: another
    function's); a local Ray shared by the module's peft runs and its fault drill."""
    import ray

    inputs = small_pair_inputs(tmp_path_factory.mktemp("peft-dpo"))
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield inputs
    ray.shutdown()


@pytest.mark.slow
def test_dpo_killed_worker_resumes_from_its_last_checkpoint_and_ends_as_an_uninterrupted_run(dpo_base, tmp_path):
    """train.fail_at_step on `raylm dpo` (see ``check_fault_drill``)."""
    base, files, _ = dpo_base
    check_fault_drill("dpo", base, files, tmp_path, loss={"beta": 0.1})


def dpo_losses(model, pairs, tokenizer, reference: torch.Tensor, beta: float) -> float:
    """Mean DPO loss of ``pairs`` against the reference log-probs [N, 2], in this process."""
    data = PairDataset(pairs, tokenizer, 128, shuffle=False)
    losses = []
    with torch.no_grad():
        for batch in data.batches(64):
            logps = sequence_logprobs(model.eval(), batch["tokens"], batch["labels"])
            n = len(batch["index"])
            ref = reference[batch["index"]]
            losses.append(dpo_loss(logps[:n], logps[n:], ref[:, 0], ref[:, 1], beta)["loss"])
    return torch.cat(losses).mean().item()


# debug preset: dim 128, 2 layers, q 128 / kv 64 rows, ffn 384. Bottleneck adapters through the CLI:
# tests/test_lora.py (raylm sft); the export and loading code is the same.
DPO_METHODS = {
    "qlora": ({"method": "lora", "rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
               "quantize": "nf4", "double_quant": True},
              2 * 4 * ((128 + 128) + (128 + 64) + (384 + 128))),
    "prompt_tuning": ({"method": "prompt_tuning", "num_virtual_tokens": 4}, 4 * 128),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(DPO_METHODS))
def test_raylm_dpo_with_peft_trains_only_the_adapter(dpo_base, tmp_path, method):
    """`raylm dpo` with a peft: section: only the method's weights train (MLflow's parameter count and
    optimizer-state size), the DPO loss of the training pairs falls from the starting policy's, and
    with QLoRA the frozen reference is the base with the adapters off, quantized as the policy's
    (NF4 with double quantization): the implicit reward margin is exactly 0 before the first step."""
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from raylm import cli
    from raylm.peft.lora import apply_peft, load_peft
    from raylm.models.hf_checkpoint import load_checkpoint
    from raylm.peft.config import PeftConfig

    base, files, train_pairs = dpo_base
    peft, expected = DPO_METHODS[method]
    out = tmp_path / "out"
    config = tmp_path / "dpo.json"
    config.write_text(json.dumps({
        "output_dir": str(out), "seed": 0, "ray": {"num_cpus": 2},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, "checkpoint": str(base), "data": files,
        "loss": {"beta": 0.1}, "peft": peft,
        "train": {"steps": 12, "batch_size": 8, "seq_len": 128, "log_every": 1, "eval_every": 12, "eval_batches": 1,
                  "checkpoint_every": 1000},
        "optim": {"lr": 1e-2 if method == "qlora" else 3e-2, "warmup_steps": 1},
        "parallel": {"num_workers": 1},
    }))
    assert cli.main(["dpo", str(config)]) == 0

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("raylm").experiment_id])
    assert int(run.data.params["trainable_params"]) == run.data.metrics["trainable_params"] == expected
    assert 2 * expected * 4 <= run.data.metrics["optimizer_state_mb"] * 2**20 < 2 * expected * 4 + 4096
    assert run.data.metrics["memory_gb"] > 0
    if method == "qlora":  # (a soft prompt changes the policy from its first step)
        (initial,) = [m for m in client.get_metric_history(run.info.run_id, "val_reward_margin") if m.step == 0]
        assert abs(initial.value) < 1e-5, initial.value

    reference = load_file(out / "reference_logprobs.safetensors")["train"]
    tokenizer = base / "tokenizer.json"
    start = apply_peft(load_checkpoint(base), PeftConfig(**peft), seed=0)  # the policy before step 1
    if method == "qlora":
        final = load_checkpoint(out / "hf")  # the merged export
        assert (out / "hf" / "adapter" / "adapter_config.json").exists()
    else:
        assert not (out / "hf" / "config.json").exists()
        final = load_peft(load_checkpoint(base), out / "hf" / "adapter")
    before, after = (dpo_losses(m, train_pairs, tokenizer, reference, 0.1) for m in (start, final))
    print(f"{method}: DPO loss of the training pairs {before:.4f} -> {after:.4f}")
    assert after < before - (0.005 if method == "prompt_tuning" else 0.02), (before, after)


def test_a_bad_dpo_peft_key_is_named(tmp_path, capsys):
    from raylm import cli

    config = tmp_path / "dpo.json"
    for peft, message in (({"method": "lora", "rnak": 4}, "peft.rnak: unknown key"),
                          ({"method": "prompt_tuning", "bottleneck": 4}, "peft.bottleneck: applies to method bottleneck")):
        config.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "peft": peft}))
        assert cli.main(["dpo", str(config)]) == 2
        err = capsys.readouterr().err
        assert message in err and str(config) in err, (message, err)
