"""Token n-gram decontamination read straight from token shards, planted overlaps found exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from raylm.eval.decontamination import contaminated_items, ngram_hashes
from raylm.data.token_shards import TokenShardWriter, write_index

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shard files of random documents, with three eval items planted: one inside a document, one
    opening the second shard file, one (in part) at the end of the stream."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("shards")
    items = [rng.integers(3, 5000, size=20).tolist() for _ in range(6)]
    writer = TokenShardWriter(folder, "train", vocab_size=5000, eos_token_id=2, shard_tokens=3000)
    docs = [rng.integers(3, 5000, size=int(rng.integers(50, 400))) for _ in range(40)]
    docs[3] = np.concatenate([docs[3][:10], items[0], docs[3][10:]])  # planted whole
    docs[-1] = np.concatenate([docs[-1], items[2][:15]])  # only 15 of its 20 tokens, at the end
    written, planted = 0, False
    for doc in docs:
        if written >= 3000 and not planted:  # the writer started its second file
            doc, planted = np.concatenate([items[1], doc]), True
        writer.add(doc)
        written += len(doc) + 1
    entries = writer.close()
    assert len(entries) >= 2
    write_index(folder, 5000, 2, {"train": entries})
    return folder, items


def test_planted_items_are_found_across_shard_and_chunk_edges(shards):
    folder, items = shards
    short = items[5][:7]
    for chunk in (1 << 20, 100, 27):  # small chunks: n-grams must survive chunk edges
        result = contaminated_items(items[:5] + [short], folder, n=13, chunk_tokens=chunk)
        assert result == [True, True, True, False, False, None], chunk
    # Item 2 shares only its first 15 tokens: a 16-gram no longer matches.
    assert contaminated_items([items[2]], folder, n=16) == [False]


def test_ngram_hashes_are_positional():
    a = ngram_hashes(np.array([5, 6, 7, 8]), 2)
    assert len(a) == 3 and len(set(a.tolist())) == 3
    assert ngram_hashes(np.array([6, 5]), 2)[0] != a[0]  # order matters
    assert len(ngram_hashes(np.array([1, 2]), 3)) == 0


# ---- the report `raylm eval` writes, against shards made from text ------------------------------
def test_eval_report_flags_items_planted_in_token_shards(tmp_path):
    from tokenizers import Tokenizer

    from raylm.config import ConfigError
    from raylm.eval.tasks import load_task
    from raylm.eval.decontamination import check_decontamination, decontamination_report
    from raylm.pipelines.eval import DecontaminationConfig, TaskRef
    from test_eval_fixtures import build_tokenizer

    tasks_dir = Path(__file__).resolve().parents[1] / "examples" / "tasks"
    ref = TaskRef(path=str(tasks_dir / "stdlib_docstring_mc.yaml"), limit=30)
    task = load_task(ref.path, ref.limit)
    out = tmp_path / "data"
    tokenizer_file = build_tokenizer(tmp_path / "tokenizer.json")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    writer = TokenShardWriter(out / "tokens", "train", vocab_size=tokenizer.get_vocab_size(), eos_token_id=2)
    training = ["An unrelated training document about widgets and geometry managers."] * 3
    planted = [3, 17]  # two eval items' docstrings (with the answer) appear in the training text
    for d in planted:
        doc = task.eval_docs[d]
        training.insert(1, f"Some preamble. {task.text(doc)} {task.target_text(doc)} And more after it.")
    for text in training:
        writer.add(tokenizer.encode(text, add_special_tokens=False).ids)
    write_index(out / "tokens", tokenizer.get_vocab_size(), 2, {"train": writer.close()})
    # 20 tokens: with this 512-token vocabulary 13 tokens are ~25 characters, which the prompt
    # template and a shared module path span ("data.\nFunction: xml.sax."): real, but not planted.
    cfg = DecontaminationConfig(shard_dirs=[str(out / "tokens")], ngram=20)
    with pytest.raises(ConfigError, match=r"decontamination.shard_dirs.0: .*no tokenizer.json"):
        check_decontamination(cfg, "eval.yaml")
    (out / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())  # where `raylm data` puts it
    check_decontamination(cfg, "eval.yaml")
    report = decontamination_report([(ref, task)], cfg)["stdlib_docstring_mc"]
    assert report["contaminated"] == 2 and report["n_items"] == 30
    assert sorted(report["examples"]) == sorted(task.eval_docs[d].where() for d in planted)
