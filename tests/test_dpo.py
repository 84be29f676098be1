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

from preference_fixtures import VALIDATION_FRACTION, shared_sft_checkpoint
from raylm.actors.preference_trainer import dpo_loss, sequence_logprobs
from raylm.preference_data import PairDataset

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

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("raylm").experiment_id])
    history = client.get_metric_history(run.info.run_id, "val_logp_margin")
    assert history[0].step == 0 and history[0].value == pytest.approx(before_margin, abs=1e-2)
    assert history[-1].value == pytest.approx(after_margin, abs=1e-2)
    for name in ("loss", "chosen_reward", "rejected_reward", "reward_margin", "accuracy", "lr"):
        assert client.get_metric_history(run.info.run_id, name), name
    assert {"model", "config.yaml"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
