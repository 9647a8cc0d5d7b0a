"""No command destroys a user's files (issue 15 §2), and a failed run leaves no empty folder behind (§5).

Every command that writes a folder is driven through the real CLI (`nanochat_hf.cli.main`, and `python -m
nanochat_hf` in a subprocess for the two reported cases). Each refusal must exit with status 2 and one error line,
and leave every file under the test's folder exactly as it was (compared by content hash).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from nanochat_hf.cli import main as cli_main
from nanochat_hf.data.embedded import embedded_corpus

ROOT = Path(__file__).resolve().parent.parent
USER_FILES = {"notes.txt": "my notes\n", "sub/data.csv": "a,b\n1,2\n"}


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under `root` (hidden ones included), files by the hash of their bytes."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        found[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return found


def user_folder(path: Path, *extra: str) -> Path:
    """A folder holding files nanochat-hf did not write (plus `extra` empty marker files, e.g. config.json)."""
    for name, text in USER_FILES.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    for name in extra:
        (path / name).write_text("{}\n")
    return path


def run(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Exit status and the error lines of one `nanochat-hf ...` command run in this process."""
    capsys.readouterr()
    try:
        cli_main(argv)
        code = 0
    except SystemExit as stop:
        code = stop.code
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    return code, errors


def refused(argv: list[str], capsys, *fragments: str) -> str:
    code, errors = run(argv, capsys)
    assert code == 2 and len(errors) == 1, (code, errors)
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer, a 2025-generation model and its nanochat-format export, all written by the CLI itself."""
    root = tmp_path_factory.mktemp("inputs")
    docs = root / "docs.txt"
    docs.write_text("\n\n".join(embedded_corpus(max_chars=30_000)))
    tok, model, nanochat = root / "tok", root / "model", root / "nanochat"
    cli_main(["tokenizer", "train", "--data", str(docs), "--vocab-size", "300", "--no-progress", "--out", str(tok)])
    cli_main(["init", "--tokenizer", str(tok), "--depth", "1", "--head-dim", "16", "--sequence-len", "64",
              "--generation", "2025", "--out", str(model)])
    cli_main(["convert", "to-nanochat", "--model", str(model), "--out", str(nanochat)])
    data = user_folder(root / "data", "config.json")  # looks like one of ours: only the input rule can refuse it
    (data / "docs.txt").write_text(docs.read_text())
    return {"docs": docs, "data": data, "tok": tok, "model": model, "nanochat": nanochat}


# command -> (argv writing OUT, the folder the command reads)
COMMANDS: dict[str, Callable[[dict[str, Path], str], tuple[list[str], Path]]] = {
    "tokenizer train": lambda i, out: (["tokenizer", "train", "--data", str(i["data"]), "--vocab-size", "300",
                                        "--no-progress", "--out", out], i["data"]),
    "init": lambda i, out: (["init", "--tokenizer", str(i["tok"]), "--depth", "1", "--head-dim", "16",
                             "--sequence-len", "64", "--generation", "2025", "--out", out], i["tok"]),
    "convert from-nanochat": lambda i, out: (["convert", "from-nanochat", "--checkpoint-dir", str(i["nanochat"]),
                                              "--out", out], i["nanochat"]),
    "convert to-nanochat": lambda i, out: (["convert", "to-nanochat", "--model", str(i["model"]), "--out", out],
                                           i["model"]),
    "convert to-transformers": lambda i, out: (["convert", "to-transformers", "--model", str(i["model"]),
                                                "--out", out], i["model"]),
    "push --dry-run": lambda i, out: (["push", "--model", str(i["model"]), "--repo-id", "someone/tiny",
                                       "--dry-run", out], i["model"]),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_folder_of_user_files_is_refused_with_or_without_overwrite(command, inputs, tmp_path, capsys):
    out = user_folder(tmp_path / "mine")
    before = snapshot(tmp_path)
    argv, _ = COMMANDS[command](inputs, str(out))
    refused(argv, capsys, str(out), "not empty", "--overwrite")
    refused(argv + ["--overwrite"], capsys, str(out), "not written by nanochat-hf")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", COMMANDS)
def test_overwrite_refuses_the_current_folder_its_parents_home_and_the_input(command, inputs, tmp_path, capsys,
                                                                            monkeypatch):
    # every folder here looks like one of ours (config.json), so only the rule under test can refuse it
    parent = user_folder(tmp_path / "parent", "config.json")
    cwd = user_folder(parent / "cwd", "config.json")
    home = user_folder(tmp_path / "home", "config.json")
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    before, input_before = snapshot(tmp_path), snapshot(inputs["data"].parent)
    make = COMMANDS[command]
    refused(make(inputs, ".")[0] + ["--overwrite"], capsys, "current folder")
    refused(make(inputs, str(cwd))[0] + ["--overwrite"], capsys, "current folder")
    refused(make(inputs, "..")[0] + ["--overwrite"], capsys, "current folder")
    refused(make(inputs, str(home))[0] + ["--overwrite"], capsys, "home folder")
    source = make(inputs, "unused")[1]
    refused(make(inputs, str(source))[0] + ["--overwrite"], capsys, "input", str(source))
    refused(make(inputs, str(source / "inside"))[0], capsys, "input", str(source))  # inside the input: refused too
    assert snapshot(tmp_path) == before and snapshot(inputs["data"].parent) == input_before


def modes(folder: Path) -> set[tuple[str, int]]:
    return {("dir" if p.is_dir() else "file", p.stat().st_mode & 0o777) for p in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("command", COMMANDS)
def test_overwrite_replaces_our_folder_whole_with_the_users_permissions(command, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(inputs["model"], out)  # one of ours
    (out / "stale.txt").write_text("from an older run")
    argv, _ = COMMANDS[command](inputs, str(out))
    refused(argv, capsys, "not empty", "--overwrite")
    assert (out / "stale.txt").exists()
    old_umask = os.umask(0o027)
    try:
        code, errors = run(argv + ["--overwrite"], capsys)
    finally:
        os.umask(old_umask)
    assert code == 0, errors
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "a staging or old folder was left beside OUT"
    assert modes(out) == {("dir", 0o750), ("file", 0o640)}, "not the user's umask (0o027)"
    assert all(p.stat().st_nlink == 1 for p in out.rglob("*") if p.is_file()), "a file is a hard link"


def test_a_build_that_fails_half_way_leaves_the_old_folder_and_nothing_beside_it(tmp_path):
    from nanochat_hf.output_folder import staged_folder

    old = user_folder(tmp_path / "out", "config.json")
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError), staged_folder(old) as staged:
        (staged / "config.json").write_text("half written")
        raise RuntimeError("killed half-way")
    with pytest.raises(RuntimeError), staged_folder(tmp_path / "new" / "deeper" / "out") as staged:
        (staged / "config.json").write_text("half written")
        raise RuntimeError("killed half-way")
    assert snapshot(tmp_path) == before  # no staging folder, no new/deeper/ made for it


def test_push_dry_run_copies_the_weights(inputs, tmp_path, capsys):
    out = tmp_path / "dry"
    code, errors = run(COMMANDS["push --dry-run"](inputs, str(out))[0], capsys)
    assert code == 0, errors
    staged = out / "model" / "model.safetensors"
    assert not staged.samefile(inputs["model"] / "model.safetensors")
    assert staged.stat().st_nlink == 1 and staged.read_bytes() == (inputs["model"] / "model.safetensors").read_bytes()


def test_a_failed_dry_run_leaves_no_folder(inputs, tmp_path, capsys):
    out = tmp_path / "new" / "dry"
    refused(["push", "--model", str(tmp_path / "nope"), "--repo-id", "someone/tiny", "--space", "someone/chat",
             "--dry-run", str(out)], capsys, "nope")
    assert list(tmp_path.iterdir()) == []


def test_a_training_stage_refuses_a_folder_that_is_not_a_run_and_continues_one_that_is(inputs, tmp_path):
    from nanochat_hf.training.pretrain import main as pretrain_main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = list(embedded_corpus(max_chars=60_000))
    for i in range(2):
        (corpus / f"shard_{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[i::2]))
    argv = ["--tokenizer", str(inputs["tok"]), "--dataset", str(corpus), "--depth", "1", "--head_dim", "16",
            "--max_seq_len", "32", "--window_pattern", "L", "--device_batch_size", "2", "--total_batch_size", "64",
            "--num_iterations", "1", "--eval_every", "-1", "--num_workers", "1", "--warmup_steps", "0"]
    mine = user_folder(tmp_path / "mine")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="not a nanochat-hf run"):
        pretrain_main(argv + ["--output_dir", str(mine)])
    with pytest.raises(ValueError, match="input"):
        pretrain_main(argv + ["--output_dir", str(inputs["tok"])])
    with pytest.raises(ValueError, match="input"):
        pretrain_main(argv + ["--output_dir", str(corpus / "run")])
    assert snapshot(tmp_path) == before
    run_dir = user_folder(tmp_path / "run", "losses.jsonl")  # an earlier run's folder, with the user's notes in it
    pretrain_main(argv + ["--output_dir", str(run_dir)])
    assert (run_dir / "notes.txt").read_text() == USER_FILES["notes.txt"]
    assert (run_dir / "final" / "config.json").is_file()


def test_a_failed_training_stage_leaves_no_empty_folder(inputs, tmp_path, monkeypatch):
    from nanochat_hf.training.sft import main as sft_main

    conversations = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 4
    conversations.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # refused after the output folder is made
    out = tmp_path / "runs" / "sft"
    with pytest.raises(ValueError, match="FSDP"):
        sft_main(["--init_from", str(inputs["model"]), "--conversations", str(conversations), "--output_dir", str(out),
                  "--device_batch_size", "2", "--target_examples_per_step", "2", "--eval_every", "-1"])
    assert not (tmp_path / "runs").exists()


def test_the_reported_cases_through_python_m(inputs, tmp_path):
    """`tokenizer train --out . --overwrite` deleted the current folder; `init --out <model>` replaced a model."""
    cwd = user_folder(tmp_path / "cwd")
    model = tmp_path / "trained"
    shutil.copytree(inputs["model"], model)
    before = snapshot(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cases = [
        (["tokenizer", "train", "--out", ".", "--overwrite", "--data", str(inputs["docs"]), "--vocab-size", "300"],
         "current folder"),
        (["init", "--tokenizer", str(inputs["tok"]), "--depth", "1", "--out", str(model)], "--overwrite"),
    ]
    # both at once: each pays several seconds of imports
    procs = [subprocess.Popen([sys.executable, "-m", "nanochat_hf", *argv], cwd=cwd, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for argv, _ in cases]
    for proc, (_, fragment) in zip(procs, cases, strict=True):
        _, err = proc.communicate(timeout=300)
        errors = [line for line in err.splitlines() if "error:" in line]
        assert proc.returncode == 2 and len(errors) == 1 and fragment in errors[0], (proc.returncode, err[-2000:])
    assert snapshot(tmp_path) == before


def test_a_speedrun_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    mine = user_folder(tmp_path / "mine")
    before = snapshot(tmp_path)
    refused(["speedrun", "--run-dir", str(mine)], capsys, str(mine), "not a nanochat-hf run")
    assert snapshot(tmp_path) == before
