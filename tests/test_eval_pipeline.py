"""`raylm eval` end to end on real checkpoints: multiple-choice accuracy (0- and k-shot), perplexity
in tokens, words and bytes, generative scores, a reward-model win rate, a decontamination report,
results files and MLflow metrics; the same accuracy as lm-evaluation-harness's Hugging Face backend
on the same task; bad input failing before any Ray work with the file, line and field named."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import yaml
from mlflow.tracking import MlflowClient

from raylm.actors.loglikelihood_scorer import LoglikelihoodScorer
from raylm.cli import main as raylm_main
from raylm.eval.metrics import rolling_windows
from raylm.models.hf_checkpoint import load_checkpoint
from test_eval_fixtures import build_checkpoint, build_tokenizer

TASKS = Path(__file__).resolve().parents[1] / "examples" / "tasks"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-models")
    tok = build_tokenizer(root / "tokenizer.json")
    return {
        "tokenizer": tok,
        "base": build_checkpoint(root / "base", tok, seed=1),
        "trained": build_checkpoint(root / "trained", tok, seed=1, train_steps=30),
        "reward": build_checkpoint(root / "reward", tok, seed=3, scalar_head=True),
        "no_tokenizer": build_checkpoint(root / "no_tokenizer", None, seed=1),
    }


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# ---- perplexity windows, without Ray ------------------------------------------------------------
@pytest.mark.timeout(300)
def test_rolling_windows_score_every_token_once_with_full_context(models):
    scorer = LoglikelihoodScorer(str(models["base"]))
    model = load_checkpoint(models["base"]).eval()
    full = [1] + torch.randint(3, 500, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        logp = model(torch.tensor([full[:-1]])).log_softmax(-1)[0]
    reference = logp.gather(-1, torch.tensor(full[1:])[:, None]).sum().item()
    for max_length, stride in ((64, None), (16, None), (16, 4)):
        windows = rolling_windows(len(full) - 1, max_length, stride)
        assert sum(n for _, _, n in windows) == len(full) - 1
        assert all(end - start <= max_length + 1 for start, end, _ in windows)
        out = scorer({"id": np.arange(len(windows)), "tokens": np.array([full[s:e] for s, e, _ in windows], dtype=object),
                      "n_scored": np.array([n for _, _, n in windows])})
        total = float(out["logprob"].sum())
        if max_length >= len(full):
            assert total == pytest.approx(reference, abs=1e-3)  # one window: the whole document in context
        else:
            # Each window scored by raylm's own model on exactly the tokens the window holds.
            expected = 0.0
            for start, end, n in windows:
                seq = torch.tensor([full[start:end]])
                with torch.no_grad():
                    lp = model(seq[:, :-1]).log_softmax(-1)[0, -n:]
                expected += lp.gather(-1, seq[0, -n:, None]).sum().item()
            assert total == pytest.approx(expected, abs=1e-3)
            assert total != pytest.approx(reference, abs=1e-2)  # less context than the full document


# ---- bad input -----------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_checkpoint_without_tokenizer_is_named(tmp_path, models, capsys):
    config = write_config(tmp_path / "eval.yaml", {
        "output_dir": str(tmp_path / "out"), "checkpoints": {"bare": str(models["no_tokenizer"])},
        "tasks": [{"path": str(TASKS / "stdlib_docstring_mc.yaml")}]})
    assert raylm_main(["eval", str(config)]) == 2
    err = capsys.readouterr().err
    assert "checkpoints.bare" in err and "no tokenizer" in err and str(models["no_tokenizer"]) in err


@pytest.mark.timeout(120)
def test_bad_task_data_names_file_line_and_field(tmp_path, models, capsys):
    data = tmp_path / "items.jsonl"
    rows = [{"question": "q1", "choices": ["a", "b"], "answer": 1}, {"question": "q2", "choices": ["a", "b"], "answer": 2}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = tmp_path / "bad.yaml"
    task.write_text(yaml.safe_dump({
        "task": "bad", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "output_type": "multiple_choice", "test_split": "test", "doc_to_text": "{{question}}",
        "doc_to_choice": "choices", "doc_to_target": "answer"}))
    config = write_config(tmp_path / "eval.yaml", {
        "output_dir": str(tmp_path / "out"), "checkpoints": {"base": str(models["base"])}, "tasks": [{"path": str(task)}]})
    assert raylm_main(["eval", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2" in err and "answer" in err and "out of range" in err


# ---- end to end ----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_eval_end_to_end(tmp_path, models, ray_local, mlflow_server):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Return the {w} of a path."}) + "\n" for w in ("name", "size", "owner")))
    # Training "shards": two real eval items hidden in unrelated text, as a contaminated corpus would hold them.
    mc_items = [json.loads(line) for line in (TASKS / "data" / "docstring_mc_test.jsonl").read_text().splitlines()[:12]]
    leaked = [mc_items[3]["docstring"], mc_items[7]["docstring"]]
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "part-0.jsonl").write_text("".join(json.dumps({"text": f"Some preamble. {t} Some epilogue."}) + "\n" for t in leaked)
                                         + json.dumps({"text": "unrelated words " * 50}) + "\n")
    config = write_config(tmp_path / "eval.yaml", {
        "output_dir": str(tmp_path / "out"),
        "checkpoints": {"base": str(models["base"]), "trained": str(models["trained"])},
        "tasks": [
            {"path": str(TASKS / "stdlib_docstring_mc.yaml"), "limit": 12},
            {"path": str(TASKS / "stdlib_docstring_mc.yaml"), "limit": 12, "num_fewshot": 2},
            {"path": str(TASKS / "stdlib_docs_ppl.yaml"), "limit": 3},
            {"path": str(TASKS / "stdlib_funcname_gen.yaml"), "limit": 4},
        ],
        "scorer": {"num_actors": 1, "max_length": 128},
        "generation": {"backend": "torch"},
        "preference": {"model_a": "trained", "model_b": "trained", "reward_model": str(models["reward"]),
                       "prompts": str(prompts), "max_new_tokens": 8},
        "decontamination": {"train_files": [str(shards / "*.jsonl")], "ngram": 8},
    })
    assert raylm_main(["eval", str(config), "--tracking-uri", mlflow_server]) == 0
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    results = summary["results"]
    for name in ("base", "trained"):
        mc, shots = results[name]["stdlib_docstring_mc"], results[name]["stdlib_docstring_mc_2shot"]
        assert mc["n_items"] == 12 and mc["num_fewshot"] == 0 and shots["num_fewshot"] == 2
        assert 0 <= mc["acc"] <= 1 and 0 <= mc["acc_norm"] <= 1
        ppl = results[name]["stdlib_docs_ppl"]
        # The units are consistent with each other: one log-likelihood, four normalisations.
        assert ppl["bits_per_byte"] == pytest.approx(math.log2(ppl["byte_perplexity"]))
        assert ppl["word_perplexity"] > ppl["token_perplexity"] > ppl["byte_perplexity"] > 1
        gen = results[name]["stdlib_funcname_gen"]
        assert gen["n_items"] == 4 and all(0 <= gen[k] <= 1 for k in ("exact_match", "f1", "rouge_l"))
    # A few steps of training on stdlib text lowers perplexity on held-out stdlib docstrings.
    assert results["trained"]["stdlib_docs_ppl"]["bits_per_byte"] < results["base"]["stdlib_docs_ppl"]["bits_per_byte"]
    # A model against itself, greedy: every prompt is a tie, the win rate 0.5 with a CI around it.
    pref = summary["preference"]
    assert pref["n"] == 3 and pref["ties"] == 3 and pref["win_rate"] == 0.5
    assert pref["win_rate_low"] < 0.5 < pref["win_rate_high"]
    decon = summary["decontamination"]["stdlib_docstring_mc"]
    assert decon["n_items"] == 12 and decon["contaminated"] == 2
    assert {e.rsplit(":", 1)[1] for e in decon["examples"]} == {"4", "8"}  # the leaked items' lines
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| task | metric | base | trained |" in table and "| stdlib_docstring_mc | acc |" in table
    client = MlflowClient(mlflow_server)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if "base/stdlib_docstring_mc/acc" in r.data.metrics]
    assert runs, "no MLflow run holds the eval metrics"
    metrics = runs[0].data.metrics
    assert metrics["trained/stdlib_docs_ppl/bits_per_byte"] == pytest.approx(results["trained"]["stdlib_docs_ppl"]["bits_per_byte"])
    assert metrics["preference/win_rate"] == 0.5


@pytest.mark.timeout(600)
def test_one_scorer_pool_serves_the_checkpoints_in_turn(models, ray_local):
    """`raylm eval` keeps its scorer actors across checkpoints and loads each checkpoint into them:
    the same actors throughout, and the same results as scorers started for each checkpoint alone,
    also when it goes back to a checkpoint it scored before."""
    from raylm.eval.tasks import load_task
    from raylm.eval.evaluate import evaluate_checkpoint
    from raylm.pipelines.eval import Config, ScorerConfig, TaskRef

    refs = [TaskRef(path=str(TASKS / "stdlib_docstring_mc.yaml"), limit=12),
            TaskRef(path=str(TASKS / "stdlib_docs_ppl.yaml"), limit=3)]
    tasks = [(ref, load_task(ref.path, ref.limit)) for ref in refs]
    config = Config(checkpoints={name: str(models[name]) for name in ("base", "trained")}, tasks=refs,
                    scorer=ScorerConfig(num_actors=1, max_length=128))
    pool, shared, actors = [], [], []
    try:
        for name in ("base", "trained", "base"):
            shared.append(evaluate_checkpoint(name, str(models[name]), tasks, config.scorer, config.generation, config.seed, pool))
            actors.append([actor._actor_id for actor in pool])
    finally:
        for actor in pool:
            ray.kill(actor)
    alone = {name: evaluate_checkpoint(name, str(models[name]), tasks, config.scorer, config.generation, config.seed) for name in ("base", "trained")}
    assert len(actors[0]) == 1 and actors[0] == actors[1] == actors[2]  # started once, then reloaded
    for results, name in zip(shared, ("base", "trained", "base")):
        assert results.keys() == alone[name].keys()
        for task, metrics in results.items():
            assert metrics == pytest.approx(alone[name][task], rel=1e-9), (name, task)
    ppl = "stdlib_docs_ppl"
    assert shared[1][ppl]["bits_per_byte"] < shared[0][ppl]["bits_per_byte"]  # the trained weights were scored


# ---- lm-evaluation-harness parity ----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("num_fewshot", [0, 3])
def test_same_accuracy_as_lm_eval(tmp_path, models, ray_local, num_fewshot, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    # The shipped task with absolute data paths (lm_eval resolves relative ones against its cwd).
    spec = yaml.safe_load((TASKS / "stdlib_docstring_mc.yaml").read_text())
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    for split, rel in spec["dataset_kwargs"]["data_files"].items():
        spec["dataset_kwargs"]["data_files"][split] = str(shutil.copy(TASKS / rel, task_dir / Path(rel).name))
    spec["task"] = "stdlib_docstring_mc_parity"
    spec.pop("num_fewshot", None)  # a num_fewshot in the YAML makes lm_eval ignore num_fewshot=3
    (task_dir / "parity.yaml").write_text(yaml.safe_dump(spec))
    limit = 40

    theirs = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={models['trained']},dtype=float32", tasks=[spec["task"]],
        num_fewshot=num_fewshot, limit=limit, batch_size=8, device="cpu",
        task_manager=TaskManager(include_path=str(task_dir)),
    )["results"][spec["task"]]

    config = write_config(tmp_path / "eval.yaml", {
        "output_dir": str(tmp_path / "out"), "checkpoints": {"trained": str(models["trained"])},
        "tasks": [{"path": str(task_dir / "parity.yaml"), "limit": limit, "num_fewshot": num_fewshot}],
        "scorer": {"num_actors": 1},
    })
    assert raylm_main(["eval", str(config)]) == 0
    ours = json.loads((tmp_path / "out" / "results.json").read_text())["results"]["trained"]
    ours = ours[f"{spec['task']}_{num_fewshot}shot"]
    assert ours["acc"] == pytest.approx(theirs["acc,none"], abs=1e-9)
    assert ours["acc_norm"] == pytest.approx(theirs["acc_norm,none"], abs=1e-9)
