"""`raylm synth`: synthetic instructions, preference pairs and rephrased text from a tiny model on one
vLLM engine (shared by the module), as Ray Data over the engine actor. The files written are read
back by the SFT and preference readers; the tests check what is in them: planted duplicates
removed, filters applied, provenance present, pairs ordered by their recomputed scores; preference
pairs with planted duplicate prompts, a bad word, an address, identical answers; a separate judge
model on its own engine, its verdicts recomputed. The weighted mix of human and synthetic
instruction data is counted by source."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import ray
import torch

from raylm.config import ConfigError
from raylm.data import synthetic
from raylm.data.jsonl import write_jsonl
from raylm.pipelines import synth

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

VERBS = ["Write a short poem about", "Explain how to care for", "List three facts about", "Describe the colour of",
         "Give a reason to like", "Tell a story about"]
TOPICS = ["rain", "a garden", "the sea", "a river", "the moon", "a forest", "a city", "the wind"]
SEEDS = ["Write a short poem about the sun.", "Explain how to care for a cat.", "List three facts about snow.",
         "Describe the colour of the sky.", "Give a reason to like music.", "Tell a story about a dog."]
BAD_WORD = "moon"  # instructions about the moon are dropped by the bad-words filter in test_instructions


def answer_of(instruction: str) -> str:
    topic = next((t for t in TOPICS if instruction.rstrip(".").endswith(t)), "it")
    return f"Here is my answer about {topic}. People in the town like {topic} and they talk about it every day."


def train_tiny_model(folder: Path) -> Path:
    """A debug-size model briefly trained (in-process, one thread) on self-instruct lists of tasks and
    on chat answers, so that it writes words, not random bytes; raylm's tokenizer and chat template."""
    from raylm.data.chat_template import ChatTemplate
    from raylm.data.tokenizer import train_tokenizer
    from raylm.models.config import preset
    from raylm.models.hf_checkpoint import save_checkpoint
    from raylm.models.transformer import Transformer, causal_lm_loss

    tasks = [f"{verb} {topic}." for verb in VERBS for topic in TOPICS]
    corpus = [synthetic.self_instruct_prompt(tasks[i:i + 3]) + " " + tasks[(i + 3) % len(tasks)] for i in range(len(tasks))]
    corpus += [f"{t} {answer_of(t)}" for t in tasks] + SEEDS
    folder.mkdir(parents=True, exist_ok=True)
    train_tokenizer(corpus * 3, 512, folder / "tokenizer.json")
    template = ChatTemplate(folder / "tokenizer.json")
    sequences = []
    rng = random.Random(0)
    for _ in range(200):  # self-instruct prompts continued by a new task, then a line break
        shown = rng.sample(tasks, 3)
        text = synthetic.self_instruct_prompt(shown) + " " + rng.choice(tasks) + "\n"
        sequences.append([template.bos_id] + template.encode_text(text))
    sequences += [template.encode([{"role": "user", "content": t}, {"role": "assistant", "content": answer_of(t)}])[0]
                  for t in tasks]
    model = Transformer(preset("debug", vocab_size=512, max_seq_len=256))
    model.init_weights(seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared: more threads only spin
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        idx = torch.randint(0, len(sequences), (16,), generator=g).tolist()
        width = max(len(sequences[i]) for i in idx)
        tokens = torch.zeros(16, width, dtype=torch.long)
        labels = torch.full((16, width), -100, dtype=torch.long)
        for row, i in enumerate(idx):
            seq = torch.tensor(sequences[i])
            tokens[row, :len(seq)] = seq
            labels[row, :len(seq) - 1] = seq[1:]
        loss = causal_lm_loss(model, tokens, labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    save_checkpoint(model.eval(), folder / "hf", tokenizer_file=folder / "tokenizer.json")
    return folder / "hf"


TOPIC_WORDS = {t.split()[-1] for t in TOPICS}


def judge_prefers(text: str) -> bool:
    """The rule the test judge learned: a response is better when its last word is a topic's noun."""
    words = text.split()
    return bool(words) and words[-1].strip(".,").lower() in TOPIC_WORDS


def train_judge(folder: Path, tokenizer: Path, steps: int = 150) -> Path:
    """A judge model, separate from the generating one (same tokenizer and chat template): trained on
    judge prompts (raylm.eval.judge's template, in the chat template) to answer "B" when response B
    ends with a topic's noun and "A" otherwise, the loss on its answer only. Responses are cut from
    the generating model's kind of answer at random words, half of them just after a topic."""
    from raylm.data.chat_template import ChatTemplate
    from raylm.eval.judge import judge_prompt
    from raylm.models.config import preset
    from raylm.models.hf_checkpoint import save_checkpoint
    from raylm.models.transformer import Transformer, causal_lm_loss

    template = ChatTemplate(tokenizer)
    rng = random.Random(1)

    def response() -> str:
        words = (f"Here is my answer about {rng.choice(TOPICS)}. People in the town like {rng.choice(TOPICS)} "
                 "and they talk about it every day.").split()
        ends = [i + 1 for i, w in enumerate(words) if w.strip(".,").lower() in TOPIC_WORDS]
        others = [i for i in range(2, len(words) + 1) if i not in ends]
        return " ".join(words[:rng.choice(ends if rng.random() < 0.5 else others)])  # a topic or not: a half each

    sequences = []
    for _ in range(600):
        a, b = response(), response()
        prompt = f"{rng.choice(VERBS)} {rng.choice(TOPICS)}."
        ids, target = template.encode([{"role": "user", "content": judge_prompt(prompt, a, b)},
                                       {"role": "assistant", "content": "B" if judge_prefers(b) else "A"}])
        sequences.append((ids, target))
    model = Transformer(preset("debug", vocab_size=512, max_seq_len=256))
    model.init_weights(seed=7)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, len(sequences), (16,), generator=g).tolist()
        width = max(len(sequences[i][0]) for i in idx)
        tokens = torch.zeros(16, width, dtype=torch.long)
        labels = torch.full((16, width), -100, dtype=torch.long)
        for row, i in enumerate(idx):
            ids, target = sequences[i]
            tokens[row, :len(ids)] = torch.tensor(ids)
            labels[row, :len(ids) - 1] = torch.tensor([t if m else -100 for t, m in zip(ids[1:], target[1:])])
        loss = causal_lm_loss(model, tokens, labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return save_checkpoint(model.eval(), folder, tokenizer_file=tokenizer)


def save_reward_model(folder: Path, tokenizer: Path) -> Path:
    from raylm.models.config import preset
    from raylm.models.hf_checkpoint import save_checkpoint
    from raylm.models.transformer import TransformerWithScalarHead

    model = TransformerWithScalarHead(preset("debug", vocab_size=512, max_seq_len=256))
    model.model.init_weights(seed=3)
    torch.nn.init.normal_(model.score.weight, std=0.5, generator=torch.Generator().manual_seed(3))
    return save_checkpoint(model.eval(), folder, tokenizer_file=tokenizer)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    hf = train_tiny_model(root / "model")
    seeds = root / "seeds.jsonl"
    write_jsonl([{"id": f"seed-{i}", "instruction": s} for i, s in enumerate(SEEDS)], seeds)
    return {"root": root, "hf": hf, "seeds": seeds, "rm": save_reward_model(root / "rm", hf / "tokenizer.json")}


@pytest.fixture(scope="module")
def engine(assets):
    from raylm.actors.generation_engine import make_generation_engine

    for attempt in range(3):  # a loaded machine can miss Ray's raylet start deadline: not what is tested
        try:
            ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
            break
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            ray.shutdown()
    # vLLM on CPU reserves this fraction of host RAM for the worker (weights, activations, KV cache): the machine is shared
    handle = make_generation_engine(assets["hf"], backend="vllm", max_model_len=256, gpu_memory_utilization=0.06)
    ray.get(handle.ready.remote(), timeout=900)
    yield handle
    ray.kill(handle)
    ray.shutdown()


def run_synth(assets, engine, name: str, **sections):
    from raylm.tracking import stage_run

    config = synth.Config(output_dir=str(assets["root"] / name), engine={"checkpoint": str(assets["hf"])},
                          tracking={"uri": f"sqlite:///{assets['root'] / 'mlflow.db'}", "registry": False}, **sections)
    synth.check(config, "test")
    with stage_run("synth", config) as run:
        summary = synth.run(config, run, engines=[engine])
    return config, summary, run


def read(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


PROVENANCE = {"synthetic", "mode", "model", "model_fingerprint", "sampling", "run_id", "created"}


@pytest.fixture(scope="module")
def instructions_run(assets, engine):
    return run_synth(assets, engine, "instructions", mode="instructions",
                     sampling={"temperature": 1.0, "max_new_tokens": 40},
                     instructions={"seeds": str(assets["seeds"]), "num_prompts": 32, "examples_per_prompt": 2,
                                   "max_instruction_tokens": 24},
                     filters={"bad_words": {"words": [BAD_WORD]}}, provenance={"tags": {"project": "test"}})


def test_instructions_self_instruct_dedup_filters_provenance(assets, instructions_run):
    """32 sampled instructions from a model that knows ~48 tasks repeat some of them (seeded: the same
    ones every run); the data stage's MinHash dedup must remove exactly the repeats, and the
    bad-words filter what mentions BAD_WORD. Read back by SFT's reader."""
    from raylm.data.sft import read_conversations

    config, summary, run = instructions_run
    out = config.output_path
    written = read(out / "train.jsonl") + read(out / "validation.jsonl")
    rejected = read(out / "rejected.jsonl")
    stats = json.loads((out / "stats.json").read_text())
    assert len(read_conversations(out / "train.jsonl")) + len(read_conversations(out / "validation.jsonl")) == len(written)
    assert len(written) == summary["written"] >= 2
    # every prompt is accounted for: written, or dropped with its stage and reason
    assert stats["instruction_prompts"] == 32 == len(written) + len(rejected)
    # planted duplicates: greedy repeats of the same prompt are gone, none left in the file
    prompts = [r["prompt"] for r in written]
    assert len(set(prompts)) == len(prompts)
    dedup_drops = [r for r in rejected if r["stage"] == "dedup"]
    assert dedup_drops and all(r["prompt"] in prompts or any(r["prompt"] == d["prompt"] for d in rejected if d["stage"] != "dedup")
                               for r in dedup_drops)
    kept_or_dropped = Counter(r["prompt"] for r in written) + Counter(r["prompt"] for r in dedup_drops)
    assert sum(n - 1 for n in kept_or_dropped.values()) == len(dedup_drops)  # exactly the repeats removed
    # filters: the data stage's DocumentFilter, as configured, agrees with every decision
    assert all(synthetic.filter_reasons([f"{r['prompt']}\n\n{r['response']}"], config.filters) == [""] for r in written)
    assert not any(BAD_WORD in f"{r['prompt']} {r['response']}".lower().split() for r in written)
    for r in rejected:
        if r["stage"] == "filter":
            assert synthetic.filter_reasons([f"{r['prompt']}\n\n{r['response']}"], config.filters) == [r["reason"]]
    assert any(r["stage"] == "filter" and r["reason"] == "bad_words" for r in rejected)
    # provenance
    seed_ids = {f"seed-{i}" for i in range(len(SEEDS))}
    for r in written:
        p = r["provenance"]
        assert PROVENANCE <= set(p) and p["mode"] == "instructions" and p["synthetic"] is True
        assert p["model"] == str(assets["hf"].resolve()) and p["run_id"] == run.run_id and p["project"] == "test"
        assert p["sampling"]["temperature"] == 1.0 and set(p["seed_task_ids"]) <= seed_ids
    # logged to MLflow: the counts and the files
    from mlflow.tracking import MlflowClient

    client = MlflowClient(run.uri)
    logged = client.get_run(run.run_id).data.metrics
    assert logged["written"] == len(written) and logged["dropped_dedup.duplicate"] == len(dedup_drops)
    assert {a.path for a in client.list_artifacts(run.run_id, "synthetic")} >= {"synthetic/train.jsonl",
                                                                                  "synthetic/validation.jsonl"}


def test_sft_mixes_human_and_synthetic_by_weight(assets, instructions_run, tmp_path):
    """`raylm sft`'s data.mix: the synthetic instructions and a human file, 0.25 / 0.75 of 40 records;
    the built training file, read by SFT's own dataset, holds 10 synthetic (with provenance) and 30
    human records."""
    from raylm.data.sft import PackedSFTDataset, read_conversations
    from raylm.pipelines import sft

    config, _, _ = instructions_run
    human = tmp_path / "human.jsonl"
    write_jsonl([{"prompt": f"{verb} {topic}.", "response": answer_of(topic)} for verb in VERBS for topic in TOPICS[:2]],
                human)
    sft_config = sft.Config(checkpoint=str(assets["hf"]), output_dir=str(tmp_path / "sft"), data={
        "mix": [{"path": str(config.output_path / "train.jsonl"), "weight": 0.25, "name": "synthetic"},
                {"path": str(human), "weight": 0.75}],
        "mix_size": 40, "validation": str(config.output_path / "validation.jsonl")})
    sft.check(sft_config, "test")
    files = sft.data_files(sft_config)
    assert files["mix"] == {"synthetic": 10, "human": 30}
    records = [json.loads(line) for line in Path(files["train"]).read_text().splitlines()]
    assert Counter("provenance" in r for r in records) == Counter({True: 10, False: 30})
    assert Counter(r["mix_source"] for r in records) == Counter({"synthetic": 10, "human": 30})
    assert all(r["provenance"]["mode"] == "instructions" for r in records if r["mix_source"] == "synthetic")
    assert len(read_conversations(files["train"])) == 40
    dataset = PackedSFTDataset(files["train"], assets["hf"] / "tokenizer.json", seq_len=128)
    assert len(dataset.examples) == 40
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="data.mix and data.train"):
        sft.Config(data={"mix": [{"path": str(human), "weight": 1}], "train": str(human)})


FUNCTION = '''
def reward(prompt, completion):
    """1 for an answer that mentions "day", else 0: integer scores, so some prompts tie."""
    return 1.0 if "day" in completion.lower().split() or "day." in completion.lower().split() else 0.0
'''


def test_preferences_rule_reward_pairs_ordered_ties_dropped(assets, engine):
    from raylm.data.preferences import read_preferences

    prompts = assets["root"] / "prompts.jsonl"
    tasks = [f"{verb} {topic}." for verb in VERBS[:3] for topic in TOPICS[:4]]
    write_jsonl([{"id": f"p{i}", "prompt": t} for i, t in enumerate(tasks)], prompts)
    function = assets["root"] / "day_reward.py"
    function.write_text(FUNCTION)
    config, summary, _ = run_synth(
        assets, engine, "pairs_rule", mode="preferences", sampling={"temperature": 1.2, "max_new_tokens": 24},
        preferences={"prompts": str(prompts), "samples_per_prompt": 4, "scorer": "rule", "rule": f"{function}:reward"})
    out = config.output_path
    written = read(out / "train.jsonl") + read(out / "validation.jsonl")
    pairs = read_preferences(out / "train.jsonl")[0] + read_preferences(out / "validation.jsonl")[0]
    assert len(pairs) == len(written) >= 2
    namespace: dict = {}
    exec(FUNCTION, namespace)
    for record in written:
        p = record["provenance"]
        assert PROVENANCE <= set(p) and p["mode"] == "preferences" and p["prompt_id"].startswith("p")
        assert namespace["reward"](record["prompt"], record["chosen"]) == p["chosen_score"] == max(p["scores"]) == 1.0
        assert namespace["reward"](record["prompt"], record["rejected"]) == p["rejected_score"] == min(p["scores"]) == 0.0
        assert len(p["scores"]) == 4
    rejected = read(out / "rejected.jsonl")
    ties = [r for r in rejected if r["reason"] == "tie"]
    assert ties, "no prompt tied: the tie rule is not exercised"
    assert all(len(set(r["scores"])) == 1 for r in ties)
    assert len(written) + len(rejected) == len(tasks) == json.loads((out / "stats.json").read_text())["prompts"]


def test_preferences_reward_model_chosen_is_best(assets, engine):
    from raylm.data.chat_template import ChatTemplate
    from raylm.models.hf_checkpoint import load_checkpoint
    from raylm.data.preferences import read_preferences

    prompts = assets["root"] / "prompts_rm.jsonl"
    write_jsonl([{"prompt": f"{VERBS[i % 6]} {TOPICS[i]}."} for i in range(4)], prompts)
    config, summary, _ = run_synth(
        assets, engine, "pairs_rm", mode="preferences", sampling={"temperature": 1.0, "max_new_tokens": 16},
        preferences={"prompts": str(prompts), "samples_per_prompt": 3, "scorer": "reward_model",
                     "reward_model": str(assets["rm"])})
    out = config.output_path
    written = read(out / "train.jsonl") + read(out / "validation.jsonl")
    assert len(read_preferences(out / "train.jsonl")[0]) + len(read_preferences(out / "validation.jsonl")[0]) == len(written)
    assert len(written) + len(read(out / "rejected.jsonl")) == 4 and all(r["stage"] != "pair" or r["reason"] != "tie"
                                                                      for r in read(out / "rejected.jsonl"))
    model = load_checkpoint(assets["rm"], scalar_head=True).eval()
    template = ChatTemplate(assets["rm"])
    for record in written:
        p = record["provenance"]
        assert p["scorer"] == "reward_model" and p["reward_model"] == str(assets["rm"])
        scores = []
        for answer in (record["chosen"], record["rejected"]):
            ids = template.encode([{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": answer}])[0]
            with torch.no_grad():
                scores.append(model.sequence_scores(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item())
        assert scores[0] == pytest.approx(p["chosen_score"], abs=1e-4) and scores[1] == pytest.approx(p["rejected_score"], abs=1e-4)
        assert p["chosen_score"] == max(p["scores"]) > min(p["scores"]) == p["rejected_score"]


def test_preferences_judge_both_orders(assets, engine):
    """The model as its own pairwise judge (raylm.eval.judge): every pair of a prompt's 3 answers is
    judged in both orders (3 pairs x 2 verdicts per prompt); pairs are chosen by the judged scores,
    and a prompt whose answers the judge cannot tell apart (the tiny model rarely writes a verdict)
    gives no pair."""
    prompts = assets["root"] / "prompts_judge.jsonl"
    write_jsonl([{"prompt": f"{VERBS[i % 6]} {TOPICS[i]}."} for i in range(4)], prompts)
    out = assets["root"] / "pairs_judge"
    try:
        config, _, _ = run_synth(assets, engine, "pairs_judge", mode="preferences",
                                 sampling={"temperature": 1.0, "max_new_tokens": 16},
                                 preferences={"prompts": str(prompts), "samples_per_prompt": 3, "scorer": "judge"})
        written = read(out / "train.jsonl") + read(out / "validation.jsonl")
    except synthetic.SyntheticDataError as e:  # fewer than 2 pairs: the rest tied, as rejected.jsonl says
        assert "rejected.jsonl" in str(e)
        written = []
    stats = json.loads((out / "stats.json").read_text())
    assert sum(stats["judge_verdicts"].values()) == 4 * 3 * 2
    for record in written:
        p = record["provenance"]
        assert p["scorer"] == "judge" and p["chosen_score"] == max(p["scores"]) > min(p["scores"]) == p["rejected_score"]
    rejected = read(out / "rejected.jsonl")
    ties = [r for r in rejected if r["reason"] == "tie"]
    assert all(len(set(r["scores"])) == 1 for r in ties) and len(written) + len(rejected) == 4


# a different score on every call: identical answers do not tie, so only the identity check drops them
CLOCK_REWARD = "import time\n\ndef reward(prompt, completion):\n    return time.perf_counter_ns() / 1e9\n"
HARBOUR = "Describe the colour of the sea on a cold morning when the wind comes from the north and the boats stay in the {}."


def test_preferences_dedup_and_filters(assets, engine):
    """Planted: p6 repeats p1 exactly, p7 repeats p2 but for its last word (near duplicate), p3 and p8
    hold a bad word, p4 and p9 an e-mail address. The duplicates collapse before sampling (the data stage's MinHash
    dedup), the bad-word prompt is filtered with its chosen answer, the address is redacted; every
    other drop is checked against the library; the counts land in stats.json and MLflow. (A clock
    scores the answers, so no prompt ties, and only identical answers make no pair: every prompt
    reaches the filters.)"""
    from mlflow.tracking import MlflowClient

    prompts = assets["root"] / "prompts_dedup.jsonl"
    texts = {"p0": "Write a short poem about rain.", "p1": "Explain how to care for a garden.", "p2": HARBOUR.format("harbour"),
             "p3": "Volcano fans: write a short poem about the moon.", "p4": "Write a short poem about rain and send it to anna@example.com.",
             "p5": "Give a reason to like a city.", "p6": "Explain how to care for a garden.", "p7": HARBOUR.format("port"),
             "p8": "Volcano lovers: give a reason to like the sea.", "p9": "Describe the colour of a city for anna@example.com."}
    write_jsonl([{"id": k, "prompt": v} for k, v in texts.items()], prompts)
    function = assets["root"] / "clock_reward.py"
    function.write_text(CLOCK_REWARD)
    config, summary, run = run_synth(
        assets, engine, "pairs_dedup", mode="preferences", sampling={"temperature": 1.2, "max_new_tokens": 24},
        preferences={"prompts": str(prompts), "samples_per_prompt": 4, "rule": f"{function}:reward",
                     "near_identical_jaccard": 1.0},
        filters={"bad_words": {"words": ["volcano"]}})
    out = config.output_path
    written = read(out / "train.jsonl") + read(out / "validation.jsonl")
    rejected = read(out / "rejected.jsonl")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["prompts"] == 10 and len(written) + len(rejected) == 10
    assert sorted(r["prompt_id"] for r in rejected if r["stage"] == "dedup") == ["p6", "p7"]
    assert stats["dedup"]["exact_duplicates_removed"] == 1 and stats["dedup"]["near_duplicates_removed"] == 1
    ids = [r["provenance"]["prompt_id"] for r in written]
    assert len(set(ids)) == len(ids) and set(ids) <= {"p0", "p1", "p2", "p4", "p5", "p9"}
    assert stats["answers_sampled"] == 8 * 4  # the duplicates were never sampled
    for r in rejected:
        if r["stage"] == "filter":
            assert synthetic.filter_reasons([f"{r['prompt']}\n\n{r['chosen']}"], config.filters, quality=False) == [r["reason"]]
        elif r["stage"] == "pair":
            assert synthetic.similar_answers(r["chosen"], r["rejected"], config.dedup, 1.0) == r["reason"]
    # the bad-word prompts never written; those that reached the filters (not identical answers) filtered
    assert ("filter", "bad_words") in {(r["stage"], r["reason"]) for r in rejected if r["prompt_id"] in ("p3", "p8")}
    for r in written:
        assert synthetic.similar_answers(r["chosen"], r["rejected"], config.dedup, 1.0) == ""
        assert r["provenance"]["chosen_score"] > r["provenance"]["rejected_score"]
        assert "volcano" not in r["prompt"] and "anna@example.com" not in r["prompt"]
        if r["provenance"]["prompt_id"] in ("p4", "p9"):
            assert r["prompt"] == texts[r["provenance"]["prompt_id"]].replace("anna@example.com", "<EMAIL>")
    assert {"p4", "p9"} & set(ids)
    assert len(written) >= 4
    logged = MlflowClient(run.uri).get_run(run.run_id).data.metrics
    assert logged["dropped_dedup.duplicate"] == 2 and logged["dedup.exact_duplicates_removed"] == 1
    for reason, count in stats.get("dropped_filter", {}).items():
        assert logged[f"dropped_filter.{reason}"] == count


def test_preferences_identical_answers_give_no_pair(assets, engine):
    """Greedy sampling: a prompt's answers are all the same text; a scorer that never ties them (a
    clock) still gets no pair: every prompt is dropped as identical, and the run says so."""
    prompts = assets["root"] / "prompts_identical.jsonl"
    write_jsonl([{"id": f"q{i}", "prompt": f"{VERBS[i]} {TOPICS[i]}."} for i in range(3)], prompts)
    function = assets["root"] / "clock_reward.py"
    function.write_text(CLOCK_REWARD)
    with pytest.raises(synthetic.SyntheticDataError, match="0 record.*rejected.jsonl"):
        run_synth(assets, engine, "pairs_identical", mode="preferences", sampling={"temperature": 0.0, "max_new_tokens": 16},
                  preferences={"prompts": str(prompts), "samples_per_prompt": 2, "rule": f"{function}:reward"})
    out = assets["root"] / "pairs_identical"
    rejected = read(out / "rejected.jsonl")
    assert [r["reason"] for r in rejected] == ["identical"] * 3
    assert all(r["chosen"] == r["rejected"] and r["scores"][0] != r["scores"][1] for r in rejected)
    assert json.loads((out / "stats.json").read_text())["dropped_pair"] == {"identical": 3}


@pytest.fixture
def judge_engine(assets):
    """A second vLLM engine actor serving the separate judge model (stopped after its test: the
    module's other tests need the CPUs)."""
    from raylm.actors.generation_engine import make_generation_engine

    folder = train_judge(assets["root"] / "judge", assets["hf"] / "tokenizer.json")
    handle = make_generation_engine(folder, backend="vllm", num_cpus=0.5, max_model_len=256, gpu_memory_utilization=0.06)
    ray.get(handle.ready.remote(), timeout=900)
    yield folder, handle
    ray.kill(handle)


def test_preferences_separate_judge_model(assets, engine, judge_engine):
    """preferences.judge_checkpoint: a judge model other than the generating one, on its own engine,
    in its own chat template. The generating model cannot write a verdict (test above: mostly
    unparseable); this judge (trained towards "B" when response B ends with a topic's noun) answers A
    or B every time. Its verdicts are the judge checkpoint's (recomputed greedily with torch), and
    every prompt's answer scores are the position-swap debiased means of its logged verdicts: the
    chosen / rejected answers are their best / worst, a prompt whose answers score alike gives none."""
    from raylm.data.chat_template import ChatTemplate
    from raylm.eval.judge import debiased_scores, judge_prompt, parse_verdict
    from raylm.models.hf_checkpoint import load_checkpoint
    from raylm.tracking import stage_run

    judge_folder, judge_handle = judge_engine
    prompts = assets["root"] / "prompts_judge_model.jsonl"
    write_jsonl([{"id": f"j{i}", "prompt": f"{VERBS[i % 6]} {TOPICS[i]}."} for i in range(8)], prompts)
    out = assets["root"] / "pairs_judge_model"
    config = synth.Config(output_dir=str(out), engine={"checkpoint": str(assets["hf"])},
                          tracking={"uri": f"sqlite:///{assets['root'] / 'mlflow.db'}", "registry": False},
                          mode="preferences", sampling={"temperature": 1.0, "max_new_tokens": 8},
                          preferences={"prompts": str(prompts), "samples_per_prompt": 4, "scorer": "judge",
                                       "judge_checkpoint": str(judge_folder), "judge_max_new_tokens": 4})
    synth.check(config, "test")
    try:
        with stage_run("synth", config) as run:
            synth.run(config, run, engines=[engine], judge_engines=[judge_handle])
    except synthetic.SyntheticDataError as e:  # fewer than 2 pairs: the rest tied, as rejected.jsonl says
        assert "rejected.jsonl" in str(e)
    stats = json.loads((out / "stats.json").read_text())
    verdicts = read(out / "judge_verdicts.jsonl")
    assert len(verdicts) == 8 * 6 and sum(stats["judge_verdicts"].values()) == 8 * 6 * 2
    assert stats["judge_verdicts"]["unparseable"] == 0 and stats["judge_verdicts"]["A"] and stats["judge_verdicts"]["B"]
    # the verdicts are the judge checkpoint's: its greedy reply, recomputed here, for the first pairs
    model, template = load_checkpoint(judge_folder).eval(), ChatTemplate(judge_folder)
    for v in verdicts[:6]:
        for first, second, key in ((v["answer_i"], v["answer_j"], "verdict_first"),
                                   (v["answer_j"], v["answer_i"], "verdict_swapped")):
            ids = template.prompt([{"role": "user", "content": judge_prompt(v["prompt"], first, second)}])
            with torch.no_grad():
                token = model(torch.tensor([ids]))[0, -1].argmax().item()
            assert parse_verdict(template.tokenizer.decode([token])) == v[key]
    written = read(out / "train.jsonl") + read(out / "validation.jsonl") if (out / "train.jsonl").exists() else []
    rejected = {r["prompt_id"]: r for r in read(out / "rejected.jsonl")}
    assert len(written) + len(rejected) == 8
    by_prompt = {r["provenance"]["prompt_id"]: r for r in written}
    for prompt_id in [f"j{i}" for i in range(8)]:
        mine = [v for v in verdicts if v["prompt_id"] == prompt_id]
        totals: dict = {}
        texts = {}
        for v, score in zip(mine, debiased_scores([v["verdict_first"] for v in mine], [v["verdict_swapped"] for v in mine])):
            texts[v["i"]], texts[v["j"]] = v["answer_i"], v["answer_j"]
            for answer, value in ((v["i"], score), (v["j"], 1 - score)):
                totals.setdefault(answer, []).append(value)
        means = [sum(totals[a]) / len(totals[a]) for a in sorted(totals)]
        if prompt_id in rejected:
            assert rejected[prompt_id]["reason"] == "tie" and rejected[prompt_id]["scores"] == pytest.approx(means)
            assert max(means) == min(means)
            continue
        record = by_prompt[prompt_id]
        p = record["provenance"]
        assert means == pytest.approx(p["scores"]) and len(means) == 4
        best = max(range(4), key=lambda a: (means[a], -a))
        worst = min(range(4), key=lambda a: (means[a], -a))
        assert (record["chosen"], record["rejected"]) == (texts[best], texts[worst]) and means[best] > means[worst]
        assert p["judge"]["model"] == str(judge_folder.resolve()) and p["model"] == str(assets["hf"].resolve())


def test_rephrase_writes_data_stage_documents(assets, engine):
    docs = assets["root"] / "docs.jsonl"
    text = "The river runs through the town. People walk by the river every day and talk about the weather."
    # d0 and d1 are the same document: sampled with the same (content) seed, their rephrasings are
    # equal, and the second is removed
    write_jsonl([{"id": "d0", "text": text}, {"id": "d1", "text": text},
                           {"id": "d2", "text": "A garden needs water and sun. " * 12}], docs)
    config, summary, _ = run_synth(
        assets, engine, "rephrase", mode="rephrase", sampling={"temperature": 1.0, "max_new_tokens": 32},
        rephrase={"inputs": str(docs), "chunk_words": 40}, filters={"gopher_repetition": {"enabled": False}})
    out = config.output_path
    written = read(out / "documents.jsonl")
    chunks = json.loads((out / "stats.json").read_text())["chunks"]
    assert chunks == 1 + 1 + 2  # d2's 72 words in pieces of at most 40: 40 + 32
    rejected = read(out / "rejected.jsonl")
    assert len(written) + len(rejected) == chunks
    assert [r["document_id"] for r in rejected if r["stage"] == "dedup"] == ["d1"]
    assert len({r["text"] for r in written}) == len(written)
    for r in written:
        assert r["source"] == "synthetic" and r["text"].strip()
        assert r["provenance"]["mode"] == "rephrase" and r["provenance"]["document_id"] in {"d0", "d2"}
    # the data stage reads the file as an input
    from raylm.actors.data.document_reader import read_files

    rows = [row for batch in read_files({"file_index": [0], "path": [str(out / "documents.jsonl")], "source": ["synthetic"],
                                         "source_is_set": [False], "format": ["auto"], "text_column": ["text"]},
                                        max_chars=100_000) for row in batch.to_pylist()]
    assert [(r["id"], r["text"]) for r in rows] == [(r["id"], r["text"]) for r in written]
    assert not any(r["reason"] for r in rows)


# ---- library parts, no engine --------------------------------------------------------------------

def test_parse_instruction_and_choose_pair():
    seeds = {synthetic.normalise_instruction(s) for s in SEEDS}
    assert synthetic.parse_instruction(" Name a river in Spain.\nTask 5: more", 3, 20, seeds) == ("Name a river in Spain.", "")
    assert synthetic.parse_instruction(" Name a river. Task 5: x", 2, 20, seeds) == ("Name a river.", "")
    assert synthetic.parse_instruction("\nName a river", 1, 20, seeds) == ("", "empty")
    assert synthetic.parse_instruction(" Hi", 3, 20, seeds) == ("", "too_short")
    assert synthetic.parse_instruction(" " + "word " * 30, 3, 20, seeds) == ("", "too_long")
    assert synthetic.parse_instruction(" write a short POEM about the sun.", 3, 20, seeds) == ("", "copies_seed")
    assert synthetic.choose_pair(["a", "b", "c"], [0.1, 0.9, -0.5]) == (1, 2)
    assert synthetic.choose_pair(["a", "b", "c"], [1.0, 1.0, 1.0]) is None  # a tie
    assert synthetic.choose_pair(["same", "same "], [1.0, 0.0]) == (0, 1)  # the same text: similar_answers' call
    assert synthetic.choose_pair(["a"], [1.0]) is None
    assert synthetic.word_chunks("one two three\n\nfour five six seven", 4) == ["one two three", "four five six seven"]
    assert synthetic.word_chunks("a b c d e f", 4) == ["a b c d", "e f"]


def test_similar_answers():
    from raylm.actors.data.minhash_dedup import DedupConfig

    dedup = DedupConfig(ngram=3)
    long = "people in the town like the sea and they talk about it every day when the boats come home"
    assert synthetic.similar_answers("The sea is  blue.", " The sea is blue.", dedup, 0.8) == "identical"
    assert synthetic.similar_answers(long, long.replace("home", "back"), dedup, 0.8) == "near_identical"  # J = 16/18
    assert synthetic.similar_answers(long, long.replace("home", "back"), dedup, 1.0) == ""
    assert synthetic.similar_answers("The sea is blue.", "The SEA is blue!", dedup, 1.0) == "near_identical"  # same shingles
    assert synthetic.similar_answers(long, "a garden needs water and sun every single day", dedup, 0.8) == ""
    # preferences: a short answer passes the filters as a curated text does (no quality rules), not bad words
    filters = synth.Config(filters={"bad_words": {"words": ["volcano"]}}).filters
    pairs = ["What is 51 - 29?\n\nAnswer: 22", "What is a volcano?\n\nA mountain."]
    assert synthetic.filter_reasons(pairs, filters, quality=False) == ["", "bad_words"]
    assert synthetic.filter_reasons(pairs, filters)[0].startswith("gopher_")


def test_judged_scores_position_swap():
    # one prompt, answers 0, 1, 2; pairs (0,1), (0,2), (1,2), each judged first-shown-first then swapped
    verdicts = ["A", "B",      # (0,1): 0 wins in both orders
                "A", "A",      # (0,2): the judge always says A: position bias, 0.5 each
                None, "A"]     # (1,2): only the swapped order parses: 2 shown first wins
    assert synthetic.judged_scores([3], verdicts) == [[0.75, 0.0, 0.75]]
    assert synthetic.judged_scores([2], [None, None]) == [[0.5, 0.5]]  # nothing parseable: a tie
    assert synthetic.answer_pairs([2, 3]) == [(0, 0, 1), (1, 0, 1), (1, 0, 2), (1, 1, 2)]


def test_duplicate_rows_reuse_the_data_stage_dedup(tmp_path):
    from raylm.actors.data.minhash_dedup import DedupConfig

    base = "the quick brown fox jumps over the lazy dog near the old river bank today"
    texts = [base, "a completely different sentence about gardens and rain in the city", base,
             base.replace("today", "tonight"), "another unrelated line of text about the moon and the stars"]
    removed, stats = synthetic.duplicate_rows(texts, DedupConfig(ngram=3, jaccard_threshold=0.5), tmp_path)
    assert removed == [2, 3] and stats["exact_duplicates_removed"] == 1 and stats["near_duplicates_removed"] == 1
    assert synthetic.duplicate_rows(texts, DedupConfig(exact=False, near=False), tmp_path)[0] == []


def test_bad_inputs_are_named(assets, tmp_path):
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"instruction": "ok task here"}\n{"response": "no instruction"}\n')
    config = synth.Config(engine={"checkpoint": str(assets["hf"])}, instructions={"seeds": str(bad)})
    with pytest.raises(ConfigError, match=r"instructions.seeds: .*seeds.jsonl:2: key 'instruction' is missing"):
        synth.check(config, "c.yaml")
    with pytest.raises(ConfigError, match="instructions.seeds: required"):
        synth.check(synth.Config(engine={"checkpoint": str(assets["hf"])}), "c.yaml")
    with pytest.raises(ConfigError, match="engine.checkpoint: required"):
        synth.check(synth.Config(instructions={"seeds": str(assets["seeds"])}), "c.yaml")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Name a river."}\n')
    config = synth.Config(mode="preferences", engine={"checkpoint": str(assets["hf"])},
                          preferences={"prompts": str(prompts), "scorer": "reward_model",
                                       "reward_model": str(assets["hf"])})
    with pytest.raises(ConfigError, match="preferences.reward_model: .* is not a reward model"):
        synth.check(config, "c.yaml")
    judged = synth.Config(mode="preferences", engine={"checkpoint": str(assets["hf"])},
                          preferences={"prompts": str(prompts), "scorer": "judge", "judge_checkpoint": str(tmp_path)})
    with pytest.raises(ConfigError, match="preferences.judge_checkpoint: .* has no config.json"):
        synth.check(judged, "c.yaml")


def test_mix_by_weight_counts_by_source(tmp_path):
    human, synth_file = tmp_path / "human.jsonl", tmp_path / "synthetic.jsonl"
    write_jsonl([{"prompt": f"h{i}", "response": "r"} for i in range(30)], human)
    write_jsonl([{"prompt": f"s{i}", "response": "r", "provenance": {"mode": "instructions"}}
                           for i in range(7)], synth_file)
    sources = [{"name": "human", "path": str(human), "weight": 0.7}, {"name": "synthetic", "path": str(synth_file),
                                                                        "weight": 0.3}]
    mixed, counts = synthetic.mix_records(sources, 100, seed=0)
    by_source = Counter(r["mix_source"] for r in mixed)
    assert by_source == Counter({"human": 70, "synthetic": 30}) == Counter(counts)
    # the small synthetic set is repeated whole 4 times and sampled for the rest: every record at least 4 times
    assert Counter(r["prompt"] for r in mixed if r["mix_source"] == "synthetic").most_common()[-1][1] >= 4
    assert all("provenance" in r for r in mixed if r["mix_source"] == "synthetic")
    assert synthetic.mix_counts([10, 10, 10], [1, 1, 1], 10) == [4, 3, 3]
