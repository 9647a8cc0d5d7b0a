"""CORE from an eval bundle: bundle parsing and download, and the batched scorer against an independent statement of
nanochat's one-example-at-a-time scoring (nanochat-spec.md §5.1) on a real tiny checkpoint."""

import functools
import http.server
import json
import random
import threading

import pytest
import torch
import torch.nn.functional as F
from jinja2 import Template
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanochat_hf.evaluation import bundle as bundle_mod
from nanochat_hf.evaluation.bundle import EvalBundleError, load_core_tasks, load_task_data, resolve_bundle
from nanochat_hf.evaluation.core import (
    ScoringRequest,
    centered,
    evaluate_core,
    evaluate_task,
    score_requests,
    shared_prefix_length,
)
from tests.core_fixtures import CORE_LABELS, CORE_MANIFEST, write_bundle, write_bundle_zip
from tests.test_modeling import builtin_twin

# one task of each type, delimiter and choice shape (shared leading words, digits, letters, schema, LM)
SAMPLE_TASKS = ["hellaswag", "arc_easy", "commonsense_qa", "agi_eval_lsat_ar", "winograd", "jeopardy",
                "lambada_openai", "bigbench_operators"]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return write_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, trust_remote_code=True).eval()
    return model, AutoTokenizer.from_pretrained(tiny_checkpoint)


# ---------------------------------------------------------------------------------------------------------------
# The bundle


def test_bundle_lists_the_22_core_tasks_with_their_settings(bundle_dir):
    tasks = load_core_tasks(bundle_dir)
    assert [t.label for t in tasks] == CORE_LABELS
    by_label = {t.label: t for t in tasks}
    for label, uri, task_type, shots, delimiter, baseline in CORE_MANIFEST:
        t = by_label[label]
        assert (t.dataset_uri, t.task_type, t.num_fewshot, t.continuation_delimiter, t.random_baseline) == (
            uri, task_type, shots, delimiter, baseline)


def test_pool_is_nanochats_shuffle_then_crop(bundle_dir):
    task = next(t for t in load_core_tasks(bundle_dir) if t.label == "arc_easy")
    raw = [json.loads(line) for line in (bundle_dir / "eval_data" / task.dataset_uri).read_text().splitlines()]
    random.Random(1337).shuffle(raw)
    data, num_eval = load_task_data(bundle_dir, task, max_per_task=-1)
    assert (data, num_eval) == (raw, len(raw))
    data, num_eval = load_task_data(bundle_dir, task, max_per_task=12)
    assert (data, num_eval) == (raw[:12], 12)
    # a crop below the shot count keeps enough items to draw 10 shots from, but evaluates only the first 3
    data, num_eval = load_task_data(bundle_dir, task, max_per_task=3)
    assert (data, num_eval) == (raw[:11], 3)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: (b / "core.yaml").write_text("icl_tasks: []\n"), "non-empty 'icl_tasks'"),
        (lambda b: (b / "core.yaml").write_text((b / "core.yaml").read_text().replace("schema", "cloze")),
         "icl_task_type 'cloze'"),
        (lambda b: (b / "eval_meta_data.csv").write_text("Eval Task,Random baseline\njeopardy,0\n"),
         "no 'Random baseline' row for 'hellaswag_zeroshot'"),
        (lambda b: (b / "eval_data" / "reading_comprehension" / "squad.jsonl").unlink(), "squad.jsonl does not exist"),
    ],
)
def test_a_damaged_bundle_is_named_in_the_error(tmp_path, damage, message):
    bundle = write_bundle(tmp_path, items_per_task=12)
    damage(bundle)
    with pytest.raises(EvalBundleError, match=message):
        load_core_tasks(bundle)


def test_bad_items_and_bad_paths_are_explained(tmp_path, monkeypatch):
    bundle = write_bundle(tmp_path, labels=["copa"], items_per_task=4)
    (bundle / "eval_data" / "commonsense_reasoning" / "copa.jsonl").write_text('{"query": "q", "choices": ["a"]}\n')
    (task,) = load_core_tasks(bundle)
    with pytest.raises(EvalBundleError, match=r"copa.jsonl:1: a multiple_choice item needs \['gold'\]"):
        load_task_data(bundle, task)
    with pytest.raises(EvalBundleError, match="no core.yaml"):
        resolve_bundle(tmp_path / "nowhere")
    monkeypatch.setenv("NANOCHAT_HF_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("NANOCHAT_EVAL_BUNDLE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EvalBundleError, match="NANOCHAT_EVAL_BUNDLE"):
        resolve_bundle()
    assert not (tmp_path / "empty-cache" / "eval_bundle").exists()


def test_first_use_downloads_the_zip_once_then_reads_the_cache(tmp_path, monkeypatch):
    source = write_bundle(tmp_path / "src", labels=["copa", "winograd"], items_per_task=4)
    served = tmp_path / "www"
    served.mkdir()
    write_bundle_zip(served / "eval_bundle.zip", source)
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            hits.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(bundle_mod, "EVAL_BUNDLE_URL", f"http://127.0.0.1:{server.server_port}/eval_bundle.zip")
        monkeypatch.setenv("NANOCHAT_HF_CACHE", str(tmp_path / "cache"))
        monkeypatch.delenv("NANOCHAT_EVAL_BUNDLE", raising=False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        first = resolve_bundle()
        second = resolve_bundle()
    finally:
        server.shutdown()
    assert first == second == tmp_path / "cache" / "eval_bundle"
    assert [t.label for t in load_core_tasks(first)] == ["copa", "winograd"]
    assert len(hits) == 1
    # a local zip works too, unpacked once into the cache
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE", str(served / "eval_bundle.zip"))
    assert [t.label for t in load_core_tasks(resolve_bundle())] == ["copa", "winograd"]


# ---------------------------------------------------------------------------------------------------------------
# nanochat's scoring, restated one example at a time (Jinja templates, one forward per example, loss at every
# position against the rolled inputs), as the oracle for the batched scorer

_SHOTS = "{% for ex in shots %}"
TEMPLATES = {
    "multiple_choice": _SHOTS + "{{ ex.query }}{{ d }}{{ ex.choices[ex.gold] }}\n\n{% endfor %}"
                                "{{ item.query }}{{ d }}{{ option }}",
    "schema": _SHOTS + "{{ ex.context_options[ex.gold] }}{{ d }}{{ ex.continuation }}\n\n{% endfor %}"
                       "{{ option }}{{ d }}{{ item.continuation }}",
    "language_modeling": _SHOTS + "{{ ex.context | trim }}{{ d }}{{ ex.continuation }}\n\n{% endfor %}"
                                  "{{ item.context | trim }}{{ d }}{{ option }}",
}


def reference_correct(model, tokenizer, task, data, idx) -> tuple[bool, float]:
    """(correct, decision margin) for item idx, scored alone as nanochat's core_eval does."""
    item = data[idx]
    shots = []
    if task.num_fewshot:
        pool = [i for i in range(len(data)) if i != idx]
        shots = [data[i] for i in random.Random(1234 + idx).sample(pool, task.num_fewshot)]
    template = Template(TEMPLATES[task.task_type])
    options = {"multiple_choice": item.get("choices"), "schema": item.get("context_options"),
               "language_modeling": ["", item.get("continuation")]}[task.task_type]
    prompts = [template.render(shots=shots, d=task.continuation_delimiter, item=item, option=o) for o in options]
    bos = tokenizer.bos_token_id
    tokens = [[bos] + tokenizer.encode(p, add_special_tokens=False, split_special_tokens=True) for p in prompts]
    if task.task_type == "language_modeling":
        without = [bos] + tokenizer.encode(prompts[0].strip(), add_special_tokens=False, split_special_tokens=True)
        assert tokens[1][: len(without)] == without
        tokens, starts = [tokens[1]], [len(without)]
    elif task.task_type == "multiple_choice":
        n = 0
        while all(len(t) > n for t in tokens) and len({t[n] for t in tokens}) == 1:
            n += 1
        starts = [n] * len(tokens)
    else:
        n = 0
        while all(len(t) > n for t in tokens) and len({t[-1 - n] for t in tokens}) == 1:
            n += 1
        starts = [len(t) - n for t in tokens]
    width = max(len(t) for t in tokens)
    ids = torch.tensor([t + [bos] * (width - len(t)) for t in tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    targets = torch.roll(ids, -1, dims=1)
    losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    predictions = logits.argmax(-1)
    if task.task_type == "language_modeling":
        s, e = starts[0], len(tokens[0])
        return bool(torch.equal(predictions[0, s - 1 : e - 1], ids[0, s:e])), float("inf")
    means = [losses[i, s - 1 : len(t) - 1].mean().item() for i, (s, t) in enumerate(zip(starts, tokens, strict=True))]
    ranked = sorted(means)
    return means.index(min(means)) == item["gold"], ranked[1] - ranked[0]


def test_batched_scorer_matches_nanochats_one_at_a_time_scoring(bundle_dir, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    tasks = {t.label: t for t in load_core_tasks(bundle_dir)}
    compared = 0
    for label in SAMPLE_TASKS:
        task = tasks[label]
        data, num_eval = load_task_data(bundle_dir, task, max_per_task=4)
        batched = evaluate_task(model, tokenizer, task, data, num_eval, batch_size=4)
        for idx in range(num_eval):
            correct, margin = reference_correct(model, tokenizer, task, data, idx)
            if margin > 1e-4:  # a near tie may legitimately flip under a different float summation order
                assert batched[idx] == correct, f"{label} item {idx}"
                compared += 1
    assert compared >= 0.9 * 4 * len(SAMPLE_TASKS)


def test_evaluate_core_reports_centered_accuracy_and_their_mean(bundle_dir, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    labels = ["copa", "winogrande", "coqa"]
    out = evaluate_core(model, tokenizer, bundle_dir, max_per_task=4, tasks=labels, batch_size=8)
    assert list(out["results"]) == labels and out["examples"] == dict.fromkeys(labels, 4)
    baselines = {row[0]: row[5] for row in CORE_MANIFEST}
    for label in labels:
        assert out["centered_results"][label] == pytest.approx(centered(out["results"][label], baselines[label]))
        assert out["centered_results"][label] == pytest.approx(
            (out["results"][label] - baselines[label] / 100) / (1 - baselines[label] / 100))
    assert out["core_metric"] == pytest.approx(sum(out["centered_results"].values()) / 3)
    with pytest.raises(ValueError, match="unknown CORE task"):
        evaluate_core(model, tokenizer, bundle_dir, tasks=["mmlu"])


# ---------------------------------------------------------------------------------------------------------------
# The scorer's arithmetic: shared prefixes on a KV cache and logits only where a span needs them, against each
# sequence run alone through the model's plain forward


def synthetic_requests(seed: int, vocab: int = 300) -> list[ScoringRequest]:
    """Multiple-choice requests whose shared prefixes (1 to 60 tokens) cross the tiny models' 8-token short
    window, options of ragged lengths, a schema request (shared suffix), LM requests (one sequence, some of them
    the model's own greedy continuation, filled in by the test), and options that part right after BOS (shared
    prefix 0)."""
    gen = random.Random(seed)
    tokens = lambda n: [gen.randrange(1, vocab) for _ in range(n)]  # noqa: E731
    requests = []
    for prefix_len in (1, 7, 9, 23, 41, 60):
        prefix = [0, *tokens(prefix_len)]
        options = [prefix + tokens(gen.randint(1, 9)) for _ in range(gen.randint(2, 5))]
        requests.append(ScoringRequest("multiple_choice", options, [len(prefix)] * len(options),
                                       [len(o) for o in options], gold=0))
    parted = [[0, *tokens(gen.randint(2, 6))] for _ in range(3)]
    requests.append(ScoringRequest("multiple_choice", parted, [1] * 3, [len(o) for o in parted], gold=1))
    suffix = tokens(4)
    contexts = [[0, *tokens(gen.randint(5, 30)), *suffix] for _ in range(3)]
    requests.append(ScoringRequest("schema", contexts, [len(c) - 4 for c in contexts], [len(c) for c in contexts],
                                   gold=2))
    for length in (12, 30, 50):
        seq = [0, *tokens(length)]
        requests.append(ScoringRequest("language_modeling", [seq], [length - 5], [len(seq)]))
    return requests


def alone(model, request: ScoringRequest) -> tuple[list[float], bool]:
    """Per-option mean span loss and the greedy check of option 0, each sequence in its own unpadded forward."""
    means, greedy = [], []
    for seq, s, e in zip(request.sequences, request.starts, request.ends, strict=True):
        logits = model(torch.tensor([seq])).logits[0]
        target = torch.tensor(seq[s:e])
        means.append(F.cross_entropy(logits[s - 1 : e - 1], target).item())
        greedy.append(torch.equal(logits[s - 1 : e - 1].argmax(-1), target))
    return means, greedy[0]


def with_greedy_continuations(model, requests: list[ScoringRequest]) -> None:
    """Make the first LM request's continuation the model's own greedy one, so that its verdict is True."""
    lm = next(r for r in requests if r.task_type == "language_modeling")
    seq = lm.sequences[0][: lm.starts[0]]
    with torch.no_grad():
        for _ in range(lm.ends[0] - lm.starts[0]):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    lm.sequences[0] = seq


@pytest.mark.parametrize("generation", ["2025", "2026"])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_shared_prefix_scores_equal_each_sequence_run_alone(tiny_model_factory, generation, batch_size):
    model = tiny_model_factory(generation, seed=3)
    requests = synthetic_requests(seed=4)
    with_greedy_continuations(model, requests)
    assert {shared_prefix_length(r) for r in requests} >= {0, 1, 60}
    with torch.no_grad():
        results = score_requests(model, requests, batch_size=batch_size, pad_token_id=0)
        expected = [alone(model, r) for r in requests]
    for r, res, (means, greedy) in zip(requests, results, expected, strict=True):
        if r.task_type == "language_modeling":
            assert res.correct == greedy
        else:
            torch.testing.assert_close(torch.tensor(res.scores), torch.tensor(means), atol=1e-4, rtol=1e-4)
            assert res.prediction == means.index(min(means))
    assert [res.correct for r, res in zip(requests, results, strict=True) if r.task_type == "language_modeling"] \
        == [True, False, False]  # the greedy continuation, and two random ones


def test_any_causal_lm_is_scored_in_full_with_the_same_numbers(tiny_model_factory):
    # transformers' own NanoChat class takes the generic path (each sequence run in full); same weights, same scores
    ours = tiny_model_factory("2025", seed=5)
    twin = builtin_twin(ours)
    requests = synthetic_requests(seed=6)
    with torch.no_grad():
        mine, theirs = score_requests(ours, requests, 4), score_requests(twin, requests, 4)
    for a, b in zip(mine, theirs, strict=True):
        assert a.correct == b.correct and a.prediction == b.prediction
        torch.testing.assert_close(torch.tensor(a.scores), torch.tensor(b.scores), atol=1e-4, rtol=1e-4)


def test_an_empty_span_scores_nan_as_nanochats_mean_does(tiny_model_factory):
    model = tiny_model_factory("2026")
    options = [[0, 5, 6, 7], [0, 5, 6, 8]]
    empty = ScoringRequest("multiple_choice", options, [3, 4], [4, 4], gold=0)  # option 1's span is empty
    with torch.no_grad():
        (res,) = score_requests(model, [empty])
    assert res.scores[1] != res.scores[1] and res.scores[0] == res.scores[0]
    assert res.prediction == 0  # Python's min skips the nan only because it comes second, as in nanochat
    with pytest.raises(ValueError, match="batch_size"):
        score_requests(model, [empty], batch_size=0)
