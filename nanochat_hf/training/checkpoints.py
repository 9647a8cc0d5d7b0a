"""The checkpoints of a pretraining or midtraining run: which one a run resumes from, the data state saved beside
the Trainer's files, and which old ones are deleted.

A checkpoint is a folder of the run's output folder named exactly ``checkpoint-<step>``. It is written whole into
``.staging/`` first and moved into place once every process has written its part, so a save killed half-way leaves
only ``.staging/``, which the next start of the run deletes (nothing else ever goes there). Anything else named
like a checkpoint (``checkpoint-30.bak``, a user's copy) is ignored, never resumed from and never deleted.

A checkpoint is *complete* when every file resuming reads is present and whole:

    config.json, trainer_state.json      parse as JSON
    model.safetensors                    its header parses and the file is exactly as long as the header says
    optimizer.pt, scheduler.pt,          torch's zip archives: the zip directory at the end of the file is there,
    rng_state.pth (rng_state_<r>.pth)      and every entry it lists lies inside the file
    data_state_rank<r>.json              parses as a JSON object (one per process)

These checks read headers only, never the tensors, so they cost next to nothing at any model size. A file cut short
(a full disk, a copy interrupted, a save killed before the atomic save existed) fails them. Resuming starts from the
newest complete checkpoint and says which newer ones it skipped, naming the file at fault.

Resuming never runs code stored in a checkpoint: the Trainer loads its own files with ``weights_only=True``, and the
stream's state is JSON. Checkpoints written before the state was JSON hold ``data_state_rank<r>.pt``; those are read
with ``weights_only=True`` too, which loads their plain lists and numbers and refuses anything that would run code.
"""

import json
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

STAGING = ".staging"
DATA_STATE = "data_state_rank{rank}.json"
LEGACY_DATA_STATE = "data_state_rank{rank}.pt"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_DATA_STATE_FILE = re.compile(r"data_state_rank(\d+)\.(?:json|pt)")


class CheckpointError(ValueError):
    """A checkpoint file that resuming cannot use; the message starts with the file's name."""


def _silent(message: str) -> None:
    pass


def checkpoint_step(path: Path) -> int | None:
    """The step of a folder named exactly ``checkpoint-<step>``; None for anything else."""
    match = _CHECKPOINT.fullmatch(path.name)
    return int(match.group(1)) if match and path.is_dir() else None


# --- the data state ----------------------------------------------------------------------------------------------
def save_data_state(state: dict[str, Any], checkpoint: Path, rank: int) -> None:
    """The stream's state as JSON: reading it back can only ever build lists, numbers and strings."""
    (checkpoint / DATA_STATE.format(rank=rank)).write_text(json.dumps(state))


def load_data_state(checkpoint: Path, rank: int) -> dict[str, Any]:
    """This process's stream state from `checkpoint`; :class:`CheckpointError` naming the file if it is unusable."""
    path = checkpoint / DATA_STATE.format(rank=rank)
    legacy = checkpoint / LEGACY_DATA_STATE.format(rank=rank)
    if path.is_file():
        try:
            state = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path.name} is not valid JSON, truncated? ({err})") from None
    elif legacy.is_file():
        try:
            # weights_only: plain containers, numbers, strings and tensors load; a pickled callable is refused
            state = torch.load(legacy, weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"{legacy.name} is not plain data ({_unpickler_reason(err)}), so it was not "
                                  "unpickled") from None
        except (RuntimeError, EOFError, OSError) as err:
            raise CheckpointError(f"{legacy.name} is truncated or damaged ({err})") from None
    else:
        raise CheckpointError(f"{path.name} is missing")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path.name if path.is_file() else legacy.name} is not a data state (expected a "
                              f"mapping, found {type(state).__name__})")
    return state


def _unpickler_reason(err: pickle.UnpicklingError) -> str:
    """The line of torch's long weights_only message that names what was refused ("Unsupported global: ...")."""
    lines = [line.strip() for line in str(err).splitlines()]
    named = [line.split("error: ", 1)[-1] for line in lines if line.startswith("WeightsUnpickler error")]
    return (named or lines or [type(err).__name__])[0].split(" was not an allowed global")[0]


# --- what makes a checkpoint complete ----------------------------------------------------------------------------
def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"is not valid JSON, truncated? ({err})"
    return None


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return f"is truncated: {size} bytes, too short for a safetensors header"
        header_len = int.from_bytes(prefix, "little")
        if 8 + header_len > size:
            return f"is truncated: its header needs {8 + header_len} bytes, the file has {size}"
        try:
            header = json.loads(f.read(header_len))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, IndexError) as err:
            return f"has a damaged safetensors header ({err})"
    expected = 8 + header_len + end
    if size < expected:
        return f"is truncated: its header lists {expected} bytes of tensors, the file has {size}"
    if size > expected:
        return f"is damaged: {size} bytes where its header lists {expected}"
    return None


def _torch_file_problem(path: Path) -> str | None:
    """torch.save writes a zip archive whose directory is at the very end: a file cut short has none."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        return f"is truncated: no zip directory at its end ({size} bytes; {err})"
    for entry in entries:
        if entry.header_offset + entry.compress_size > size:
            return f"is truncated: its entry {entry.filename} ends past the file's {size} bytes"
    return None


def _saved_ranks(checkpoint: Path) -> list[int]:
    return sorted({int(m.group(1)) for p in checkpoint.iterdir() if (m := _DATA_STATE_FILE.fullmatch(p.name))})


def saved_world_size(checkpoint: Path) -> int:
    """How many processes wrote `checkpoint`: one data state each."""
    return len(_saved_ranks(checkpoint))


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why resuming cannot use `checkpoint` ("optimizer.pt is truncated: ..."), or None when it is complete."""
    ranks = _saved_ranks(checkpoint)
    missing = [rank for rank in range(max(ranks) + 1 if ranks else 1) if rank not in ranks]
    if missing:
        return f"{DATA_STATE.format(rank=missing[0])} is missing"
    rng_files = ["rng_state.pth"] if len(ranks) == 1 else [f"rng_state_{rank}.pth" for rank in ranks]
    checks: list[tuple[str, Callable[[Path], str | None]]] = [
        ("config.json", _json_problem),
        ("trainer_state.json", _json_problem),
        ("model.safetensors", _safetensors_problem),
        ("optimizer.pt", _torch_file_problem),
        ("scheduler.pt", _torch_file_problem),
        *((name, _torch_file_problem) for name in rng_files),
    ]
    for name, check in checks:
        path = checkpoint / name
        problem = check(path) if path.is_file() else "is missing"
        if problem:
            return f"{name} {problem}"
    for rank in ranks:
        try:
            load_data_state(checkpoint, rank)
        except CheckpointError as err:
            return str(err)
    return None


# --- starting a run in its folder --------------------------------------------------------------------------------
def clear_staging(output_dir: str | Path, say: Callable[[str], None] = _silent) -> None:
    """Delete what a save killed half-way left in ``<output_dir>/.staging`` (only our saves write there). Call it on
    the main process before training starts: the other processes write into it only when the first save comes."""
    staging = Path(output_dir) / STAGING
    if staging.is_dir():
        left = sorted(p.name for p in staging.iterdir())
        shutil.rmtree(staging)
        say(f"resume: deleted {STAGING}/{{{', '.join(left)}}}, left by a save that was interrupted")


def find_resume_checkpoint(output_dir: str | Path, world_size: int,
                           say: Callable[[str], None] = _silent) -> Path | None:
    """The newest complete checkpoint of the run in `output_dir` (None: there is none, start from step 0), telling
    `say` what it ignored or skipped and why. Refuses a checkpoint written by another number of processes."""
    folder = Path(output_dir)
    found: list[tuple[int, Path]] = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not path.name.startswith("checkpoint"):
            continue
        step = checkpoint_step(path)
        if step is None:
            say(f"resume: ignoring {path.name} (not a checkpoint-<step> folder)")
        else:
            found.append((step, path))
    for _, checkpoint in sorted(found, reverse=True):
        problem = checkpoint_problem(checkpoint)
        if problem:
            say(f"resume: skipping {checkpoint.name} ({problem})")
            continue
        saved = saved_world_size(checkpoint)
        if saved != world_size:
            raise ValueError(f"cannot resume from {checkpoint}: it was saved by {saved} processes and this run has "
                             f"{world_size}; launch it with {saved} processes (the data streams are split per process)")
        say(f"resume: resuming from {checkpoint.name}")
        return checkpoint
    say(f"resume: no complete checkpoint in {folder}; starting from step 0")
    return None


def resume_point(output_dir: str | Path, *, resume: bool, rank: int, world_size: int) -> Path | None:
    """Start-up of a run in `output_dir`: delete what an interrupted save left in .staging, then, with `resume`, pick
    the newest complete checkpoint; the main process says what it deleted, ignored or skipped, and why. Returns the
    checkpoint to resume from, None to start from step 0. Every process picks the same one from the same files."""
    say = (lambda message: print(message, flush=True)) if rank == 0 else _silent
    if rank == 0:  # before the first step: no process writes into .staging before the first save
        clear_staging(output_dir, say)
    return find_resume_checkpoint(output_dir, world_size, say) if resume else None


def truncate_step_logs(output_dir: str | Path, checkpoint: Path | None) -> None:
    """Drop from losses.jsonl and bpb.jsonl every step after `checkpoint`'s, the one the run starts from (all of
    them when it starts from step 0, `checkpoint` None): they are trained again. A line cut short by a killed process
    is dropped too."""
    step = checkpoint_step(checkpoint) if checkpoint is not None else 0
    for name in ("losses.jsonl", "bpb.jsonl"):
        path = Path(output_dir) / name
        if not path.is_file():
            continue
        lines = path.read_text().splitlines()
        kept = [line for line in lines if _logged_step(line) is not None and _logged_step(line) <= step]
        if kept != lines:
            path.write_text("".join(line + "\n" for line in kept))


def _logged_step(line: str) -> int | None:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return None
    return entry.get("step") if isinstance(entry, dict) and isinstance(entry.get("step"), int) else None


def rotate_checkpoints(output_dir: str | Path, keep: int | None, step: int) -> None:
    """Keep the newest `keep` checkpoints up to `step`. Only folders named exactly ``checkpoint-<step>`` count (the
    Trainer's own rotation would also delete ``checkpoint-30.bak``); those after `step` are left alone: they are the
    skipped checkpoints of an attempt that went further, and the run replaces each one when it gets there."""
    if keep is None or keep <= 0:
        return
    ours = sorted((s, p) for p in Path(output_dir).iterdir() if (s := checkpoint_step(p)) is not None and s <= step)
    for _, path in ours[:-keep]:
        shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------------------------
# What a pretraining run leaves beside its final model for HEAD's SFT (nanochat-spec.md §4.4): the run's recorded
# arguments and plan, and the optimizer's final state. `push` uploads neither (it stages only the weights, the
# tokenizer, the config and the code), so they stay on the machine that trained.

RUN_RECORD = "run_args.json"
OPTIMIZER_STATE = "optimizer.pt"


def write_run_record(folder: str | Path, stage: str, arguments: dict[str, Any], plan: dict[str, Any]) -> None:
    """`<folder>/run_args.json`: the stage, its arguments as given (nanochat's `user_config`) and the plan they
    resolved to (the total batch in tokens, the number of steps)."""
    record = {"stage": stage, "arguments": arguments, "plan": plan}
    (Path(folder) / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def read_run_record(folder: str | Path) -> dict[str, Any] | None:
    """The record :func:`write_run_record` left in `folder`; None where there is none (a model from elsewhere)."""
    path = Path(folder) / RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a JSON run record ({err}); delete it to fall back to nanochat's defaults") \
            from None
    if not (isinstance(record, dict) and isinstance(record.get("arguments"), dict)
            and isinstance(record.get("plan"), dict)):
        raise ValueError(f"{path}: a run record needs 'arguments' and 'plan' objects; delete it to fall back to "
                         "nanochat's defaults")
    return record


def save_optimizer_state(optimizer: torch.optim.Optimizer, folder: str | Path) -> None:
    """The optimizer's whole state (every rank holds all of it: see nanochat_hf.training.optim) as `<folder>/optimizer.pt`."""
    torch.save(optimizer.state_dict(), Path(folder) / OPTIMIZER_STATE)


def warm_start_optimizer(optimizer: torch.optim.Optimizer, folder: str | Path) -> None:
    """Load the per-parameter state (momentum buffers, Adam moments, NorMuon's second moments) that pretraining
    left in `<folder>/optimizer.pt` into `optimizer`, keeping `optimizer`'s own hyper-parameters: HEAD's SFT
    restores its fresh LRs after loading, and its other settings (Muon weight decay 0, the momentum the schedule
    sets) are this run's too. The state is loaded with `weights_only=True`."""
    path = Path(folder) / OPTIMIZER_STATE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: warm-starting the optimizer needs the state pretraining saves beside its final "
            "model; pass --load_optimizer false to start Muon and AdamW fresh, or --init_from a folder written by "
            "`nanochat-hf pretrain`")
    problem = _torch_file_problem(path)
    if problem:
        raise ValueError(f"{path}: {problem}; pass --load_optimizer false to start the optimizer fresh")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    fresh = optimizer.state_dict()
    layout = [(g.get("name"), len(g["params"])) for g in fresh["param_groups"]]
    saved_layout = [(g.get("name"), len(g["params"])) for g in saved.get("param_groups", [])]
    if layout != saved_layout:
        raise ValueError(
            f"{path} holds the state of other parameter groups ({saved_layout}) than this model's ({layout}); "
            "pass --load_optimizer false, or --init_from the folder of the run that trained this model")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, state in saved["state"].items():
        # AdamW keeps moments shaped like the parameter; a Muon group its stack (K, rows, cols) on the first one
        moment = state.get("exp_avg", state.get("momentum_buffer"))
        p = params[index]
        if moment is not None and tuple(moment.shape[-p.dim():]) != tuple(p.shape):
            raise ValueError(f"{path} was saved for a model of other shapes (a state of shape {tuple(moment.shape)} "
                             f"for a parameter of shape {tuple(p.shape)}); pass --load_optimizer false, or "
                             "--init_from the folder of the run that trained this model")
    optimizer.load_state_dict({"state": saved["state"], "param_groups": fresh["param_groups"]})
