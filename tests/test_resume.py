"""Resuming from whatever a crash or a user leaves in a run folder (issue 15 §3), driven by real training runs.

One pretraining run with a checkpoint every 2 steps is the reference. Copies of its folder are then damaged the
ways a killed save, a user or a planted file would, and resumed: the run must go on from the newest complete
checkpoint, say what it skipped and why, never run code stored in a checkpoint, and end with the reference's
losses. A run killed before its first checkpoint, and a midtraining run, cover the rest.
"""

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from nanochat_hf.training.checkpoints import checkpoint_problem, find_resume_checkpoint, load_data_state
from nanochat_hf.training.midtrain import parse_midtrain_args
from nanochat_hf.training.midtrain import train as midtrain
from nanochat_hf.training.pretrain import parse_args, train

from .chat_fixtures import conversations, write_jsonl
from .test_pretrain import _spawn, losses, tiny_argv, workdir  # noqa: F401  (workdir: the corpus + tokenizer fixture)

RUN = dict(num_iterations=6, save_every=2, keep_last=3, eval_every=-1, log_every=1, num_workers=0)


class Planted:
    """What an attacker leaves in a checkpoint: unpickling it creates `marker` (any code could run instead)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(checkpoint: Path, marker: Path) -> None:
    """Replace the checkpoint's data state by a .pt file that runs code when unpickled without weights_only."""
    (checkpoint / "data_state_rank0.json").unlink(missing_ok=True)
    torch.save({"format": 1, "feed": Planted(marker)}, checkpoint / "data_state_rank0.pt")
    assert not marker.exists()


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "losses.jsonl").read_text().splitlines()]


def resume_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("resume:")]


@pytest.fixture(scope="module")
def reference(workdir, tmp_path_factory) -> Path:  # noqa: F811
    """6 steps, checkpoints at 2, 4 and 6: the uninterrupted run every resumed one must reproduce."""
    out = tmp_path_factory.mktemp("resume") / "reference"
    train(parse_args(tiny_argv(workdir, out, **RUN)))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    return out


def test_resume_skips_what_a_crash_or_a_user_left_and_runs_no_stored_code(workdir, reference, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "final")
    shutil.copytree(out / "checkpoint-6", out / "checkpoint-6.bak")  # the user's copy: not a checkpoint of the run
    truncate(out / "checkpoint-6" / "optimizer.pt")  # the newest checkpoint lost its tail (disk full, bad copy)
    marker = tmp_path / "pwned"
    plant(out / "checkpoint-4", marker)
    leftover = out / ".staging" / "checkpoint-8"  # a save killed half-way
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"\0" * 100)
    capsys.readouterr()

    train(parse_args(tiny_argv(workdir, out, resume=True, **RUN)))

    said = resume_lines(capsys)
    assert not marker.exists(), "resuming ran code stored in a checkpoint"
    assert any("ignoring checkpoint-6.bak" in line for line in said), said
    assert any(".staging" in line and "checkpoint-8" in line for line in said), said
    assert any("skipping checkpoint-6 (optimizer.pt is truncated" in line for line in said), said
    assert any("skipping checkpoint-4 (data_state_rank0.pt" in line for line in said), said
    assert said[-1] == "resume: resuming from checkpoint-2", said
    assert steps(out) == [1, 2, 3, 4, 5, 6]
    a, b = losses(reference), losses(out)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-6
    assert (out / "checkpoint-6.bak").is_dir(), "checkpoint rotation deleted the user's copy"
    assert not (out / ".staging").exists()
    assert checkpoint_problem(out / "checkpoint-6") is None  # saved again, whole
    assert (out / "checkpoint-6" / "data_state_rank0.json").is_file()


def test_a_run_killed_before_its_first_checkpoint_logs_each_step_once(workdir, reference, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    argv = tiny_argv(workdir, out, **{**RUN, "save_every": -1})  # the only checkpoint is the last step's
    proc = _spawn(argv, tmp_path)
    deadline = time.time() + 300
    while not (out / "losses.jsonl").exists() or len((out / "losses.jsonl").read_text().splitlines()) < 2:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list(out.glob("checkpoint-*")) and not (out / "final").exists()
    with open(out / "losses.jsonl", "a") as f:  # killed in the middle of writing a line
        f.write('{"step": 9, "lo')
    capsys.readouterr()

    train(parse_args([*argv, "--resume", "True"]))

    assert resume_lines(capsys)[-1].startswith("resume: no complete checkpoint")
    assert steps(out) == [1, 2, 3, 4, 5, 6]
    a, b = losses(reference), losses(out)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-6


@pytest.mark.parametrize("name,damage,reason", [
    ("model.safetensors", truncate, "model.safetensors is truncated"),
    ("scheduler.pt", truncate, "scheduler.pt is truncated"),
    ("rng_state.pth", Path.unlink, "rng_state.pth is missing"),
    ("trainer_state.json", truncate, "trainer_state.json is not valid JSON"),
    ("data_state_rank0.json", truncate, "data_state_rank0.json is not valid JSON"),
])
def test_a_damaged_checkpoint_names_the_file(reference, tmp_path, name, damage, reason):
    checkpoint = shutil.copytree(reference / "checkpoint-6", tmp_path / "checkpoint-6")
    assert checkpoint_problem(checkpoint) is None
    damage(checkpoint / name)
    assert reason in checkpoint_problem(checkpoint)


def test_old_pt_data_states_load_without_unpickling_code(reference, tmp_path):
    checkpoint = shutil.copytree(reference / "checkpoint-6", tmp_path / "checkpoint-6")
    state = json.loads((checkpoint / "data_state_rank0.json").read_text())
    state["buffer"] = state["buffer"][:4]  # weights_only's unpickler is slow on the 12 MB a full buffer takes
    (checkpoint / "data_state_rank0.json").unlink()
    torch.save(state, checkpoint / "data_state_rank0.pt")  # how checkpoints were written before
    assert checkpoint_problem(checkpoint) is None and load_data_state(checkpoint, 0) == state
    marker = tmp_path / "pwned"
    plant(checkpoint, marker)
    assert "data_state_rank0.pt" in checkpoint_problem(checkpoint)
    assert not marker.exists()


def test_resume_refuses_a_checkpoint_of_another_world_size(reference, tmp_path):
    out = tmp_path / "run"
    checkpoint = shutil.copytree(reference / "checkpoint-6", out / "checkpoint-6")
    shutil.copy(checkpoint / "data_state_rank0.json", checkpoint / "data_state_rank1.json")
    for rank in (0, 1):
        shutil.copy(checkpoint / "rng_state.pth", checkpoint / f"rng_state_{rank}.pth")
    (checkpoint / "rng_state.pth").unlink()
    with pytest.raises(ValueError, match="saved by 2 processes.*this run has 1"):
        find_resume_checkpoint(out, world_size=1)
    assert find_resume_checkpoint(out, world_size=2) == checkpoint


def test_midtraining_resume_runs_no_stored_code(tiny_checkpoint, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(24))
    out = tmp_path / "mid"
    argv = ["--init_from", str(tiny_checkpoint), "--conversations", data, "--output_dir", str(out),
            "--num_iterations", "2", "--device_batch_size", "2", "--total_batch_size", "512", "--val_rows", "4",
            "--eval_every", "-1", "--save_every", "1", "--keep_last", "2", "--log_every", "1"]
    midtrain(parse_midtrain_args(argv))
    marker = tmp_path / "pwned"
    plant(out / "checkpoint-2", marker)
    capsys.readouterr()

    midtrain(parse_midtrain_args([*argv, "--resume", "True"]))

    said = resume_lines(capsys)
    assert not marker.exists(), "resuming ran code stored in a checkpoint"
    assert any("skipping checkpoint-2 (data_state_rank0.pt" in line for line in said), said
    assert said[-1] == "resume: resuming from checkpoint-1", said
    assert steps(out) == [1, 2]
