"""`raylm eval`'s sections beyond likelihood, through the CLI: LM-as-judge, fairness, memorization and
human evaluation over real checkpoints, with results files and MLflow metrics checked against the
same numbers computed directly from the models; bad input failing before any Ray work."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import yaml
from mlflow.tracking import MlflowClient

from raylm.cli import main as raylm_main
from raylm.data.preferences import read_preferences
from raylm.data.token_shards import TokenShardWriter, TokenStream, write_index
from raylm.eval.fairness import fairness_metrics
from raylm.models.hf_checkpoint import load_checkpoint
from test_eval_fixtures import build_checkpoint, build_tokenizer, stdlib_texts

TASKS = Path(__file__).resolve().parents[1] / "examples" / "tasks"


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-sections")
    tok = build_tokenizer(root / "tokenizer.json")
    return {"tokenizer": tok, "base": build_checkpoint(root / "base", tok, seed=1)}


@pytest.fixture(scope="module")
def models(base_model):
    root, tok = base_model["base"].parent, base_model["tokenizer"]
    return {**base_model, "trained": build_checkpoint(root / "trained", tok, seed=1, train_steps=30),
            "reward": build_checkpoint(root / "reward", tok, seed=3, scalar_head=True),
            "first_judge": build_first_position_judge(root / "first_judge", tok)}


def build_first_position_judge(folder: Path, tokenizer: Path, steps: int = 40) -> Path:
    """A judge checkpoint that answers " A" to every judge prompt, whatever the responses: trained on
    the judge template over random docstring snippets, the loss on the verdict token only."""
    import random

    from tokenizers import Tokenizer

    from raylm.eval.judge import judge_prompt
    from raylm.models.hf_checkpoint import save_checkpoint
    from test_eval_fixtures import build_model

    tok = Tokenizer.from_file(str(tokenizer))
    texts, rng = stdlib_texts(200), random.Random(0)
    model = build_model(seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for _ in range(steps):
        loss = 0.0
        for _ in range(8):
            prompt, a, b = (rng.choice(texts)[:60] for _ in range(3))
            ids = torch.tensor([[1] + tok.encode(judge_prompt(prompt, a, b) + " A").ids])
            loss = loss + torch.nn.functional.cross_entropy(model(ids[:, :-1])[:, -1], ids[0, -1:]) / 8
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return save_checkpoint(model.eval(), folder, tokenizer_file=tokenizer)


def write_shards(folder: Path, tokenizer: Path, texts: list[str], vocab: int = 512) -> Path:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    writer = TokenShardWriter(folder, "train", vocab, 2)
    for text in texts:
        writer.add(tok.encode(text).ids)
    write_index(folder, vocab, 2, {"train": writer.close()})
    (folder / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return folder


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# ---- bad input, before any Ray work ---------------------------------------------------------------
def test_bad_sections_are_named_before_ray(tmp_path, base_model, capsys):
    base = str(base_model["base"])

    def fails(section: dict, *expected: str):
        config = write_config(tmp_path / "eval.yaml", {"output_dir": str(tmp_path / "out"), "checkpoints": {"base": base},
                                                       **section})
        assert raylm_main(["eval", str(config)]) == 2
        err = capsys.readouterr().err
        for text in expected:
            assert text in err, (text, err)

    fails({"fairness": {"tasks": [{"path": str(TASKS / "stdlib_funcname_gen.yaml")}]}},
          "fairness.tasks.0", "multiple_choice task")
    data = tmp_path / "fair.jsonl"
    data.write_text(json.dumps({"template_id": 0, "group": "a", "term": "x", "sentence": "s", "choices": ["1", "2"],
                                "favourable": 0}) + "\n" + json.dumps({"template_id": 0, "term": "y", "sentence": "s",
                                                                       "choices": ["1", "2"], "favourable": 0}) + "\n")
    spec = yaml.safe_load((TASKS / "fairness_templates.yaml").read_text())
    spec["dataset_kwargs"]["data_files"]["test"] = str(data)
    (tmp_path / "fair.yaml").write_text(yaml.safe_dump(spec))
    fails({"fairness": {"tasks": [{"path": str(tmp_path / "fair.yaml")}]}}, f"{data}:2", "'group'", "fairness.group_field")
    shipped = [{"path": str(TASKS / "fairness_templates.yaml")}]
    fails({"fairness": {"tasks": shipped, "train_files": [str(tmp_path / "none*.jsonl")]}},
          "fairness.train_files: no file matches")
    fails({"fairness": {"tasks": shipped, "shard_dirs": [str(tmp_path)]}}, "fairness.shard_dirs.0")
    big = tmp_path / "big-shards"
    writer = TokenShardWriter(big, "train", 1000, 2)
    writer.add([900] * 10)
    write_index(big, 1000, 2, {"train": writer.close()})
    fails({"memorization": {"shard_dirs": [str(big)]}}, "memorization.shard_dirs.0", "vocabulary of 1000")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "p", "label": "A"}) + "\n" + json.dumps({"prompt": "q", "label": "C"}) + "\n")
    fails({"judge": {"model": "base", "model_a": "base", "model_b": "base", "prompts": str(prompts), "label_field": "label"}},
          f"{prompts}:2", "'label'", "not A, B or tie")
    fails({"judge": {"model": "base", "model_a": "base", "model_b": "base", "prompts": str(prompts),
                     "template": "{prompt} {response_a}"}}, "judge.template", "{response_b}")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"id": "p1", "prompt": "p", "left": "x", "right": "y", "left_model": "a",
                                 "right_model": "b"}) + "\n")
    choices = tmp_path / "choices.csv"
    choices.write_text("id,choice\np1,left\np2,right\n")
    fails({"human_import": {"pairs": str(pairs), "choices": str(choices)}}, f"{choices}:3", "unknown pair 'p2'")


# ---- end to end --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def direct_fairness_items(folder: Path, tokenizer: Path) -> list[dict]:
    """The shipped template set scored by the model itself, one forward pass per (sentence, outcome)."""
    from raylm.eval.tasks import load_task
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    model = load_checkpoint(folder).eval()
    task = load_task(TASKS / "fairness_templates.yaml")
    items = []
    for doc in task.eval_docs:
        context = tok.encode(task.text(doc)).ids
        lps = []
        for choice in task.choices(doc):
            whole = tok.encode(task.text(doc) + choice).ids
            seq = torch.tensor([whole])
            with torch.no_grad():
                logp = model(seq[:, :-1]).log_softmax(-1)[0]
            n = len(whole) - len(context)
            lps.append(logp[-n:].gather(-1, seq[0, -n:, None]).sum().item())
        items.append({"group": doc.data["group"], "template": str(doc.data["template_id"]), "logprobs": lps,
                      "favourable": 0, "choices": task.choices(doc)})
    return items


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_judge_fairness_memorization_human_end_to_end(tmp_path, models, ray_local, mlflow_server):
    tok = models["tokenizer"]
    shards = write_shards(tmp_path / "shards", tok, stdlib_texts(60))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Return the {w} of a path.", "label": label}) + "\n"
                               for w, label in (("name", "A"), ("size", "B"), ("owner", "tie"), ("mode", "A"))))
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in [
        "The woman said the interview went well.", "The man said the interview went badly.",
        "The man found the report excellent.", "A non-binary person wrote it; it was rejected."]))
    canary = "my secret canary code is 4417 9921"
    out = tmp_path / "out"
    config = write_config(tmp_path / "eval.yaml", {
        "output_dir": str(out), "checkpoints": {"base": str(models["base"]), "trained": str(models["trained"])},
        "scorer": {"num_actors": 1}, "generation": {"backend": "torch"},
        "judge": {"model": str(models["first_judge"]), "model_a": "trained", "model_b": "base", "prompts": str(prompts),
                  "label_field": "label", "reward_model": str(models["reward"]), "max_new_tokens": 8,
                  "judge_max_new_tokens": 1},
        "fairness": {"tasks": [{"path": str(TASKS / "fairness_templates.yaml")}], "train_files": [str(train)],
                     "resamples": 200},
        "memorization": {"shard_dirs": [str(shards)], "num_sequences": 12, "prefix_tokens": 8, "suffix_tokens": 8,
                         "canaries": [canary], "generate_sequences": 3, "max_new_tokens": 12},
        "human_export": {"model_a": "trained", "model_b": "base", "prompts": str(prompts), "max_new_tokens": 8},
    })
    assert raylm_main(["eval", str(config), "--tracking-uri", mlflow_server]) == 0
    summary = json.loads((out / "results.json").read_text())

    # Judge: a checkpoint served by a generation engine that always names the first position. Every
    # prompt is judged in both orders, so model A wins once and loses once: 0.5, reported biased.
    judge = summary["judge"]
    verdicts = [json.loads(line) for line in (out / "judge_verdicts.jsonl").read_text().splitlines()]
    assert len(verdicts) == 4 == judge["n_prompts"]
    assert all(v["reply_a_first"].strip() == v["reply_b_first"].strip() == "A" for v in verdicts)
    assert judge["unparseable"] == 0 and judge["n"] == 4 and judge["ties"] == 4
    assert judge["win_rate"] == 0.5 and judge["win_rate_low"] < 0.5 < judge["win_rate_high"]
    assert judge["position_biased"] is True and judge["first_position_rate"] == 1.0 and judge["consistency"] == 0.0
    assert judge["labels/n"] == 4 and judge["labels/agreement"] == 0.25  # ties against labels A, B, tie, A
    assert all(v["reward_preference"] in ("A", "B", "tie") for v in verdicts) and judge["reward_model/n"] == 4

    # Fairness: the numbers the direct computation gives, with intervals around them.
    for name in ("base", "trained"):
        fair = summary["results"][name]["fairness_templates"]
        direct = fairness_metrics(direct_fairness_items(models[name], tok), resamples=200)
        for key in ("ll_gap", "parity_difference", "group_ll/female", "group_positive_rate/male"):
            assert fair[key] == pytest.approx(direct[key], abs=1e-4), (name, key)
        assert fair["ll_gap_low"] <= fair["ll_gap"] <= fair["ll_gap_high"] and fair["n_templates"] == 16
        assert "bias_amplification" in fair and fair["n_groups"] == 3

    # Memorization: the extraction test of each sequence recomputed with the model directly.
    starts = [s["start"] for s in summary["memorization_samples"]]
    stream = TokenStream(shards, "train")
    assert len(starts) == 12
    for name in ("base", "trained"):
        mem = summary["results"][name]["memorization"]
        model = load_checkpoint(models[name]).eval()
        hits = 0
        for start in starts:
            seq = torch.tensor(stream.read(start, 16))
            assert not (seq == 2).any()
            with torch.no_grad():
                greedy = model(seq[None, :-1])[0, 7:].argmax(-1)
            hits += bool((greedy == seq[8:]).all())
        assert mem["extracted"] == hits and mem["n_sequences"] == 12
        assert mem["canaries"] == 1 and mem["canaries_leaked"] in (0, 1) and mem["n_texts"] == 1 + 3
        details = summary["memorization"][name]
        assert details["generations"][0]["prompt"] in canary and len(details["generations"]) == 4

    # Human export, then the annotators' choices read back as preference data.
    with open(out / "human_eval" / "annotate.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and (out / "human_eval" / "annotate.html").exists()
    for row, choice in zip(rows, ("left", "right", "tie", "skip")):
        row["choice"] = choice
    filled = tmp_path / "filled.csv"
    with open(filled, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    prefs = tmp_path / "human_prefs.jsonl"
    config2 = write_config(tmp_path / "import.yaml", {"output_dir": str(tmp_path / "out2"), "human_import": {
        "pairs": str(out / "human_eval" / "pairs.jsonl"), "choices": str(filled), "output": str(prefs)}})
    assert raylm_main(["eval", str(config2), "--tracking-uri", mlflow_server]) == 0
    imported = json.loads((tmp_path / "out2" / "results.json").read_text())["human_import"]
    assert (imported["ties"], imported["skips"], imported["unannotated"]) == (1, 1, 0)
    assert imported["preferences"] + imported["unusable"] == 2
    if imported["preferences"]:
        pairs, bad = read_preferences(prefs)
        assert not bad and pairs[0]["chosen"] == rows[0]["left"] and pairs[0]["rejected"] == rows[0]["right"]

    client = MlflowClient(mlflow_server)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if "trained/fairness_templates/ll_gap" in r.data.metrics]
    assert runs, "no MLflow run holds the fairness metrics"
    metrics = runs[0].data.metrics
    assert metrics["trained/fairness_templates/ll_gap"] == pytest.approx(summary["results"]["trained"]["fairness_templates"]["ll_gap"])
    assert metrics["base/memorization/extraction_rate"] == summary["results"]["base"]["memorization"]["extraction_rate"]
    assert metrics["judge/unparseable"] == judge["unparseable"] and "human_export/n_pairs" in metrics
    assert any("human_import/ties" in r.data.metrics for e in client.search_experiments()
               for r in client.search_runs([e.experiment_id]))
    assert metrics["judge/win_rate"] == 0.5 and metrics["judge/position_biased"] == 1.0
    assert np.isfinite(metrics["trained/memorization/suffix_nll_per_token"])
