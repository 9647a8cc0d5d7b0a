"""The main job as a newcomer runs it: `nanochat-hf speedrun --tier cpu`, and `nanochat-hf init`."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanochat_hf.cli import build_parser, main
from nanochat_hf.speedrun import TIERS, run_speedrun


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nanochat_hf", *args], capture_output=True, text=True, timeout=1800, cwd=cwd,
        env={**os.environ, "PYTHONPATH": os.getcwd(), "TOKENIZERS_PARALLELISM": "false"},
    )


def _check_run(run_dir, steps: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(run_dir / "base", trust_remote_code=True)
    assert model.config.vocab_size == len(tokenizer) and model.config.num_hidden_layers == 4
    assert model.config.max_position_embeddings == 512
    log = json.loads((run_dir / "speedrun.json").read_text())
    assert set(log) >= {"corpus", "tokenizer", "pretrain"}
    losses = [json.loads(line)["loss"] for line in (run_dir / "pretrain" / "losses.jsonl").read_text().splitlines()]
    assert len(losses) == steps and losses[-1] < losses[0]
    ids = AutoTokenizer.from_pretrained(run_dir / "base")("Hello", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_speedrun_cpu_smoke_run_and_rerun(tmp_path):
    run_dir = tmp_path / "run"
    result = _cli("speedrun", "--tier", "cpu", "--run-dir", str(run_dir), "--pretrain-steps", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((run_dir / "corpus").glob("shard_*.jsonl"))) == 4
    assert len(AutoTokenizer.from_pretrained(run_dir / "tokenizer")) == TIERS["cpu"].vocab_size
    _check_run(run_dir, steps=4)
    # a re-run skips the finished stages and leaves them untouched
    before = (run_dir / "base" / "model.safetensors").stat().st_mtime_ns
    again = _cli("speedrun", "--tier", "cpu", "--run-dir", str(run_dir), "--pretrain-steps", "4")
    assert again.returncode == 0 and again.stdout.count("skipping") == 3
    assert (run_dir / "base" / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_speedrun_cpu_full(tmp_path):
    """`make speedrun-cpu` as it is: the whole CPU tier on the embedded corpus."""
    result = _cli("speedrun", "--tier", "cpu", "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    _check_run(tmp_path / "run", steps=100)


def test_speedrun_on_a_given_corpus_and_unknown_tier(tmp_path):
    corpus = _tiny_corpus(tmp_path)
    log = run_speedrun("cpu", tmp_path / "run", corpus=str(corpus), pretrain_steps=2)
    assert log["tokenizer"]["seconds"] >= 0 and (tmp_path / "run" / "base" / "config.json").exists()
    with pytest.raises(ValueError, match="unknown tier 'd99'"):
        run_speedrun("d99", tmp_path / "other")


def test_init_command(tmp_path):
    from nanochat_hf.tokenizer import train_tokenizer

    train_tokenizer(["Some text for a tokenizer. " * 200], vocab_size=300, show_progress=False).save_pretrained(
        tmp_path / "tok"
    )
    out = tmp_path / "d2"
    main(["init", "--tokenizer", str(tmp_path / "tok"), "--depth", "2", "--generation", "2025",
          "--head-dim", "32", "--sequence-len", "64", "--out", str(out)])
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert model.config.generation == "2025" and model.config.hidden_size == 128
    assert torch.all(model.lm_head.weight == 0)  # nanochat's 2025 init zeroes the head


def test_init_rejects_a_tokenizer_without_nanochat_tokens(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])))
    plain.save_pretrained(tmp_path / "plain")
    result = _cli("init", "--tokenizer", str(tmp_path / "plain"), "--depth", "2", "--out", str(tmp_path / "x"))
    assert result.returncode == 2
    assert "no <|bos|> token" in result.stderr
    assert not (tmp_path / "x").exists()


def test_every_subcommand_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, sub_parser in sub.choices.items():
        assert sub_parser.description, name
        for action in sub_parser._actions:
            if action.dest != "help" and not action.dest.startswith("_") and action.help is None:
                nested = getattr(action, "choices", None)
                assert isinstance(nested, dict), f"{name} --{action.dest} has no help"
    pretrain_help = _cli("pretrain", "--help")
    assert pretrain_help.returncode == 0 and "--device_batch_size" in pretrain_help.stdout


def _tiny_corpus(tmp_path):
    corpus = tmp_path / "tiny"
    corpus.mkdir(exist_ok=True)
    for i in range(3):
        (corpus / f"part{i}.txt").write_text(f"Document {i}. " + "Some text for a tokenizer and a model. " * 300)
    return corpus
