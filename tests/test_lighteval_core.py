"""CORE through lighteval: the real `lighteval accelerate` command line (offline guards included) on a tiny
checkpoint and a tiny bundle must reach the same per-example verdicts as our batched scorer."""

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from lighteval.models.model_output import ModelResponse
from lighteval.tasks.requests import Doc
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanochat_hf.evaluation import lighteval_core
from nanochat_hf.evaluation.bundle import load_core_tasks, load_task_data
from nanochat_hf.evaluation.core import build_requests, centered, evaluate_task
from tests.core_fixtures import write_bundle

REPO = Path(__file__).resolve().parents[1]
CLI_TASKS = ["hellaswag", "commonsense_qa", "winograd", "jeopardy", "bigbench_operators"]
MAX_PER_TASK = 4


def offline_env(tmp_path: Path, bundle: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NANOCHAT_", "HF_"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"),
               NANOCHAT_EVAL_BUNDLE=str(bundle), NANOCHAT_HF_CACHE=str(tmp_path / "cache"),
               NANOCHAT_CORE_MAX_PER_TASK=str(MAX_PER_TASK), TOKENIZERS_PARALLELISM="false")
    return env


def test_lighteval_cli_runs_core_offline_and_agrees_with_our_scorer(tmp_path, tiny_checkpoint):
    bundle = write_bundle(tmp_path / "bundle")
    shutil.copytree(tiny_checkpoint, tmp_path / "model")  # lighteval may write its cache beside the model
    model_args = ("model_name=model,trust_remote_code=True,batch_size=8,max_length=4096,device=cpu,"
                  f"override_chat_template=False,cache_dir={tmp_path / 'lighteval_cache'}")
    tasks = ",".join(f"core:{label}|0" for label in CLI_TASKS)
    cmd = [sys.executable, "-m", "nanochat_hf.evaluation.lighteval_cli", "accelerate", model_args, tasks,
           "--custom-tasks", str(REPO / "evals" / "core.py"), "--output-dir", str(tmp_path / "out"),
           "--save-details"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=offline_env(tmp_path, bundle), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (results_file,) = glob.glob(str(tmp_path / "out" / "results" / "model" / "*.json"))
    results = json.loads(Path(results_file).read_text())["results"]

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    tasks_by_label = {t.label: t for t in load_core_tasks(bundle)}
    ours_centered = []
    for label in CLI_TASKS:
        task = tasks_by_label[label]
        data, num_eval = load_task_data(bundle, task, MAX_PER_TASK)
        ours = evaluate_task(model, tokenizer, task, data, num_eval, batch_size=8)
        (details,) = glob.glob(str(tmp_path / "out" / "details" / "model" / "*" / f"details_core:{label}|0_*.parquet"))
        frame = pd.read_parquet(details)
        theirs = {int(row["doc"]["id"]): bool(row["metric"]["acc"]) for _, row in frame.iterrows()}
        assert theirs == dict(enumerate(ours)), label
        assert all(row["metric"]["token_mismatch"] == 0 for _, row in frame.iterrows())
        accuracy = sum(ours) / len(ours)
        assert results[f"core:{label}|0"]["acc"] == pytest.approx(accuracy)
        assert results[f"core:{label}|0"]["centered"] == pytest.approx(centered(accuracy, task.random_baseline))
        ours_centered.append(centered(accuracy, task.random_baseline))
    # lighteval's average over the tasks of the run is CORE over those tasks
    assert results["all"]["centered"] == pytest.approx(sum(ours_centered) / len(ours_centered))


def test_fewshot_from_lighteval_is_refused():
    doc = Doc(query="q", choices=["a"], gold_index=0, specific={"task_type": "language_modeling", "gold": None,
              "full": [0], "base": [None], "lengths": [1], "exact": True}, task_name="core:x|3")
    response = ModelResponse(logprobs=[-1.0], argmax_logits_eq_gold=[True])
    assert lighteval_core.CoreExampleScore().compute(doc, response)["acc"] == 1.0
    doc.fewshot_samples = [doc]
    with pytest.raises(ValueError, match=r"request them with \|0"):
        lighteval_core.CoreExampleScore().compute(doc, response)


def test_metric_turns_full_and_base_logprobs_into_nanochats_mean_loss():
    # two schema options: spans of 2 and 1 tokens; option 1 has the lower mean loss (1.0 < 1.5)
    recipe = {"task_type": "schema", "gold": 1, "full": [0, 2], "base": [1, 3], "lengths": [2, 1], "exact": True}
    doc = Doc(query="", choices=["a", "b", "c", "d"], gold_index=2, specific=recipe, task_name="core:w|0")
    response = ModelResponse(logprobs=[-5.0, -2.0, -4.0, -3.0], argmax_logits_eq_gold=[False] * 4)
    assert lighteval_core.CoreExampleScore().compute(doc, response)["acc"] == 1.0
    recipe["gold"] = 0
    assert lighteval_core.CoreExampleScore().compute(doc, response)["acc"] == 0.0


def test_tokenizer_is_found_from_the_command_line_or_explained(tmp_path, monkeypatch, tiny_checkpoint):
    parse = lighteval_core._model_args_from_argv
    assert parse(["lighteval", "accelerate", "model_name=a/b,generation_parameters={x:1,y:2},tokenizer=c"]) == {
        "model_name": "a/b", "tokenizer": "c"}
    config = tmp_path / "model.yaml"
    config.write_text("model_parameters:\n  model_name: some/model\n")
    assert parse(["lighteval", "accelerate", str(config), "core|0"]) == {"model_name": "some/model"}
    monkeypatch.setattr(lighteval_core, "_tokenizer", None)
    monkeypatch.delenv(lighteval_core.TOKENIZER_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", ["python"])
    with pytest.raises(RuntimeError, match="NANOCHAT_CORE_TOKENIZER"):
        lighteval_core.resolve_tokenizer()
    monkeypatch.setenv(lighteval_core.TOKENIZER_ENV, str(tiny_checkpoint))
    assert lighteval_core.resolve_tokenizer().bos_token == "<|bos|>"


def test_task_table_has_one_core_task_per_bundle_task(tmp_path, monkeypatch, tiny_checkpoint):
    bundle = write_bundle(tmp_path / "bundle", labels=["copa", "winograd", "squad"], items_per_task=12)
    monkeypatch.setenv("NANOCHAT_HF_CACHE", str(tmp_path / "cache"))
    table = lighteval_core.core_tasks_table(bundle, limit=5)
    assert [t.name for t in table] == ["core:copa", "core:winograd", "core:squad"]
    rows = (Path(table[0].hf_repo) / "items.jsonl").read_text().splitlines()
    assert [json.loads(r)["index"] for r in rows] == list(range(5))
    # the prompt function's Doc scores exactly nanochat's tokens
    lighteval_core.set_tokenizer(str(tiny_checkpoint))
    try:
        doc = table[1].prompt_function({"index": 2}, "core:winograd|0")
        tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
        task = load_core_tasks(bundle)[1]
        data, _ = load_task_data(bundle, task, 5)
        (request,) = build_requests(task, data, tokenizer, [2])
        spans = [e - s for s, e in zip(request.starts, request.ends, strict=True)]
        assert doc.specific["exact"] and doc.specific["lengths"] == spans
    finally:
        lighteval_core.set_tokenizer(None)
