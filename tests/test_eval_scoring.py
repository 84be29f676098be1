"""Prefix-tree scoring gives the log-likelihoods of one forward pass per request: answers that share
tokens, answers tokenised against their context the way lm_eval does it, perplexity windows."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from raylm.eval.scoring import build_trees, pack_rows, score_requests
from raylm.models.config import preset
from raylm.models.transformer import Transformer

TASKS = Path(__file__).resolve().parents[1] / "examples" / "tasks"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny forwards: a second thread only adds contention on a shared CPU
    m = Transformer(preset("debug", vocab_size=512, max_seq_len=256))
    m.init_weights(seed=0)
    yield m.eval()
    torch.set_num_threads(threads)


def reference(model, sequences, n_scored):
    out = []
    with torch.no_grad():
        for seq, n in zip(sequences, n_scored):
            if n == 0:  # lm_eval's answer for an empty continuation: nothing scored
                out.append((0.0, True))
                continue
            tokens = torch.tensor([seq])
            logits = model(tokens[:, :-1]).float()[0, -n:]
            targets = tokens[0, -n:]
            out.append((logits.log_softmax(-1).gather(-1, targets[:, None]).sum().item(),
                        bool((logits.argmax(-1) == targets).all())))
    return out


def multiple_choice_requests(rng, n_docs, vocab=512):
    sequences, n_scored = [], []
    for _ in range(n_docs):
        context = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 60))]
        for _ in range(4):
            answer = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 6))]
            sequences.append(context + answer)
            n_scored.append(len(answer))
    return sequences, n_scored


@pytest.mark.parametrize("row_tokens", [16, 128, 256])
def test_tree_scores_equal_one_pass_per_request(model, row_tokens):
    rng = random.Random(row_tokens)
    sequences, n_scored = multiple_choice_requests(rng, 25)
    for _ in range(6):  # perplexity windows: no shared prefix, many scored tokens, up to max_seq_len
        seq = [rng.randrange(3, 512) for _ in range(rng.randint(2, 257))]
        sequences.append(seq)
        n_scored.append(rng.randint(1, len(seq) - 1))
    sequences.append(sequences[0][:])  # an exact duplicate request
    n_scored.append(n_scored[0])
    logprobs, greedy = score_requests(model, sequences, n_scored, row_tokens=row_tokens, batch_tokens=512)
    for (want_lp, want_greedy), lp, g in zip(reference(model, sequences, n_scored), logprobs, greedy):
        assert lp == pytest.approx(want_lp, abs=2e-4)
        assert g == want_greedy
    assert logprobs[-1] == logprobs[0]


def test_greedy_flag_on_a_sequence_the_model_generates(model):
    from raylm.models.generate import SamplingParams, generate

    prompt = [5, 17, 99, 3]
    completion = generate(model, [prompt], SamplingParams(max_new_tokens=6, temperature=0.0))[0]
    completion = [t for t in completion if t != model.config.eos_token_id] or completion[:1]
    wrong = [(completion[0] + 1) % 512 or 3] + completion[1:]
    _, greedy = score_requests(model, [prompt + completion, prompt + wrong], [len(completion), len(wrong)])
    assert greedy == [True, False]


def test_answers_share_their_prompt_once():
    sequences, n_scored = multiple_choice_requests(random.Random(0), 10)
    trees = build_trees(sequences, n_scored)
    assert len(trees) == 10 and all(len(t.branches) == 4 for t in trees)
    assert sum(t.n_tokens for t in trees) < sum(len(s) - 1 for s in sequences)
    rows = pack_rows(trees, 64)
    assert sorted(id(t) for row in rows for t in row) == sorted(id(t) for t in trees)
    assert all(sum(t.n_tokens for t in row) <= max(64, max(t.n_tokens for t in row)) for row in rows)


def test_bad_requests_are_refused(model):
    with pytest.raises(ValueError, match="need 0 <= n_scored < len"):
        score_requests(model, [[1, 2, 3]], [3])
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        score_requests(model, [list(range(3, 300))], [1])


def assert_same_as_reference(model, sequences, n_scored, **kwargs):
    logprobs, greedy = score_requests(model, sequences, n_scored, **kwargs)
    for (want_lp, want_greedy), lp, g in zip(reference(model, sequences, n_scored), logprobs, greedy):
        assert lp == pytest.approx(want_lp, abs=2e-4)
        assert g == want_greedy


def test_answers_that_begin_alike_share_their_tokens(model):
    context = [7, 8, 9, 10, 11]
    answers = [
        [40, 41, 42, 43], [40, 41, 42, 50], [40, 41], [40, 41, 42, 43],  # shared starts, one a prefix, a duplicate
        [60], [61], [40],  # one-token answers: only the context's last output is read
    ]
    sequences, n_scored = [context + a for a in answers], [len(a) for a in answers]
    (tree,) = build_trees(sequences, n_scored)
    # Inputs are each answer without its last token: 40 41 42 / 40 41 42 / 40 / 40 41 42 / - / - / -.
    assert tree.tokens == [40, 41, 42] and tree.n_tokens == len(context) + 3
    for row_tokens in (8, 64):  # the tree alone in a row wider than asked, or beside padding
        assert_same_as_reference(model, sequences, n_scored, row_tokens=row_tokens)
    # Several questions per row, answers sharing tokens, perplexity-like requests beside them.
    rng = random.Random(7)
    sequences, n_scored = [], []
    for _ in range(12):
        context = [rng.randrange(3, 512) for _ in range(rng.randint(1, 40))]
        stem = [rng.randrange(3, 512) for _ in range(rng.randint(0, 4))]
        for _ in range(4):
            answer = stem[: rng.randint(0, len(stem))] + [rng.randrange(3, 512) for _ in range(rng.randint(1, 4))]
            sequences.append(context + answer)
            n_scored.append(len(answer))
    sequences.append([rng.randrange(3, 512) for _ in range(100)])
    n_scored.append(99)
    assert_same_as_reference(model, sequences, n_scored, row_tokens=128, batch_tokens=256)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from test_eval_fixtures import build_checkpoint, build_tokenizer

    root = tmp_path_factory.mktemp("eval-scoring")
    return build_checkpoint(root / "checkpoint", build_tokenizer(root / "tokenizer.json"), seed=0)


@pytest.fixture(scope="module")
def encoder(checkpoint):
    from raylm.eval.requests import Encoder

    return Encoder(str(checkpoint))


def test_encoder_runs_a_raylm_tokenizer_as_transformers_does(checkpoint, encoder, tmp_path):
    """A raylm checkpoint's tokenizer is run by the `tokenizers` library itself, so the driver need not
    import transformers: the same ids for every context, answer and document of the shipped tasks
    (few-shot contexts included), the same prefix token and the same decoded text as
    transformers.AutoTokenizer. A tokenizer_config that sets anything more goes through transformers."""
    import shutil

    import transformers

    from raylm.eval.tasks import load_task
    from raylm.eval.requests import Encoder

    reference = transformers.AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    assert encoder.tokenizer is None  # the direct path
    assert encoder.prefix_token_id == reference.bos_token_id
    texts = []
    for yaml_file in sorted(TASKS.glob("*.yaml")):
        task = load_task(str(yaml_file), 60)
        if task.output_type == "multiple_choice":
            for context in task.contexts(0) + task.contexts(3):
                texts += [context] + [context + task.target_delimiter + c for c in task.choices(task.eval_docs[0])]
        elif task.output_type == "loglikelihood_rolling":
            texts += [task.text(doc) for doc in task.eval_docs]
        else:
            texts += task.contexts(2) + [task.target_text(doc) for doc in task.eval_docs]
    assert len(texts) > 500
    ids = [encoder.encode(t) for t in texts]
    assert ids == [reference.encode(t) for t in texts]
    specials = [reference.bos_token_id, reference.eos_token_id, reference.pad_token_id]
    for t in ids[::7]:
        with_specials = specials[:1] + t + specials[1:]
        assert encoder.decode(with_specials) == reference.decode(with_specials, skip_special_tokens=True)

    custom = tmp_path / "custom"
    custom.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(checkpoint / name, custom / name)
    settings = json.loads((checkpoint / "tokenizer_config.json").read_text())
    (custom / "tokenizer_config.json").write_text(json.dumps({**settings, "add_bos_token": True}))
    assert Encoder(str(custom)).tokenizer is not None  # not known to be plain: transformers runs it


def test_answers_tokenised_across_the_context_boundary(model, encoder):
    """lm_eval tokenises context + answer whole and gives the answer what follows the context's own
    tokens: an answer can merge with the context's end, or vanish into it (then it scores 0)."""
    pairs = [
        ("Function: os.pa", ["th.join", "th.split", "th", "thlib.Path"]),  # merges with the context's "pa"
        ("Answer: ", ["yes", "yes please", "no"]),  # the trailing space moves to the answers
        ("return a lis", ["t", "ts", "t of values"]),  # "t" merges whole into the context: nothing to score
        ("Docstring: Return the path.\nFunction:", [" os.path.join", " os.path.split", " os.getcwd"]),
    ]
    sequences, n_scored, merged, empty = [], [], 0, 0
    for context, answers in pairs:
        for answer in answers:
            ctx, cont = encoder.encode_pair(context, answer)
            merged += ctx + cont != encoder.encode(context + answer)
            empty += not cont
            sequences.append(ctx + cont)
            n_scored.append(len(cont))
    assert merged and empty  # the cases this test is about occur
    assert_same_as_reference(model, sequences, n_scored)
