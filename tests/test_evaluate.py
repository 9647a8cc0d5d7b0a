"""`nanochat-hf eval`: the base stage writes CORE and bits per byte beside the checkpoint; bad input is explained."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanochat_hf.data.pretrain import PretrainStream
from nanochat_hf.evaluation import evaluate
from nanochat_hf.evaluation.bpb import evaluate_bpb
from nanochat_hf.evaluation.core import evaluate_core
from nanochat_hf.tokenizer.bpe import token_bytes
from tests.core_fixtures import write_bundle

LABELS = ["copa", "winograd", "lambada_openai"]


def test_base_stage_writes_core_and_bpb_beside_the_checkpoint(tmp_path, tiny_checkpoint, capsys):
    model_dir = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    bundle = write_bundle(tmp_path / "bundle", labels=LABELS, items_per_task=6)
    data = tmp_path / "text"
    data.mkdir()
    docs = [{"text": f"Document {i}: the river runs past the stone market every winter. " * 8} for i in range(60)]
    (data / "train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[:20]))
    (data / "val.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[20:]))

    # 1100 tokens at 2 x 256 per batch: rounded down to whole batches, as nanochat's base_eval does (2 batches).
    evaluate.main(["--model", str(model_dir), "--bundle", str(bundle), "--max-per-task", "3", "--bpb-data",
                   str(data), "--bpb-tokens", "1100", "--batch-size", "2"])
    printed, bars = capsys.readouterr()
    results = json.loads((model_dir / "eval_base.json").read_text())
    assert "CORE metric:" in printed and "eval_base.json" in printed
    # a progress bar per task and per bits-per-byte split on stderr, with its count and ETA (elapsed<remaining)
    for label in LABELS:
        assert re.search(rf"{label}: 100%\|.*\| 3/3 \[\d\d:\d\d<\d\d:\d\d", bars), label
    for split in ("train", "val"):
        assert re.search(rf"bits per byte \({split}\): 100%\|.*\| 2/2 \[", bars), split

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    direct = evaluate_core(model, tokenizer, bundle, max_per_task=3)
    assert results["core"]["results"] == direct["results"]
    assert results["core"]["core_metric"] == pytest.approx(direct["core_metric"])
    assert results["core"]["examples"] == dict.fromkeys(LABELS, 3)

    # nanochat's base_eval: bits per byte on the train AND the validation split, the same token count on each.
    seq = model.config.max_position_embeddings
    assert seq == 256 and results["bpb"]["tokens"] == 2 * 2 * seq
    assert results["bpb"]["tokens_read"] == {"train": 2 * 2 * seq, "val": 2 * 2 * seq}
    for split in ("train", "val"):
        stream = PretrainStream(str(data), tokenizer, batch_size=2, seq_len=seq, split=split, max_batches=2)
        expected = evaluate_bpb(model, stream, token_bytes(tokenizer))
        assert math.isfinite(expected) and results["bpb"][f"{split}_bpb"] == pytest.approx(expected), split
    assert results["bpb"]["train_bpb"] != results["bpb"]["val_bpb"]  # two different texts were read
    assert results["bpb"]["dtype"] == "float32"  # the CPU's compute dtype
    assert "train bits per byte:" in printed and "validation bits per byte:" in printed


def test_bpb_token_budget_is_nanochats_and_too_small_a_budget_is_refused(tmp_path, tiny_checkpoint):
    from nanochat_hf import speedrun

    assert evaluate.build_parser().parse_args(["--model", "m"]).bpb_tokens == 40 * 524288  # base_eval --split-tokens
    for tier in ("d12", "d20", "d26", "d32"):
        assert speedrun.TIERS[tier].eval_bpb_tokens == 40 * 524288, tier
    assert speedrun.TIERS["cpu"].eval_bpb_tokens == 65536  # 16 batches of 8 x 512: the CPU tier stays small
    data = tmp_path / "text"
    data.mkdir()
    (data / "train.txt").write_text("the stone market by the river\n" * 50)
    (data / "val.txt").write_text("the ferry at dawn\n" * 50)
    out = tmp_path / "eval_base.json"
    with pytest.raises(ValueError, match=r"--bpb-tokens 500 is less than one batch \(2 x 256 = 512 tokens\)"):
        evaluate.evaluate_checkpoint(str(tiny_checkpoint), "base", tier="cpu", bpb_data=str(data), bpb_tokens=500,
                                     batch_size=2, output=out)
    assert not out.exists()


def test_bad_input_is_explained_and_writes_nothing(tmp_path, tiny_checkpoint):
    with pytest.raises(SystemExit):
        evaluate.main(["--model", str(tiny_checkpoint), "--stage", "pretrain"])
    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        evaluate.evaluate_checkpoint(str(empty), "base")
    assert list(empty.iterdir()) == []
    with pytest.raises(ValueError, match="use one of base, mid, sft, rl"):
        evaluate.evaluate_checkpoint(str(tiny_checkpoint), "chat")


# nanochat HEAD's scripts/chat_eval.py and chat_sft.py, written out here rather than read from our constant.
HEAD_TASKS = [("ARC-Easy", 0.25), ("ARC-Challenge", 0.25), ("MMLU", 0.25), ("GSM8K", 0.0), ("HumanEval", 0.0)]
ACCURACY = {"ARC-Easy": 0.5, "ARC-Challenge": 0.4, "MMLU": 0.3, "GSM8K": 0.1, "HumanEval": 0.05}
# centered: 1/3, 0.2, 1/15, 0.1, 0.05 -> ChatCORE 0.75 / 5 = 0.15; categorical only: 0.6 / 3 = 0.2


def test_chatcore_is_heads_five_tasks_and_spellingbee_stays_out():
    assert list(evaluate.CHATCORE_TASKS.items()) == HEAD_TASKS
    assert set(evaluate.CATEGORICAL_TASKS) == {"ARC-Easy", "ARC-Challenge", "MMLU"}
    assert evaluate.chatcore(ACCURACY) == pytest.approx(0.15)
    assert evaluate.chatcore_cat(ACCURACY) == pytest.approx(0.2)
    for beside in ({"SpellingBee": 0.9}, {"SpellingBee": 0.0}, {"Arithmetic": 1.0}):
        assert evaluate.chatcore({**ACCURACY, **beside}) == pytest.approx(0.15)
        assert evaluate.chatcore_cat({**ACCURACY, **beside}) == pytest.approx(0.2)
    # As HEAD: computed only when every one of its tasks was evaluated.
    without_humaneval = {t: a for t, a in ACCURACY.items() if t != "HumanEval"}
    assert evaluate.chatcore(without_humaneval) is None
    assert evaluate.chatcore_cat(without_humaneval) == pytest.approx(0.2)
    assert evaluate.chatcore({"SpellingBee": 0.9}) is None and evaluate.chatcore_cat({"GSM8K": 0.5}) is None
    with pytest.raises(ValueError, match="MMLU accuracy 1.5 is not in \\[0, 1\\]"):
        evaluate.chatcore({**ACCURACY, "MMLU": 1.5})


def test_lighteval_results_give_the_same_chatcore():
    from nanochat_hf.evaluation.chatcore import lighteval_chatcore

    keys = {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge", "MMLU": "mmlu", "GSM8K": "gsm8k",
            "HumanEval": "humaneval"}  # evals/README.md's task names
    results = {f"chat:{keys[t]}|0": {"acc": a, "ends_turn": 1.0} for t, a in ACCURACY.items()}
    results["chat:spellingbee|0"] = {"acc": 0.9}
    assert lighteval_chatcore(results) == pytest.approx({"ChatCORE": 0.15, "ChatCORE_cat": 0.2})
    suite_prefixed = {f"community|{k}": v for k, v in results.items() if "humaneval" not in k}
    assert lighteval_chatcore(suite_prefixed) == {"ChatCORE": None, "ChatCORE_cat": pytest.approx(0.2)}


def test_chat_stage_writes_chatcore_with_spellingbee_beside(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    """`nanochat-hf eval --stage sft` on the Hub tier, its runners replaced by ones with known accuracies (the real
    runners need the Hub datasets; tests/test_chat_eval.py runs them on fixtures)."""
    from nanochat_hf.evaluation import chat

    accuracies = {**ACCURACY, "SpellingBee": 0.9}
    assert set(chat.HUB_CHAT_EVALS) == set(accuracies)

    def fixed(name):
        return lambda model, tokenizer, max_per_task, **kwargs: {"accuracy": accuracies[name], "examples": 4}

    monkeypatch.setattr(chat, "HUB_CHAT_EVALS", {name: fixed(name) for name in accuracies})
    monkeypatch.setattr(chat, "check_hub_data", lambda data_dir=None: None)  # even where HF_HUB_OFFLINE is set
    out = tmp_path / "eval_sft.json"
    evaluate.main(["--model", str(tiny_checkpoint), "--stage", "sft", "--max-per-task", "4", "--output", str(out)])
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())["chat"]
    assert {t: r["accuracy"] for t, r in results["tasks"].items()} == accuracies
    assert results["chatcore"] == pytest.approx(0.15) and results["chatcore_cat"] == pytest.approx(0.2)
    assert "ChatCORE: 0.1500" in printed and "ChatCORE_cat: 0.2000" in printed
    assert "SpellingBee      accuracy 0.9000" in printed


@pytest.mark.parametrize("stage,names,flag", [
    ("base", ["eval_bundle.zip"], "--bundle FILE"),
    ("sft", ["allenai/ai2_arc", "cais/mmlu", "openai/gsm8k", "openai/openai_humaneval", "words_alpha.txt"],
     "--data-dir DIR"),
])
def test_offline_eval_names_the_missing_data_and_how_to_point_at_a_copy(tmp_path, tiny_checkpoint, stage, names,
                                                                        flag):
    """The default tier (d20) offline with an empty Hub cache: one line naming every missing dataset and the flag
    that points at a local copy, exit status 2, before the model loads."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "NANOCHAT_HF_CACHE": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("NANOCHAT_EVAL_BUNDLE", None)
    proc = subprocess.run([sys.executable, "-m", "nanochat_hf", "eval", "--model", str(tiny_checkpoint), "--stage",
                           stage], capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0] == proc.stderr.splitlines()[-1], proc.stderr[-3000:]
    assert errors[0].startswith("nanochat-hf eval: error: ") and flag in errors[0]
    assert all(name in errors[0] for name in names), errors[0]
    assert "Loading weights" not in proc.stderr and not list(tiny_checkpoint.glob("eval_*.json"))
