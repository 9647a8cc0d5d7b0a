"""`nanochat-hf eval`: the base stage writes CORE and bits per byte beside the checkpoint; bad input is explained."""

import json
import math
import shutil

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanochat_hf import evaluate
from nanochat_hf.data.pretrain import PretrainStream, evaluate_bpb
from nanochat_hf.evaluation.core import evaluate_core
from nanochat_hf.tokenizer import token_bytes
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

    evaluate.main(["--model", str(model_dir), "--bundle", str(bundle), "--max-per-task", "3", "--bpb-data",
                   str(data), "--bpb-tokens", "512", "--batch-size", "2"])
    printed = capsys.readouterr().out
    results = json.loads((model_dir / "eval_base.json").read_text())
    assert "CORE metric:" in printed and "eval_base.json" in printed

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    direct = evaluate_core(model, tokenizer, bundle, max_per_task=3)
    assert results["core"]["results"] == direct["results"]
    assert results["core"]["core_metric"] == pytest.approx(direct["core_metric"])
    assert results["core"]["examples"] == dict.fromkeys(LABELS, 3)

    seq = model.config.max_position_embeddings
    stream = PretrainStream(str(data), tokenizer, batch_size=2, seq_len=seq, split="val", max_batches=1)
    expected = evaluate_bpb(model, stream, token_bytes(tokenizer))
    assert math.isfinite(results["bpb"]["val_bpb"]) and results["bpb"]["val_bpb"] == pytest.approx(expected)


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


def test_chatcore_centers_each_task_by_its_baseline():
    accuracies = {"ARC-Easy": 0.25, "MMLU": 0.625, "GSM8K": 0.5}
    baselines = {"ARC-Easy": 0.25, "MMLU": 0.25, "GSM8K": 0.0}
    assert evaluate.chatcore(accuracies, baselines) == pytest.approx((0.0 + 0.5 + 0.5) / 3)
