"""The main job as a newcomer runs it: `nanochat-hf speedrun --tier cpu`, and `nanochat-hf init`."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanochat_hf.cli import PASS_THROUGH, build_parser, main
from nanochat_hf.speedrun import PIPELINES, ROOT, TIERS, recipe_file, run_logged, run_speedrun
from nanochat_hf.training.sft import parse_sft_args


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nanochat_hf", *args], capture_output=True, text=True, timeout=1800, cwd=cwd,
        env={**os.environ, "PYTHONPATH": os.getcwd(), "TOKENIZERS_PARALLELISM": "false"},
    )


def _check_run(run_dir, steps: int, stages=("pretrain", "midtrain", "sft")) -> None:
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(run_dir / "sft", trust_remote_code=True)
    assert model.config.vocab_size == len(tokenizer) and model.config.num_hidden_layers == 4
    assert model.config.max_position_embeddings == 512
    log = json.loads((run_dir / "speedrun.json").read_text())
    expected = {"corpus", "tokenizer", "pretrain", "eval_base", "midtrain", "eval_mid", "sft", "eval_sft"}
    assert set(log["stages"]) >= expected
    for name in expected - {"corpus", "tokenizer"}:
        assert (run_dir / "logs" / f"{name}.log").stat().st_size > 0, name  # every stage's output is kept
    for log_file in (run_dir / "logs").glob("*.log"):  # bytes: text mode would turn a carriage return into \n
        assert b"\r" not in log_file.read_bytes(), log_file.name
    # each evaluation's progress bars, in their final state
    assert "bits per byte (val): 100%" in (run_dir / "logs" / "eval_base.log").read_text()
    assert "Arithmetic: 100%" in (run_dir / "logs" / "eval_mid.log").read_text()
    for stage in stages:
        losses = [json.loads(line)["loss"]
                  for line in (run_dir / "train" / stage / "losses.jsonl").read_text().splitlines()]
        assert len(losses) == steps, stage
    for model_dir, stage in (("base", "base"), ("mid", "mid"), ("sft", "sft")):
        assert json.loads((run_dir / model_dir / f"eval_{stage}.json").read_text())["stage"] == stage
    report = (run_dir / "report.md").read_text()
    assert "CORE" in report and "ChatCORE" in report
    ids = AutoTokenizer.from_pretrained(run_dir / "sft")("Hello", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] <= ids.shape[1] + 3


def test_speedrun_cpu_smoke_run_and_rerun(tmp_path):
    run_dir = tmp_path / "run"
    result = _cli("speedrun", "--tier", "cpu", "--run-dir", str(run_dir), "--max-steps", "2",
                  "--eval-max-per-task", "4", "--eval-max-tokens", "16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((run_dir / "corpus").glob("shard_*.jsonl"))) == 4
    assert len(AutoTokenizer.from_pretrained(run_dir / "tokenizer")) == TIERS["cpu"].vocab_size
    _check_run(run_dir, steps=2)
    # a re-run skips the finished stages, leaves them untouched, and rewrites the report
    before = (run_dir / "base" / "model.safetensors").stat().st_mtime_ns
    again = _cli("speedrun", "--tier", "cpu", "--run-dir", str(run_dir), "--max-steps", "2")
    assert again.returncode == 0 and again.stdout.count("skipping") == 8
    assert (run_dir / "base" / "model.safetensors").stat().st_mtime_ns == before


def test_a_failing_stage_stops_the_run_and_names_its_log(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "corpus").mkdir(parents=True)  # a corpus folder with nothing in it: pretraining has no data
    (run_dir / "speedrun.json").write_text("{}")  # in an earlier run's folder (one holding anything else is refused)
    result = _cli("speedrun", "--tier", "cpu", "--run-dir", str(run_dir), "--max-steps", "2")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "logs/pretrain.log" in result.stderr and "no .parquet, .jsonl, .txt files found" in (run_dir / "logs" / "pretrain.log").read_text()
    assert not (run_dir / "base").exists() and not (run_dir / "mid").exists()


# A stage that prints a line, waits to be told to go on, then draws progress bars and prints over a cleared one.
# `print` without flush: its lines reach the log as printed only if the stage's output is unbuffered.
STAGE = """
import pathlib, sys, time
print("first line")
while not pathlib.Path(sys.argv[1]).exists():
    time.sleep(0.05)
print("\\rbar 1/3\\rbar 2/3\\rbar 3/3")
print("\\rbar 1/2\\r          \\rmessage over a cleared bar")
print("\\r    \\r", end="")
print("after a cleared bar")
print()
print("caf\\u00e9 \\u2588\\u2588")
print("last\\rwords", end="")
"""


def test_stage_logs_follow_the_stage_line_by_line_without_carriage_returns(tmp_path, capsys):
    script, log, go = tmp_path / "stage.py", tmp_path / "logs" / "stage.log", tmp_path / "go"
    script.write_text(STAGE)
    command = [sys.executable, str(script), str(go)]
    stage = threading.Thread(target=run_logged, args=(command, log))
    stage.start()
    try:
        deadline = time.monotonic() + 60
        while not (log.exists() and "first line\n" in log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "first line\n" in log.read_text(), "the log got the line only when the stage ended"  # tail -f
    finally:
        go.touch()
        stage.join(60)
    expected = ["first line", "bar 3/3", "message over a cleared bar", "after a cleared bar", "",
                "caf\u00e9 \u2588\u2588", "words"]
    assert log.read_bytes().decode().split("\n") == [f"$ {' '.join(command)}", *expected, ""]
    assert capsys.readouterr().out.split("\n") == [*expected, ""]  # not a terminal: the log's lines


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_speedrun_cpu_full(tmp_path):
    """`make speedrun-cpu` as it is: the whole CPU tier, offline, within 15 minutes on 2 cores."""
    result = _cli("speedrun", "--tier", "cpu", "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    _check_run(tmp_path / "run", steps=100, stages=("pretrain",))
    log = json.loads((tmp_path / "run" / "speedrun.json").read_text())
    assert sum(s.get("seconds", 0) for s in log["stages"].values()) <= 15 * 60


def test_speedrun_on_a_given_corpus_and_unknown_tier(tmp_path):
    with pytest.raises(ValueError, match="unknown tier 'd99'"):
        run_speedrun("d99", tmp_path / "other")


def test_gpu_tiers_say_what_to_do_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(ValueError, match="--tier cpu"):
        run_speedrun("d20", tmp_path / "d20")


SCRIPT = ROOT / "recipes" / "speedrun.sh"


@pytest.mark.parametrize("tier", sorted(TIERS))
def test_the_speedrun_script_runs_every_stage_with_the_tiers_recipes(tier):
    script = SCRIPT.read_text()
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    pipelines = [p for p in PIPELINES if all(recipe_file(tier, p, stage).exists() for stage in PIPELINES[p])]
    # the GPU tiers default to nanochat HEAD's pipeline, the CPU tier to 2025; d24 is HEAD's speedrun alone
    assert TIERS[tier].pipeline == ("2025" if tier == "cpu" else "2026")
    assert pipelines == (["2026"] if tier == "d24" else ["2025", "2026"])
    for pipeline in pipelines:
        for stage in (*PIPELINES[pipeline], "rl"):
            recipe = recipe_file(tier, pipeline, stage)
            assert recipe.exists(), recipe
            assert f"nanochat_hf.training.{stage} --config \"$RECIPES/{recipe.name}\"" in script, recipe.name
        sft = parse_sft_args(["--config", str(recipe_file(tier, pipeline, "sft"))])
        assert sft.pipeline == pipeline and sft.init_from.endswith("/mid" if pipeline == "2025" else "/base")
    for stage in ("base", "mid", "sft", "rl"):
        assert f"eval --model \"$RUN/{stage}\" --stage {stage}" in script
    assert "nanochat-hf report" in script and "accelerate launch --config_file accelerate_configs/ddp_8gpu.yaml" in script


def test_the_speedrun_script_refuses_an_unknown_tier(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), "d99"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "RUN": str(tmp_path / "run")})
    assert result.returncode == 2 and "no recipes for tier d99" in result.stderr
    assert not (tmp_path / "run").exists()


def test_the_d24_tier_is_heads_speedrun():
    """runs/speedrun.sh at HEAD: base_train --depth=24 --target-param-data-ratio=8 --device-batch-size=16 --fp8."""
    from nanochat_hf.training.pretrain import parse_args

    run = parse_args(["--config", str(ROOT / "recipes/d24/pretrain.yaml")])
    assert (run.depth, run.target_param_data_ratio, run.device_batch_size) == (24, 8, 16)
    assert (run.fp8, run.fp8_recipe, run.generation, run.max_seq_len) == (True, "tensorwise", "2026", 2048)
    with pytest.raises(ValueError, match="recipes/d24 has no midtrain.yaml"):
        run_speedrun("d24", ROOT / "runs-never-written", pipeline="2025")


def test_init_command(tmp_path):
    from nanochat_hf.tokenizer.bpe import train_tokenizer

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


@pytest.mark.parametrize("command", sorted(PASS_THROUGH))
def test_every_stage_command_documents_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code in (0, None)
    text = capsys.readouterr().out
    assert f"nanochat-hf {command}" in text and "--" in text


def _tiny_corpus(tmp_path):
    corpus = tmp_path / "tiny"
    corpus.mkdir(exist_ok=True)
    for i in range(3):
        (corpus / f"part{i}.txt").write_text(f"Document {i}. " + "Some text for a tokenizer and a model. " * 300)
    return corpus


def test_the_speedrun_scripts_logs_keep_a_bar_in_its_final_state_only(tmp_path):
    """recipes/speedrun.sh's `logged`: the terminal gets the output as it comes, logs/<stage>.log the same lines
    with each progress bar in its final state (no carriage return), stderr included."""
    define = next(line for line in SCRIPT.read_text().splitlines() if line.startswith("logged()"))
    stage = "import sys; print('a\\rbar 1/2\\rbar 2/2'); print('oops', file=sys.stderr); print('done')"
    script = f"set -euo pipefail; export PYTHONUNBUFFERED=1; mkdir -p \"$RUN/logs\"; {define}\nlogged x {sys.executable} -c \"{stage}\"; sleep 0.5"
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env={**os.environ, "RUN": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "bar 1/2" in result.stdout  # live on the terminal
    assert (tmp_path / "logs" / "x.log").read_text() == "bar 2/2\noops\ndone\n"
