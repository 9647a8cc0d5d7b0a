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
from nanochat_hf.evaluation.core import centered, evaluate_core, evaluate_task
from tests.core_fixtures import CORE_LABELS, CORE_MANIFEST, write_bundle, write_bundle_zip

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
