"""Small eval bundles in the format of nanochat's eval_bundle.zip, written by the tests themselves.

`write_bundle(root)` writes ``root/eval_bundle/{core.yaml, eval_meta_data.csv, eval_data/<uri>}`` for the 22 CORE
tasks (labels, task types, shot counts, continuation delimiters and random baselines as in the real bundle) with a
few synthetic items each. The items exercise what makes CORE scoring subtle: choices that share leading words
(the span starts after the common token prefix), numeric and one-letter choices, schema options that differ before
a shared continuation, LM contexts with stray whitespace, and the "\\nAnswer: " delimiter.
"""

from __future__ import annotations

import csv
import json
import random
import zipfile
from pathlib import Path

import yaml

MC, SCHEMA, LM = "multiple_choice", "schema", "language_modeling"
ANSWER = "\nAnswer: "

# label, dataset_uri, type, shots, delimiter, random baseline (percent)
CORE_MANIFEST = [
    ("hellaswag_zeroshot", "language_understanding/hellaswag.jsonl", MC, 0, " ", 25.0),
    ("jeopardy", "world_knowledge/jeopardy_all.jsonl", LM, 10, ANSWER, 0.0),
    ("bigbench_qa_wikidata", "world_knowledge/bigbench_qa_wikidata.jsonl", LM, 10, " ", 0.0),
    ("arc_easy", "world_knowledge/arc_easy.jsonl", MC, 10, ANSWER, 25.0),
    ("arc_challenge", "world_knowledge/arc_challenge.jsonl", MC, 10, ANSWER, 25.0),
    ("copa", "commonsense_reasoning/copa.jsonl", MC, 0, " ", 50.0),
    ("commonsense_qa", "commonsense_reasoning/commonsense_qa.jsonl", MC, 10, " ", 20.0),
    ("piqa", "commonsense_reasoning/piqa.jsonl", MC, 10, ANSWER, 50.0),
    ("openbook_qa", "commonsense_reasoning/openbook_qa.jsonl", MC, 0, " ", 25.0),
    ("lambada_openai", "language_understanding/lambada_openai.jsonl", LM, 0, " ", 0.0),
    ("hellaswag", "language_understanding/hellaswag.jsonl", MC, 10, " ", 25.0),
    ("winograd", "language_understanding/winograd_wsc.jsonl", SCHEMA, 0, " ", 50.0),
    ("winogrande", "language_understanding/winogrande.jsonl", SCHEMA, 0, " ", 50.0),
    ("bigbench_dyck_languages", "symbolic_problem_solving/bigbench_dyck_languages.jsonl", LM, 10, " ", 0.0),
    ("agi_eval_lsat_ar", "symbolic_problem_solving/agi_eval_lsat_ar.jsonl", MC, 3, " ", 20.0),
    ("bigbench_cs_algorithms", "symbolic_problem_solving/bigbench_cs_algorithms.jsonl", LM, 10, " ", 0.0),
    ("bigbench_operators", "symbolic_problem_solving/bigbench_operators.jsonl", LM, 10, " ", 0.0),
    ("bigbench_repeat_copy_logic", "symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl", LM, 10, " ", 0.0),
    ("squad", "reading_comprehension/squad.jsonl", LM, 10, " ", 0.0),
    ("coqa", "reading_comprehension/coqa.jsonl", LM, 0, " ", 0.0),
    ("boolq", "reading_comprehension/boolq.jsonl", MC, 10, ANSWER, 62.0),
    ("bigbench_language_identification", "language_understanding/bigbench_language_identification.jsonl", MC, 10,
     " ", 9.1),
]
CORE_LABELS = [row[0] for row in CORE_MANIFEST]

_WORDS = ("river stone light paper garden window cloud seven market winter yellow silver table doctor music "
          "engine forest letter ocean number planet bridge candle mirror").split()


def _phrase(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def _mc_item(rng: random.Random, label: str) -> dict:
    if label == "agi_eval_lsat_ar":
        letters = list("ABCDE")
        options = "\n".join(f"{c}. {_phrase(rng, 3)}" for c in letters)
        return {"query": f"Q: which {_phrase(rng, 2)}?\n{options}\nA:", "choices": letters, "gold": rng.randrange(5)}
    if label == "boolq":
        return {"query": f"Passage: {_phrase(rng, 8)}.\nQuestion: is the {_phrase(rng, 2)}?",
                "choices": ["no", "yes"], "gold": rng.randrange(2)}
    if label == "commonsense_qa":  # numeric choices: the token after the delimiter's space starts with a digit
        choices = [str(rng.randrange(1, 400)) for _ in range(4)]
        choices = list(dict.fromkeys(choices)) or ["1"]
        return {"query": f"How many {_phrase(rng, 2)}?", "choices": choices, "gold": rng.randrange(len(choices))}
    shared = _phrase(rng, 2)  # choices that share their first words
    choices = [f"the {shared} {_phrase(rng, rng.randint(1, 4))}." for _ in range(rng.choice([2, 4]))]
    if rng.random() < 0.3:
        choices[0] = _phrase(rng, 3)
    return {"query": f"{_phrase(rng, 6).capitalize()}, then", "choices": choices, "gold": rng.randrange(len(choices))}


def _schema_item(rng: random.Random) -> dict:
    stem = _phrase(rng, 5).capitalize()
    options = [f"{stem} because the {w}" for w in rng.sample(_WORDS, 2)]
    return {"context_options": options, "continuation": f"was too {rng.choice(_WORDS)}.", "gold": rng.randrange(2)}


def _lm_item(rng: random.Random, label: str) -> dict:
    if label == "bigbench_operators":
        a, b = rng.randrange(100), rng.randrange(100)
        return {"context": f"{a} op {b} =", "continuation": str(a + b)}
    if label == "bigbench_dyck_languages":
        return {"context": "Complete the sequence: [ ( { } ", "continuation": ") ]"}
    context = f"  {_phrase(rng, 7).capitalize()} {rng.choice(['', ' ', chr(10)])}"  # stray whitespace to trim
    return {"context": context, "continuation": _phrase(rng, rng.randint(1, 3))}


def make_items(label: str, task_type: str, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(f"{label}-{seed}")
    if task_type == MC:
        return [_mc_item(rng, label) for _ in range(n)]
    if task_type == SCHEMA:
        return [_schema_item(rng) for _ in range(n)]
    return [_lm_item(rng, label) for _ in range(n)]


def write_bundle(root: Path, labels: list[str] | None = None, items_per_task: int = 14, seed: int = 0) -> Path:
    """Write a bundle of the `labels` tasks (default all 22) under `root`; returns ``root/eval_bundle``."""
    bundle = Path(root) / "eval_bundle"
    rows = [r for r in CORE_MANIFEST if labels is None or r[0] in labels]
    entries, written = [], set()
    for label, uri, task_type, shots, delim, _ in rows:
        entry = {"label": label, "dataset_uri": uri, "num_fewshot": [shots], "icl_task_type": task_type}
        if delim != " ":
            entry["continuation_delimiter"] = delim
        entries.append(entry)
        if uri not in written:  # hellaswag and hellaswag_zeroshot share one file, as in the real bundle
            path = bundle / "eval_data" / uri
            path.parent.mkdir(parents=True, exist_ok=True)
            items = make_items(label, task_type, items_per_task, seed)
            path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
            written.add(uri)
    (bundle / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": entries}, sort_keys=False), encoding="utf-8")
    with (bundle / "eval_meta_data.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints", "Random baseline",
                         "Centered Metric?", "Description"])
        for label, _, task_type, shots, _, baseline in CORE_MANIFEST:
            writer.writerow([label, "category", task_type, shots, items_per_task, baseline, "", "synthetic"])
    return bundle


def write_bundle_zip(path: Path, bundle: Path) -> Path:
    """Zip `bundle` the way eval_bundle.zip is laid out (one top-level eval_bundle/ folder)."""
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(bundle.rglob("*")):
            if file.is_file():
                archive.write(file, Path("eval_bundle") / file.relative_to(bundle))
    return path
