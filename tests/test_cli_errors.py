"""Bad input through the real `nanochat-hf` command line: exit status 2, one line on stderr that names the field or
file (no traceback), and nothing written or lost (the working folder is hashed before and after all rows). Each row
runs the CLI in a process of its own: forked by tests/cli_rows.py after one import of the stages (seconds saved per
row), or started from scratch (`fresh`). DEBUG_ROWS: --debug / NANOCHAT_HF_DEBUG=1 add the traceback. Then,
in-process, the validation of each stage's arguments."""

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Row:
    name: str
    argv: tuple[str, ...]
    expect: tuple[str, ...]  # fragments of the one error line
    absent: tuple[str, ...] = ()  # paths (relative to the working folder) the command must not create
    env: tuple[tuple[str, str], ...] = ()
    fresh: bool = False  # started from scratch (`python -m nanochat_hf`), not forked by tests/cli_rows.py


def tiny_pretrain(out: str) -> tuple[str, ...]:
    return ("pretrain", "--tokenizer", "ckpt", "--depth", "2", "--max_seq_len", "64", "--device_batch_size", "1",
            "--total_batch_size", "64", "--output_dir", out)


# Each row writes (if it wrongly writes at all) to an output folder of its own, so one row's failure is not another's.
ROWS = (
    Row("pretrain: batch size 0", (*tiny_pretrain("out-1"), "--device_batch_size", "0"),
        ("--device_batch_size 0", "at least 1"), absent=("out-1",)),
    Row("pretrain: negative num_iterations", (*tiny_pretrain("out-2"), "--num_iterations", "-5"),
        ("--num_iterations -5", "at least 1, or -1"), absent=("out-2",)),
    Row("pretrain: total batch not a multiple",
        (*tiny_pretrain("out-3"), "--device_batch_size", "3", "--total_batch_size", "1000"),
        ("total_batch_size=1,000", "3 x 64", "--device_batch_size"), absent=("out-3",)),
    Row("pretrain: recipe is not YAML", ("pretrain", "--config", "broken.yaml", "--output_dir", "out-4"),
        ("broken.yaml", "YAML", "line 2"), absent=("out-4",)),
    Row("pretrain: missing recipe", ("pretrain", "--config", "missing.yaml", "--output_dir", "out-5"),
        ("--config", "missing.yaml", "no such file"), absent=("out-5",)),
    Row("pretrain: missing tokenizer folder", (*tiny_pretrain("out-6"), "--tokenizer", "./no-tokenizer"),
        ("--tokenizer: no such folder: ./no-tokenizer",), absent=("out-6",)),
    Row("eval: missing model folder", ("eval", "--model", "./no-model"), ("--model: no such folder: ./no-model",),
        absent=("eval_base.json",)),
    Row("eval: folder without a model", ("eval", "--model", "tokenizer-only"), ("tokenizer-only", "no config.json"),
        absent=("eval_base.json", "tokenizer-only/eval_base.json")),
    Row("push: --dry-run names a file",
        ("push", "--model", "ckpt", "--repo-id", "someone/tiny", "--dry-run", "notes.txt"), ("notes.txt",)),
    Row("convert: malformed tokenizer.pkl",
        ("convert", "from-nanochat", "--checkpoint-dir", "bad-pkl", "--out", "out-10"),
        ("bad-pkl/tokenizer.pkl", "mergeable_ranks"), absent=("out-10",)),
    Row("convert: absurd sequence_len",
        ("convert", "from-nanochat", "--checkpoint-dir", "long-context", "--out", "out-11"),
        ("long-context/meta_000001.json", "sequence_len", "2147483648", "1,048,576"), absent=("out-11",)),
    Row("tokenizer train: empty file",
        ("tokenizer", "train", "--data", "empty.txt", "--out", "out-12", "--vocab-size", "300"),
        ("--data empty.txt", "no text"), absent=("out-12",)),
    Row("tokenizer train: only whitespace",
        ("tokenizer", "train", "--data", "blank.jsonl", "--out", "out-13", "--vocab-size", "300"),
        ("--data blank.jsonl", "no text"), absent=("out-13",)),
    Row("pretrain: --config without a file", ("pretrain", "--output_dir", "out-14", "--config"),
        ("--config: expected a recipe file",), absent=("out-14",)),
    Row("midtrain: missing base model", ("midtrain", "--init_from", "./no-model", "--output_dir", "out-15"),
        ("--init_from: no such folder: ./no-model", "nanochat-hf pretrain"), absent=("out-15",)),
    Row("sft: batch size 0", ("sft", "--init_from", "ckpt", "--device_batch_size", "0", "--output_dir", "out-16"),
        ("--device_batch_size 0", "at least 1"), absent=("out-16",)),
    Row("rl: one sample per question", ("rl", "--init_from", "ckpt", "--num_samples", "1", "--output_dir", "out-17"),
        ("--num_samples 1", "at least 2"), absent=("out-17",)),
    Row("init: missing tokenizer folder", ("init", "--tokenizer", "./no-tokenizer", "--depth", "2", "--out", "out-18"),
        ("--tokenizer: no such folder: ./no-tokenizer",), absent=("out-18",)),
    Row("chat: missing model folder (a stage's own SystemExit message)", ("chat", "--model", "./no-model", "-p", "hi"),
        ("no model folder at './no-model'",)),
    # what a shell sees, start-up included
    Row("eval: missing model folder, fresh process", ("eval", "--model", "./no-model"),
        ("--model: no such folder: ./no-model",), absent=("eval_base.json",), fresh=True),
)
DEBUG_ROWS = (
    Row("--debug", ("--debug", "eval", "--model", "./no-model"), ("--model: no such folder: ./no-model",),
        absent=("eval_base.json",), fresh=True),
    Row("NANOCHAT_HF_DEBUG=1", ("tokenizer", "train", "--data", "empty.txt", "--out", "out-debug"), ("no text",),
        absent=("out-debug",), env=(("NANOCHAT_HF_DEBUG", "1"),)),
)


def _env(root: Path, extra: tuple[tuple[str, str], ...] = ()) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NANOCHAT_", "HF_"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(root / "hf_home"),
               NANOCHAT_HF_CACHE=str(root / "cache"), TOKENIZERS_PARALLELISM="false", **dict(extra))
    return env


@dataclass(frozen=True)
class Result:
    returncode: int | str
    stderr: str


def _run(args: tuple[str, ...], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanochat_hf", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)


_GLOG_PREFIX = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ ")  # torch's log lines carry a time and a process id


def _normalise(line: str) -> str:
    return _GLOG_PREFIX.sub("", line)


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*"))}


def _fake_encoding_pickle(state: dict) -> bytes:
    """A tokenizer.pkl as tiktoken would pickle an Encoding with `state`, without needing tiktoken: a stand-in
    class named tiktoken.core.Encoding exists while it is pickled."""
    saved = sys.modules.get("tiktoken.core")
    module = types.ModuleType("tiktoken.core")

    class Encoding:
        def __getstate__(self) -> dict:
            return state

    Encoding.__module__, Encoding.__qualname__ = "tiktoken.core", "Encoding"
    module.Encoding = Encoding
    sys.modules["tiktoken.core"] = module
    try:
        return pickle.dumps(Encoding())
    finally:
        if saved is None:
            del sys.modules["tiktoken.core"]
        else:
            sys.modules["tiktoken.core"] = saved


def _nanochat_folder(folder: Path, sequence_len: int, pkl: bytes) -> None:
    """Just enough of a nanochat checkpoint folder to reach the meta and tokenizer checks."""
    folder.mkdir()
    (folder / "model_000001.pt").write_bytes(b"not read: the meta and tokenizer are checked first")
    meta = {"step": 1, "model_config": {"sequence_len": sequence_len, "vocab_size": 265, "n_layer": 2, "n_head": 2,
                                        "n_kv_head": 2, "n_embd": 128}}
    (folder / "meta_000001.json").write_text(json.dumps(meta))
    (folder / "tokenizer.pkl").write_bytes(pkl)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_checkpoint) -> Path:
    from nanochat_hf.tokenizer.bpe import SPECIAL_TOKENS

    root = tmp_path_factory.mktemp("cli_errors")
    work = root / "work"
    work.mkdir()
    shutil.copytree(tiny_checkpoint, work / "ckpt")
    (work / "tokenizer-only").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(work / "ckpt" / name, work / "tokenizer-only" / name)
    (work / "broken.yaml").write_text("depth: 4\ndevice_batch_size: [8\n")
    (work / "notes.txt").write_text("my notes, not a folder\n")
    (work / "empty.txt").write_text("")
    (work / "blank.jsonl").write_text(json.dumps({"text": "  \n\t "}) + "\n" + json.dumps({"text": ""}) + "\n")
    ranks = {bytes([b]): b for b in range(256)}
    specials = {token: 256 + i for i, token in enumerate(SPECIAL_TOKENS)}
    good = {"name": "rustbpe", "pat_str": r"\S+|\s+", "mergeable_ranks": ranks, "special_tokens": specials}
    _nanochat_folder(work / "bad-pkl", 64, _fake_encoding_pickle({**good, "mergeable_ranks": list(ranks)}))
    _nanochat_folder(work / "long-context", 2**31, _fake_encoding_pickle(good))
    return work


PRELOAD = ("nanochat_hf.cli", "nanochat_hf.training.pretrain", "nanochat_hf.training.midtrain", "nanochat_hf.training.sft", "nanochat_hf.training.rl",
           "nanochat_hf.evaluation.evaluate", "nanochat_hf.hub.push", "nanochat_hf.hub.convert", "nanochat_hf.tokenizer.cli",
           "nanochat_hf.training.init_model", "nanochat_hf.inference.chat_cli")


def _run_forked(rows: tuple[Row, ...], cwd: Path, env: dict[str, str]) -> tuple[list[dict], str]:
    """The rows through tests/cli_rows.py: imports paid once, then one forked process per row."""
    job, out = cwd.parent / "job.json", cwd.parent / "results.json"
    job.write_text(json.dumps({"preload": PRELOAD, "rows": [
        {"argv": list(row.argv), "cwd": str(cwd), "env": dict(row.env)} for row in rows]}))
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("cli_rows.py")), str(job), str(out)],
                          env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stderr


@pytest.fixture(scope="module")
def results(workdir):
    """Every row's result, and the working folder's hashes before and after all of them. The forked rows run one
    after the other in one runner; beside it, the fresh rows run one after the other. What the runner's imports
    print on stderr (libraries' import-time warnings, not ours to judge) is left out of the fresh rows' stderr."""
    before = _snapshot(workdir)
    forked_rows = tuple(row for row in ROWS + DEBUG_ROWS if not row.fresh)
    fresh_rows = tuple(row for row in ROWS + DEBUG_ROWS if row.fresh)

    def run_fresh() -> list[subprocess.CompletedProcess]:
        return [_run(row.argv, workdir, _env(workdir.parent, row.env)) for row in fresh_rows]

    with ThreadPoolExecutor(2) as pool:
        forked = pool.submit(_run_forked, forked_rows, workdir, _env(workdir.parent))
        fresh = pool.submit(run_fresh)
        forked_results, import_noise = forked.result()
        procs = {row: Result(r["returncode"], r["stderr"]) for row, r in zip(forked_rows, forked_results, strict=True)}
        procs |= {row: Result(p.returncode, p.stderr) for row, p in zip(fresh_rows, fresh.result(), strict=True)}
    noise = {_normalise(line) for line in import_noise.splitlines()}
    return procs, noise, before, _snapshot(workdir)


def _stderr_lines(proc: Result, noise: set[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip() and _normalise(line) not in noise]


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_bad_input_is_one_line_and_exit_2(row, results, workdir):
    procs, noise, _, _ = results
    proc = procs[row]
    lines = _stderr_lines(proc, noise)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    command = next(arg for arg in row.argv if not arg.startswith("-"))
    assert lines[0].startswith(f"nanochat-hf {command}"), lines[0]
    assert ": error: " in lines[0]
    for fragment in row.expect:
        assert fragment in lines[0], lines[0]
    for path in row.absent:
        assert not (workdir / path).exists(), path


def test_nothing_is_written_or_lost(results):
    _, _, before, after = results
    assert after == before


@pytest.mark.parametrize("row", DEBUG_ROWS, ids=[row.name for row in DEBUG_ROWS])
def test_debug_adds_the_traceback(row, results, workdir):
    procs, noise, _, _ = results
    proc = procs[row]
    lines = _stderr_lines(proc, noise)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines[0] == "Traceback (most recent call last):", proc.stderr[-3000:]
    assert ": error: " in lines[-1] and all(fragment in lines[-1] for fragment in row.expect), lines[-1]
    for path in row.absent:
        assert not (workdir / path).exists(), path


# ---------------------------------------------------------------------------------------------------------------
# Each stage's arguments refuse a nonsensical value when they are parsed, before anything loads.


def _parsers():
    from nanochat_hf.training.midtrain import parse_midtrain_args
    from nanochat_hf.training.pretrain import parse_args
    from nanochat_hf.training.rl import parse_rl_args
    from nanochat_hf.training.sft import parse_sft_args

    return {"pretrain": parse_args, "midtrain": parse_midtrain_args, "sft": parse_sft_args, "rl": parse_rl_args}


@pytest.mark.parametrize(("stage", "flag", "value", "message"), [
    ("pretrain", "--depth", "0", "--depth 0: must be at least 1"),
    ("pretrain", "--max_seq_len", "-8", "--max_seq_len -8: must be at least 1"),
    ("pretrain", "--total_batch_size", "0", "--total_batch_size 0: must be at least 1, or -1"),
    ("pretrain", "--warmdown_ratio", "1.5", "--warmdown_ratio 1.5: must be between 0 and 1"),
    ("pretrain", "--matrix_lr", "-0.02", "--matrix_lr -0.02: must be at least 0"),
    ("pretrain", "--eval_every", "0", "--eval_every 0: must be at least 1, or -1 (steps between val"),
    ("pretrain", "--target_param_data_ratio", "0", "--target_param_data_ratio 0.0: must be greater than 0"),
    ("pretrain", "--generation", "2024", "--generation '2024': use one of 2025, 2026"),
    ("pretrain", "--fp8_recipe", "blockwise", "--fp8_recipe 'blockwise': use one of"),
    ("midtrain", "--device_batch_size", "0", "--device_batch_size 0: must be at least 1"),
    ("midtrain", "--max_rows", "0", "--max_rows 0: must be at least 1, or -1"),
    ("sft", "--target_examples_per_step", "0", "--target_examples_per_step 0: must be at least 1"),
    ("sft", "--num_epochs", "0", "--num_epochs 0.0: must be greater than 0"),
    ("rl", "--num_samples", "1", "--num_samples 1: must be at least 2"),
    ("rl", "--temperature", "0", "--temperature 0.0: must be greater than 0"),
    ("rl", "--max_new_tokens", "0", "--max_new_tokens 0: must be at least 1"),
])
def test_stage_arguments_are_validated(stage, flag, value, message):
    from nanochat_hf.errors import UsageError

    with pytest.raises(UsageError) as err:
        _parsers()[stage]([flag, value])
    assert str(err.value).startswith(message), str(err.value)


def test_recipes_pass_validation():
    root = Path(__file__).resolve().parents[1] / "recipes"
    parsers = _parsers()
    recipes = sorted(root.glob("*/*.yaml"))
    assert recipes
    for recipe in recipes:
        parsers[recipe.stem.removesuffix("-2026")](["--config", str(recipe)])


def test_whitespace_only_text_trains_no_tokenizer():
    from nanochat_hf.tokenizer.bpe import train_tokenizer

    with pytest.raises(ValueError, match="no text to train on"):
        train_tokenizer(["", " \n ", "\t"], vocab_size=300, show_progress=False)
