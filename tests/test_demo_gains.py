"""raylm.eval.gains: the intervals on known numbers, the stage-by-stage gains a lifecycle run reports
(read from stage summaries as `raylm run` writes them), and the report's format."""

from __future__ import annotations

import json
import math
import random

import pytest

from raylm.eval import gains as g


# ---- intervals on known numbers ---------------------------------------------------------------------
def test_wilson_interval_matches_published_values():
    # Newcombe (1998), Table I: 81/263 -> 0.2553 to 0.3662 (Wilson, no continuity correction)
    low, high = g.wilson_interval(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    # 0/10 -> 0 to 0.2775 (the interval stays inside [0, 1])
    low, high = g.wilson_interval(0, 10)
    assert low == pytest.approx(0.0, abs=1e-12) and round(high, 4) == 0.2775


def test_newcombe_difference_matches_published_values():
    # Newcombe (1998), Table II, example (a): 56/70 - 48/80 = 0.2, method 10: 0.0524 to 0.3339
    low, high = g.newcombe_difference(56 / 70, 70, 48 / 80, 80)
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)
    # example (d): 10/10 - 0/20 = 1, method 10: 0.6791 to 1.0
    low, high = g.newcombe_difference(1.0, 10, 0.0, 20)
    assert round(low, 4) == 0.6791 and high == 1.0


def test_paired_bootstrap_centres_on_the_mean_difference_and_narrows_with_n():
    rng = random.Random(1)
    before = [rng.random() for _ in range(400)]
    after = [b + 0.1 + rng.gauss(0, 0.05) for b in before]
    mean, low, high = g.paired_bootstrap(after, before)
    assert mean == pytest.approx(sum(a - b for a, b in zip(after, before)) / 400)
    assert low < mean < high and 0.09 < low and high < 0.11  # se = 0.05 / 20 = 0.0025
    _, low_small, high_small = g.paired_bootstrap(after[:25], before[:25])
    assert high_small - low_small > 2 * (high - low)
    # equal values: a zero-width interval at zero
    assert g.paired_bootstrap([0.5] * 10, [0.5] * 10) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="3 after, 2 before"):
        g.paired_bootstrap([1, 2, 3], [1, 2])


def test_intervals_refuse_bad_counts():
    with pytest.raises(ValueError, match="n must be at least 1"):
        g.wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        g.wilson_interval(11, 10)


# ---- the stages' gains ------------------------------------------------------------------------------
EVAL_RESULTS = {  # checkpoint -> task -> metrics, as `raylm eval` writes results.json
    "pretrain": {"raylm_tool_use": {"exact_match": 0.0, "n_items": 300}, "stdlib_docs_ppl": {"bits_per_byte": 2.7}},
    "sft": {"raylm_tool_use": {"exact_match": 0.6, "n_items": 300}, "stdlib_docs_ppl": {"bits_per_byte": 3.0}},
    "rlhf": {"raylm_tool_use": {"exact_match": 0.62, "n_items": 300}, "stdlib_docs_ppl": {"bits_per_byte": 3.0}},
    "dpo": {"raylm_tool_use": {"exact_match": 0.7, "n_items": 300}, "stdlib_docs_ppl": {"bits_per_byte": 3.1}},
}
STAGES = {
    "sft": {"seconds": 200.0},
    "reward": {"seconds": 90.0, "initial_val_accuracy": 0.5, "val_accuracy": 0.9},
    "rlhf": {"seconds": 120.0, "before_held_out": {"rule": 0.55}, "after_held_out": {"rule": 0.6},
             "held_out_rule_gain": {"mean": 0.05, "low": 0.01, "high": 0.09, "n": 64}},
    "dpo": {"seconds": 100.0, "initial_val_accuracy": 0.7, "val_accuracy": 0.8},
}


def test_stage_gains_compare_each_stage_with_the_one_before_it():
    found = g.stage_gains(STAGES, EVAL_RESULTS, pair_counts={"reward": 763, "dpo": 763})
    by = {(x.stage, x.metric): x for x in found}
    sft = by[("sft", "raylm_tool_use exact_match (held-out)")]
    assert (sft.versus, sft.before, sft.after, sft.n) == ("pretrain", 0.0, 0.6, 300)
    assert (sft.low, sft.high) == pytest.approx(g.newcombe_difference(0.6, 300, 0.0, 300))
    assert sft.shown
    reward = by[("reward", "held-out pairwise accuracy")]
    low, high = g.wilson_interval(0.9 * 763, 763)
    assert (reward.low, reward.high) == pytest.approx((low - 0.5, high - 0.5))
    assert reward.shown and "bar >= 0.85: met" in reward.note
    rl_rule = by[("rlhf", "held-out rule reward (rlhf's sampled eval)")]
    assert (rl_rule.delta, rl_rule.low, rl_rule.high, rl_rule.n) == pytest.approx((0.05, 0.01, 0.09, 64))
    rl_task = by[("rlhf", "raylm_tool_use exact_match (held-out)")]
    assert rl_task.versus == "sft" and not rl_task.shown  # +0.02 on 300 items: the interval reaches 0
    dpo = by[("dpo", "held-out preference accuracy")]
    assert (dpo.before, dpo.after, dpo.n) == (0.7, 0.8, 763) and dpo.shown
    # in the lifecycle's order, pretrain absent from the stages: not reported
    assert [x.stage for x in found] == ["sft", "reward", "rlhf", "rlhf", "dpo", "dpo"]


def test_paired_outcomes_give_a_paired_interval_narrower_than_newcombes(tmp_path):
    """The same 200 items answered by both checkpoints: 20 turned right, 6 turned wrong, the rest
    alike (0.40 -> 0.47). Newcombe's independent-samples interval reaches 0; the paired one does not."""
    before = [1.0] * 74 + [0.0] * 20 + [1.0] * 6 + [0.0] * 100
    after = [1.0] * 74 + [1.0] * 20 + [0.0] * 6 + [0.0] * 100
    results = {"sft": {"t": {"exact_match": 0.4, "n_items": 200, "exact_match_per_item": before}},
               "dpo": {"t": {"exact_match": 0.47, "n_items": 200, "exact_match_per_item": after}}}
    (paired,) = g.task_gains(results)
    assert (paired.stage, paired.before, paired.after, paired.n) == ("dpo", 0.4, 0.47, 200)
    assert paired.method == "paired bootstrap over items"
    _, low, high = g.paired_bootstrap(after, before)
    assert (paired.low, paired.high) == (low, high) and paired.shown
    newcombe = g.newcombe_difference(0.47, 200, 0.4, 200)
    assert newcombe[0] < 0 < low and high - low < newcombe[1] - newcombe[0]
    # outcomes missing on one side: Newcombe's interval, as before
    del results["sft"]["t"]["exact_match_per_item"]
    (unpaired,) = g.task_gains(results)
    assert unpaired.method == "Newcombe" and (unpaired.low, unpaired.high) == pytest.approx(newcombe)
    # DPO's preference accuracy from the stage's per-pair file (held_out_preferences.jsonl)
    rows = [{"id": i, "before_prefers_chosen": b == 1.0, "after_prefers_chosen": a == 1.0}
            for i, (b, a) in enumerate(zip(before, after))]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dpo = g.preference_gain(0.4, 0.47, 200, str(tmp_path / "prefs.jsonl"))
    assert (dpo.metric, dpo.method, dpo.low, dpo.high) == ("held-out preference accuracy",
                                                           "paired bootstrap over items", low, high)
    assert g.preference_gain(0.4, 0.47, 200, str(tmp_path / "missing.jsonl")).method == "Newcombe"


def test_a_stage_without_its_measurement_is_named_with_the_reason():
    found = g.stage_gains({"sft": {}, "reward": {"val_accuracy": None}, "dpo": {"val_accuracy": 0.6}},
                          eval_results=None, pair_counts={})
    assert all(isinstance(x, g.NotShown) for x in found)
    assert [x.stage for x in found] == ["sft", "reward", "dpo"]
    assert "no generate_until task" in found[0].line()
    found = g.stage_gains({"pretrain": {"checkpoint": "nowhere/hf"}}, data_dir="nowhere")
    assert isinstance(found[0], g.NotShown) and "nowhere" in found[0].reason


def test_the_reward_bar_is_reported_not_met():
    low_reward = g.reward_gain(0.5, 0.8, 763)
    assert low_reward.shown and "bar >= 0.85: not met" in low_reward.note


def test_headline_task_is_the_first_with_exact_match_for_every_checkpoint():
    results = {"a": {"mc": {"acc": 0.3}, "gen": {"exact_match": 0.1}}, "b": {"mc": {"acc": 0.3}, "gen": {"exact_match": 0.2}}}
    assert g.headline_task(results) == "gen"
    assert g.headline_task({"a": {"mc": {"acc": 0.3}}}) is None


# ---- the pretrain gain on real shards and a real checkpoint --------------------------------------------
def test_pretrain_gain_scores_a_model_and_the_unigram_on_the_same_windows(tmp_path):
    """A unigram-perfect toy: validation tokens alternate 5, 6, 5, 6 ...; a model that predicts the
    next token exactly saves ~all of the unigram's ln(2) per token."""
    import numpy as np
    import torch
    import transformers

    from raylm.data.token_shards import TokenShardWriter, write_index

    vocab = 16
    shards = {}
    for split, n in (("train", 4096), ("validation", 1024)):
        writer = TokenShardWriter(tmp_path, split, vocab, eos_token_id=0)
        writer.add(np.array([5, 6] * (n // 2)))
        shards[split] = writer.close()
    write_index(tmp_path, vocab, 0, shards)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # logits from the input token alone: 5 -> 6, 6 -> 5
        for p in model.model.layers.parameters():
            p.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[5, 0] = model.model.embed_tokens.weight[6, 1] = 1.0
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[6, 0] = model.lm_head.weight[5, 1] = 50.0
    model.save_pretrained(tmp_path / "hf")
    gain = g.pretrain_gain(str(tmp_path), str(tmp_path / "hf"), window=64)
    assert gain.n == 1024 // 64
    # each shard document ends with eos (id 0): train counts 5, 6: 2048 each, 0: 1, add-one smoothed over 16
    assert gain.before == pytest.approx(-math.log(2049 / 4113))
    assert gain.note == "1024 tokens"
    assert gain.after < 1e-3 and gain.shown and not gain.higher_is_better
    assert gain.low == pytest.approx(gain.delta, abs=1e-6)  # every window the same: no spread
    assert "pretrain vs unigram: held-out loss (nats/token) 0.697 -> 0.000: +0.697" in gain.line()


# ---- the report ---------------------------------------------------------------------------------------
def test_gain_lines_and_table_format():
    gain = g.accuracy_gain("sft", "pretrain", "raylm_tool_use exact_match (held-out)", 0.6, 0.0, 300)
    low, high = g.newcombe_difference(0.6, 300, 0.0, 300)
    assert gain.line() == (f"sft vs pretrain: raylm_tool_use exact_match (held-out) 0.000 -> 0.600: +0.600 "
                           f"[{low:+.3f}, {high:+.3f}] (n=300, Newcombe); gain shown")
    flat = g.accuracy_gain("rlhf", "sft", "m", 0.61, 0.6, 100)
    assert flat.line().endswith("no gain shown (the interval reaches 0)")
    table = g.markdown_gains([gain, g.NotShown("rlhf", "no rule reward")])
    rows = table.strip().splitlines()
    assert rows[0].startswith("| stage | vs | metric |") and len(rows) == 4
    assert rows[2].startswith(f"| sft | pretrain | raylm_tool_use exact_match (held-out) | 0.000 | 0.600 | "
                              f"+0.600 [{low:+.3f}, {high:+.3f}] | 300 | Newcombe | yes |")
    assert rows[3] == "| rlhf | | not measured: no rule reward | | | | | | no |"
    # through JSON and back (gains.json -> the report)
    again = [g.from_dict(json.loads(json.dumps(x.as_dict()))) for x in (gain, g.NotShown("rlhf", "why"))]
    assert again[0].line() == gain.line() and again[1].line() == "rlhf: not measured: why"


def test_lifecycle_report_prints_gains_times_and_writes_results_md(tmp_path, capsys):
    from raylm.pipelines import lifecycle

    config = lifecycle.Config.model_validate({"output_dir": str(tmp_path), "stages": ["sft", "reward", "rlhf", "dpo"]})
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.md").write_text("| task | metric | sft |\n|---|---|---|\n| t | exact_match | 0.6 |\n")
    found = g.stage_gains(STAGES, EVAL_RESULTS, pair_counts={"reward": 763, "dpo": 763})
    summary = {"stages": STAGES, "gains": [x.as_dict() for x in found], "tracking_uri": "sqlite:///x.db",
               "mlflow_parent_run": "abc"}
    lifecycle.print_report(summary, config)
    printed = capsys.readouterr().out
    for x in found:
        assert x.line() in printed
    results = (tmp_path / "results.md").read_text()
    assert found[0].line() in results and "| sft | pretrain |" in results
    assert "| rlhf | 120.0 |" in results and "| total (this run) | 510 |" in results
    assert "| t | exact_match | 0.6 |" in results
