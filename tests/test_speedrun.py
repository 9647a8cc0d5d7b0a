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
        [sys.executable, "-m", "nanochat_hf", *args], capture_output=True, text=True, timeout=900, cwd=cwd,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )


def test_speedrun_cpu_on_embedded_corpus(tmp_path):
    run_dir = tmp_path / "run"
    result = _cli("speedrun", "--tier", "cpu", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    assert len(tokenizer) == TIERS["cpu"].vocab_size
    model = AutoModelForCausalLM.from_pretrained(run_dir / "base", trust_remote_code=True)
    assert model.config.vocab_size == len(tokenizer) and model.config.num_hidden_layers == TIERS["cpu"].depth
    assert model.config.max_position_embeddings == TIERS["cpu"].sequence_len
    log = json.loads((run_dir / "speedrun.json").read_text())
    assert set(log) >= {"tokenizer", "base-init"}
    ids = AutoTokenizer.from_pretrained(run_dir / "base")("Hello", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3

    # a re-run skips the finished stages and leaves them untouched
    before = (run_dir / "base" / "model.safetensors").stat().st_mtime_ns
    again = _cli("speedrun", "--tier", "cpu", "--run-dir", str(run_dir))
    assert again.returncode == 0 and "skipping" in again.stdout
    assert (run_dir / "base" / "model.safetensors").stat().st_mtime_ns == before


def test_speedrun_on_a_given_corpus_and_unknown_tier(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"doc{i}.txt").write_text(f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * 40)
    log = run_speedrun("cpu", tmp_path / "run", corpus=str(corpus))
    assert log["tokenizer"]["seconds"] >= 0 and (tmp_path / "run" / "base" / "config.json").exists()
    with pytest.raises(ValueError, match="unknown tier 'd99'"):
        run_speedrun("d99", tmp_path / "other")


def test_init_command(tmp_path):
    run_speedrun("cpu", tmp_path / "run", corpus=str(_tiny_corpus(tmp_path)))
    out = tmp_path / "d2"
    main(["init", "--tokenizer", str(tmp_path / "run" / "tokenizer"), "--depth", "2", "--generation", "2025",
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


def _tiny_corpus(tmp_path):
    corpus = tmp_path / "tiny"
    corpus.mkdir(exist_ok=True)
    (corpus / "a.txt").write_text("Some text for a tokenizer. " * 200)
    return corpus
