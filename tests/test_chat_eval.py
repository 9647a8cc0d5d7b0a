"""Chat evaluations: nanochat's categorical letter scoring against an independent restatement, the generative tasks
against transformers' own greedy `generate`, GSM8K/HumanEval scoring on scripted completions, the chat-format metrics
on a model wired to end its turns and call the calculator, the CPU tier end to end through `python -m
nanochat_hf.evaluation.evaluate`, and the lighteval custom tasks through the lighteval command line."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanochat_hf.evaluation import chat, evaluate
from nanochat_hf.tasks import load_task
from tests.task_fixtures import HUMANEVAL, write_fixture

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, trust_remote_code=True).eval()
    return model, AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_data")
    for name, repo in (("arc", "allenai/ai2_arc"), ("mmlu", "cais/mmlu"), ("gsm8k", "openai/gsm8k"),
                       ("humaneval", "openai/openai_humaneval")):
        write_fixture(name, root / repo)
    shutil.move(write_fixture("words", root), root / "words_alpha.txt")
    return root


@pytest.fixture(scope="module")
def scripted_checkpoint(tiny_checkpoint, tmp_path_factory):
    """A real NanoChat checkpoint whose greedy reply to any prompt is `<|python_start|>3*4<|python_end|>`, then
    (once the Engine has forced the calculator's output) `<|assistant_end|>`.

    With nanochat's init the attention and MLP output projections are zero, so the final hidden state is the
    normalised embedding of the current token: the model is a bigram table, set here through the embeddings
    (orthogonal for the chain's tokens) and the lm_head rows."""
    from nanochat_hf.training.init_model import build_model, save_atomically

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    torch.manual_seed(0)
    model = build_model(tokenizer, depth=2, generation="2026", head_dim=32, max_position_embeddings=256)
    special = tokenizer.convert_tokens_to_ids
    chain = [special("<|assistant_start|>"), special("<|python_start|>"),
             *tokenizer.encode("3*4", add_special_tokens=False), special("<|python_end|>")]
    successors = dict(zip(chain[:-1], chain[1:], strict=True))
    successors[special("<|output_end|>")] = special("<|assistant_end|>")
    with torch.no_grad():
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        head.zero_()
        for axis, (token, after) in enumerate(successors.items()):
            embed[token] = 0.0
            embed[token, axis] = 1.0
            head[after, axis] = 1.0
    return save_atomically(model.eval(), tokenizer, tmp_path_factory.mktemp("scripted") / "checkpoint")


# ---------------------------------------------------------------------------------------------------------------
# Categorical scoring


def test_categorical_scoring_matches_an_independent_restatement(tiny, data_dir):
    """nanochat's rule restated without the chat template, batching or padding: the prompt tokens written out by
    hand (nanochat-spec.md §3.1), one sequence at a time, argmax of the letter tokens' logits at the last position."""
    model, tokenizer = tiny
    special = tokenizer.convert_tokens_to_ids
    rows = [r for name in ("mmlu", "arc_easy", "arc_challenge") for r in chat.hub_eval_set(name, -1, data_dir)]
    rows += list(load_task("arc_easy", "train", data_dir / "allenai/ai2_arc"))  # digit letters, 3 choices
    expected = []
    for row in rows:
        user = row["messages"][0]["content"]
        ids = [special("<|bos|>"), special("<|user_start|>"), *tokenizer.encode(user, add_special_tokens=False),
               special("<|user_end|>"), special("<|assistant_start|>")]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        letter_logits = [logits[tokenizer.convert_tokens_to_ids(letter)].item() for letter in row["letters"]]
        expected.append(row["letters"][letter_logits.index(max(letter_logits))])

    result = chat.evaluate_multiple_choice(model, tokenizer, rows, batch_size=3, details=True)  # padded batches
    assert [item["prediction"] for item in result["items"]] == expected
    correct = [e == r["answer"] for e, r in zip(expected, rows, strict=True)]
    assert result["accuracy"] == pytest.approx(sum(correct) / len(rows)) and result["examples"] == len(rows)
    # an answer key equal to the prediction scores 1, any other 0
    rigged = [{**r, "answer": e} for r, e in zip(rows, expected, strict=True)]
    assert chat.evaluate_multiple_choice(model, tokenizer, rigged, batch_size=len(rows))["accuracy"] == 1.0


def test_multiple_choice_runners_read_the_eval_split_and_crop(tiny, data_dir):
    model, tokenizer = tiny
    run = chat.HUB_CHAT_EVALS["MMLU"]
    result = run(model, tokenizer, max_per_task=2, batch_size=2, data_dir=data_dir, details=True)
    assert result["examples"] == 2
    shuffled = load_task("mmlu", "test", data_dir / "cais/mmlu").shuffle(seed=42)
    assert [i["answer"] for i in result["items"]] == shuffled["answer"][:2]


def test_bad_multiple_choice_input_is_explained(tiny):
    model, tokenizer = tiny
    row = {"messages": [{"role": "user", "content": "Pick one"}], "letters": ["Alpha", "Beta"], "answer": "Alpha"}
    with pytest.raises(chat.ChatEvalError, match="'Alpha' is .* tokens"):
        chat.evaluate_multiple_choice(model, tokenizer, [row])
    with pytest.raises(chat.ChatEvalError, match="no items"):
        chat.evaluate_multiple_choice(model, tokenizer, [])
    with pytest.raises(chat.ChatEvalError, match="no user message"):
        chat.prompt_messages([{"role": "assistant", "content": "hi"}])


# ---------------------------------------------------------------------------------------------------------------
# Generative tasks


def test_generative_tasks_agree_with_transformers_generate(tiny, data_dir):
    """Each generative runner on its fixture: the replies are transformers' greedy decoding (when no tool call
    interferes), and the accuracy is the runner's own scoring of those replies."""
    model, tokenizer = tiny
    stop = tokenizer.convert_tokens_to_ids(["<|assistant_end|>", "<|bos|>"])
    for name, load in (("GSM8K", lambda: chat.hub_eval_set("gsm8k", -1, data_dir)),
                       ("HumanEval", lambda: chat.hub_eval_set("humaneval", -1, data_dir)),
                       ("SpellingBee", lambda: chat.spellingbee_eval_set(3, data_dir))):
        run = chat.HUB_CHAT_EVALS[name]
        result = run(model, tokenizer, max_per_task=3, data_dir=data_dir, max_tokens=12, details=True)
        rows = list(load())[:3]
        assert result["examples"] == len(rows) == len(result["items"]) and rows
        for row, item in zip(rows, result["items"], strict=True):
            (tokens,) = item["tokens"]
            prompt = chat.render_prompt(tokenizer, row["messages"])
            oracle = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=stop,
                                    pad_token_id=stop[1])[0, len(prompt):].tolist()
            if tokenizer.convert_tokens_to_ids("<|python_end|>") not in tokens:  # no calculator output forced
                assert tokens == [t for t in oracle if t not in stop][: len(tokens)]
                assert item["ended"] == [len(oracle) < 12 and oracle[-1] == stop[0]]
        scorer = {"GSM8K": "gsm8k", "HumanEval": "humaneval", "SpellingBee": "spellingbee"}[name]
        rescored = [chat.GENERATIVE_SCORERS[scorer](row, chat.Reply(i["tokens"][0], i["replies"][0],
                                                                    i["ended"][0], False))
                    for row, i in zip(rows, result["items"], strict=True)]
        assert result["accuracy"] == sum(rescored) / len(rows)
        assert 0.0 <= result["ends_turn_rate"] <= 1.0 and ("calculator_rate" in result) == (name == "GSM8K")


def test_gsm8k_reward_on_a_scripted_completion_with_a_tool_call(tiny):
    _, tokenizer = tiny
    special = tokenizer.convert_tokens_to_ids

    def reply(final: str) -> chat.Reply:
        ids = [*tokenizer.encode("3 boxes of 4: ", add_special_tokens=False), special("<|python_start|>"),
               *tokenizer.encode("3*4", add_special_tokens=False), special("<|python_end|>"),
               special("<|output_start|>"), *tokenizer.encode("12", add_special_tokens=False),
               special("<|output_end|>"), *tokenizer.encode(final, add_special_tokens=False)]
        return chat.Reply(ids, tokenizer.decode(ids, skip_special_tokens=False), True, True)

    row = {"answer": "12"}
    assert "<|python_start|>3*4<|python_end|>" in reply("x").text
    assert chat.score_answer(row, reply(" boxes hold 12 eggs.\n#### 12"))
    assert not chat.score_answer(row, reply(" boxes hold 13 eggs.\n#### 13"))
    assert not chat.score_answer(row, reply(" the answer is 12"))  # no "#### N": nanochat counts it wrong
    assert chat.score_answer({"answer": "1250"}, chat.Reply([], "so\n#### 1,250", True, False))


def test_humaneval_runs_programs_in_the_sandbox():
    row = {k: HUMANEVAL["test"][0][k] for k in ("prompt", "test", "entry_point")}
    good = row["prompt"] + HUMANEVAL["test"][0]["canonical_solution"]
    assert chat.score_humaneval(row, f"Here it is:\n```python\n{good}```\nDone.")
    # the function alone, without the prompt's `from typing import List`: the prompt's imports are prepended
    assert chat.score_humaneval(row, "def total(xs: List[int]) -> int:\n    return sum(xs)\n")
    assert not chat.score_humaneval(row, "```python\ndef total(xs):\n    return len(xs)\n```")
    assert not chat.score_humaneval(row, "```python\ndef total(xs) return 0\n```")  # syntax error
    # nanochat's extraction: a "```py" fence opens no block, so the whole reply is the program (a syntax error)
    assert not chat.score_humaneval(row, f"```py\n{good}```")
    assert chat.score_humaneval(row, f"```python\n{good}```")
    assert not chat.score_humaneval(row, "```python\nimport os\ndef total(xs):\n    os.system('true')\n"
                                         "    return sum(xs)\n```")  # the sandbox refuses subprocesses


def test_format_metrics_on_a_model_that_ends_turns_and_calls_the_calculator(scripted_checkpoint, tiny):
    scripted = AutoModelForCausalLM.from_pretrained(scripted_checkpoint, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(scripted_checkpoint)
    run = chat.CPU_TIER_EVALS["Arithmetic"]
    result = run(scripted, tokenizer, max_per_task=3, max_tokens=32, details=True)
    assert result["ends_turn_rate"] == 1.0 and result["calculator_rate"] == 1.0 and result["accuracy"] == 0.0
    assert result["items"][0]["replies"] == [
        "<|python_start|>3*4<|python_end|><|output_start|>12<|output_end|>"]  # the calculator's output, forced
    # the random tiny model neither ends its turns within 8 tokens nor calls the tool on these items
    model, tokenizer = tiny
    plain = run(model, tokenizer, max_per_task=3, max_tokens=8)
    assert plain["ends_turn_rate"] == 0.0
    pooled = chat.format_metrics({"A": result, "B": plain, "MC": {"accuracy": 0.5, "examples": 4}})
    assert pooled["ends_turn_rate"] == pytest.approx(0.5)
    assert pooled["calculator_rate"] == pytest.approx((3 + 3 * plain["calculator_rate"]) / 6)
    assert chat.format_metrics({"MC": {"accuracy": 0.5}}) == {"ends_turn_rate": None, "calculator_rate": None}


def test_cpu_tier_items_are_held_out_from_training():
    train = {r["messages"][0]["content"] for r in load_task("arithmetic", "train", size=2000)}
    held_out = [r["messages"][0]["content"] for r in chat.cpu_eval_set("arithmetic", 64)]
    assert len(held_out) == 64 and not train.intersection(held_out)
    words_eval = [r["messages"][0]["content"] for r in chat.cpu_eval_set("simplespelling", 64)]
    assert len(set(words_eval)) > 32  # distinct items, from the CPU word list
    assert set(chat.CPU_TIER_EVALS) == {"Arithmetic", "SimpleSpelling", "SpellingBee"}


# ---------------------------------------------------------------------------------------------------------------
# nanochat-hf eval --tier cpu


def _offline_env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NANOCHAT_", "HF_"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"),
               NANOCHAT_HF_CACHE=str(tmp_path / "cache"), TOKENIZERS_PARALLELISM="false", **extra)
    return env


def test_cpu_tier_eval_end_to_end(tmp_path, scripted_checkpoint):
    model_dir = shutil.copytree(scripted_checkpoint, tmp_path / "sft")
    cmd = [sys.executable, "-m", "nanochat_hf.evaluation.evaluate", "--model", str(model_dir), "--stage", "sft", "--tier", "cpu",
           "--max-per-task", "2", "--max-tokens", "24"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_offline_env(tmp_path), capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads((model_dir / "eval_sft.json").read_text())
    chat_results = results["chat"]
    assert results["tier"] == "cpu" and set(chat_results["tasks"]) == {"Arithmetic", "SimpleSpelling", "SpellingBee"}
    for task in chat_results["tasks"].values():
        assert task["examples"] == 2 and task["accuracy"] == 0.0 and task["ends_turn_rate"] == 1.0
    assert chat_results["tasks"]["Arithmetic"]["calculator_rate"] == 1.0
    assert chat_results["format"] == {"ends_turn_rate": 1.0, "calculator_rate": 1.0}
    # None of nanochat's ChatCORE tasks runs offline, so there is no ChatCORE: its tasks are not averaged in.
    assert chat_results["chatcore"] is None and chat_results["chatcore_cat"] is None
    assert "ends_turn_rate: 1.0000" in proc.stdout
    assert "ChatCORE: not computed (it needs ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval)" in proc.stdout
    for name in ("Arithmetic", "SimpleSpelling", "SpellingBee"):  # a progress bar per task, count and ETA
        assert re.search(rf"{name}: 100%\|.*\| 2/2 \[\d\d:\d\d<\d\d:\d\d", proc.stderr), name


def test_cpu_tier_base_stage_scores_bits_per_byte_without_a_bundle(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.delenv("NANOCHAT_EVAL_BUNDLE", raising=False)
    monkeypatch.setenv("NANOCHAT_HF_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "text"
    data.mkdir()
    docs = [{"text": f"Note {i}: the ferry leaves the harbour at dawn and returns at dusk. " * 6} for i in range(40)]
    (data / "train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[:10]))
    (data / "val.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[10:]))
    out = tmp_path / "eval_base.json"
    with pytest.raises(ValueError, match="--bpb-data"):
        evaluate.main(["--model", str(tiny_checkpoint), "--tier", "cpu", "--output", str(out)])
    assert not out.exists()
    evaluate.main(["--model", str(tiny_checkpoint), "--tier", "cpu", "--bpb-data", str(data), "--bpb-tokens", "256",
                   "--batch-size", "1", "--output", str(out)])
    results = json.loads(out.read_text())
    assert "core" not in results and results["tier"] == "cpu" and results["bpb"]["tokens"] == 256
    assert results["bpb"]["val_bpb"] > 0 and results["bpb"]["train_bpb"] > 0
    with pytest.raises(SystemExit):
        evaluate.main(["--model", str(tiny_checkpoint), "--tier", "tpu"])
    with pytest.raises(ValueError, match="tier 'gpu'"):
        evaluate.evaluate_checkpoint(str(tiny_checkpoint), "sft", tier="gpu")


def test_missing_hub_data_is_named_with_the_flag_that_points_at_a_copy(tmp_path, data_dir, monkeypatch):
    chat.check_hub_data(data_dir)  # everything there
    partial = tmp_path / "partial"
    shutil.copytree(data_dir / "allenai", partial / "allenai")
    with pytest.raises(ValueError) as err:
        chat.check_hub_data(partial)
    message = str(err.value)
    assert f"not found in --data-dir {partial}: cais/mmlu, openai/gsm8k, openai/openai_humaneval" in message
    assert "--data-dir DIR" in message and "NANOCHAT_CHAT_DATA_DIR=DIR" in message and "\n" not in message
    assert "allenai/ai2_arc" not in message  # words_alpha.txt is not required here: online, it is downloaded
    assert len(chat.hub_eval_set("arc_easy", 2, partial)) == 1  # the fixture has one test row
    with pytest.raises(ValueError, match=r"not found in --data-dir .*: openai/gsm8k; .*--data-dir DIR"):
        chat.hub_eval_set("gsm8k", 2, partial)

    def unreachable(name, split, path):  # what `datasets` raises where the Hub cannot be reached
        raise ConnectionError(f"Couldn't reach '{chat.HUB_REPOS[name]}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(chat, "load_task", unreachable)
    with pytest.raises(ValueError, match=r"^chat eval data not found \(the Hub is unreachable: Couldn't reach "
                       r"'cais/mmlu' .*\): cais/mmlu; copy it while online \(`hf download cais/mmlu --repo-type "
                       r"dataset --local-dir DIR/cais/mmlu`\), then pass --data-dir DIR"):
        chat.hub_eval_set("mmlu", 2)


# ---------------------------------------------------------------------------------------------------------------
# lighteval


def test_lighteval_cli_runs_chat_tasks_offline_and_agrees(tmp_path, tiny_checkpoint, data_dir, tiny):
    """`lighteval custom` (behind our offline guards) with evals/chat.py as both task module and model: the
    categorical MMLU verdicts and a generative CPU-tier task, against our own runners."""
    shutil.copytree(tiny_checkpoint, tmp_path / "model")
    evals = str(REPO / "evals" / "chat.py")
    cmd = [sys.executable, "-m", "nanochat_hf.evaluation.lighteval_cli", "custom", "model", evals,
           "chat:mmlu|0,chat_cpu:arithmetic|0", "--custom-tasks", evals, "--output-dir", str(tmp_path / "out"),
           "--max-samples", "2", "--save-details"]
    env = _offline_env(tmp_path, NANOCHAT_CHAT_DATA_DIR=str(data_dir), NANOCHAT_CHAT_MAX_TOKENS="16")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (results_file,) = glob.glob(str(tmp_path / "out" / "results" / "model" / "*.json"))
    results = json.loads(Path(results_file).read_text())["results"]

    model, tokenizer = tiny
    mmlu = load_task("mmlu", "test", data_dir / "cais/mmlu").select(range(2))  # lighteval: the first rows
    ours = chat.evaluate_multiple_choice(model, tokenizer, mmlu)
    assert results["chat:mmlu|0"]["acc"] == pytest.approx(ours["accuracy"])
    (details,) = glob.glob(str(tmp_path / "out" / "details" / "model" / "*" / "details_chat:mmlu|0_*.parquet"))
    theirs = {row["doc"]["query"]: list(row["model_response"]["logprobs"])
              for _, row in pd.read_parquet(details).iterrows()}
    for row, logprobs in zip(mmlu, chat.letter_logprobs(model, tokenizer, list(mmlu)), strict=True):
        assert theirs[row["messages"][0]["content"]] == pytest.approx(logprobs, abs=1e-4)
    arithmetic = chat.evaluate_generative(model, tokenizer, chat.cpu_eval_set("arithmetic", 2), chat.score_answer,
                                          max_tokens=16, tool_rate=True)
    assert results["chat_cpu:arithmetic|0"]["acc"] == pytest.approx(arithmetic["accuracy"])
    assert results["chat_cpu:arithmetic|0"]["ends_turn"] == pytest.approx(arithmetic["ends_turn_rate"])
    assert results["chat_cpu:arithmetic|0"]["calculator"] == pytest.approx(arithmetic["calculator_rate"])
