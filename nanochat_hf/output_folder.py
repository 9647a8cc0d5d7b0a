"""Output folders: decide whether a command may write a folder, build it beside the old one, swap it in whole.

Every command that writes a folder goes through here, so the same rules hold everywhere:

* A command that *produces* a folder (tokenizer train, init, convert, push --dry-run) writes a new folder or an
  empty one. A non-empty one is replaced only with ``--overwrite``, and only if nanochat-hf wrote it (see
  :func:`is_ours`). The current folder, its parents and the home folder are never replaced, and the output may not
  be, hold or lie inside a folder the command reads. Checked by :func:`check_output_folder`.
* The new folder is built in a hidden sibling and renamed into place only once complete (:func:`staged_folder`):
  a failed or interrupted run leaves the old folder as it was, or no folder at all.
* A training stage or speedrun *continues* a folder: a new or empty one, or one of its own runs (resumed); anything
  else is refused, and it deletes nothing (:func:`run_folder`).
* Published folders get the user's usual permissions (umask), not the 0700/0600 of the temporary files they were
  written as.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

# Entries (globs) that mark the folders nanochat-hf writes: a save_pretrained model or tokenizer, a nanochat-format
# export, a training run (checkpoints, one half-saved, its loss log, its final model), a speedrun, a dry-run push.
OUR_MARKERS = ("config.json", "tokenizer.json", "tokenizer.pkl", "model_[0-9]*.pt", "checkpoint-[0-9]*",
               ".staging/checkpoint-[0-9]*", "losses.jsonl", "final/config.json", "speedrun.json", "model/config.json")


class OutputFolderError(ValueError):
    """The output folder may not be written; the message names the folder, the rule and what to do instead."""


def is_ours(folder: Path) -> bool:
    """Whether `folder` looks like something nanochat-hf wrote (it holds one of OUR_MARKERS)."""
    return any(next(folder.glob(marker), None) is not None for marker in OUR_MARKERS)


def _check_place(out: Path, flag: str, inputs: Iterable[PathLike | None]) -> Path:
    """Rules that hold for every output folder, empty or not; returns `out` resolved."""
    resolved = out.resolve()
    for source in inputs:
        if source is None or not Path(source).exists():
            continue  # a Hub id, or an input the command itself will report missing
        source = Path(source).resolve()
        if resolved == source:
            raise OutputFolderError(f"{flag} {out}: is the input {source}; choose another {flag}")
        if source in resolved.parents:
            raise OutputFolderError(f"{flag} {out}: lies inside the input {source}; choose a folder outside it")
        if resolved in source.parents:
            raise OutputFolderError(f"{flag} {out}: holds the input {source}; choose a folder that does not")
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"{flag} {out}: exists and is a file; choose a folder name")
    return resolved


def check_output_folder(out: PathLike, *, overwrite: bool = False, inputs: Iterable[PathLike | None] = (),
                        flag: str = "--out") -> Path:
    """Refuse, before any work, an output folder that a produced folder may not replace (rules in the module doc).

    `inputs` are the files and folders the command reads; `flag` names the option in messages. Returns `out`.
    """
    out = Path(out)
    if out.is_symlink():  # the swap would replace the link, not the folder it points to
        raise OutputFolderError(f"{flag} {out}: is a symbolic link; name the folder itself ({out.resolve()})")
    resolved = _check_place(out, flag, inputs)
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    # Replacing a folder renames it away: the shell sitting in it (or below it) would be left in a deleted folder.
    if resolved == cwd or resolved in cwd.parents:
        where = "the current folder" if resolved == cwd else "a parent of the current folder"
        raise OutputFolderError(f"{flag} {out}: is {where} ({resolved}); name a new folder inside it instead "
                                f"(e.g. {flag} ./new-folder)")
    if resolved == home or resolved in home.parents:
        raise OutputFolderError(f"{flag} {out}: is the home folder ({resolved}) or holds it; name a new folder")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    if not overwrite:
        raise OutputFolderError(f"{flag} {out}: folder exists and is not empty; pass --overwrite to replace it "
                                f"or choose another {flag}")
    if not is_ours(out):
        raise OutputFolderError(f"{flag} {out}: holds files not written by nanochat-hf (no config.json, "
                                "tokenizer.json or checkpoint), which --overwrite never replaces; empty it yourself "
                                f"or choose another {flag}")
    return out


def check_run_folder(out: PathLike, *, inputs: Iterable[PathLike | None] = (), flag: str = "--output_dir") -> Path:
    """Refuse a training output folder that is neither new, nor empty, nor one of nanochat-hf's runs."""
    out = Path(out)
    _check_place(out, flag, inputs)
    if out.is_dir() and any(out.iterdir()) and not is_ours(out):
        raise OutputFolderError(f"{flag} {out}: holds files but is not a nanochat-hf run (no checkpoint-N, "
                                "losses.jsonl or final/); a training stage deletes nothing, so choose a new or "
                                f"empty {flag}")
    return out


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first: what a makedirs would create."""
    missing = []
    for path in [folder, *folder.absolute().parents]:
        if path.exists():
            break
        missing.append(path)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders this run created, deepest first, as long as they are empty; never anything else."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (someone else's files, or a parallel rank's) or already gone


@contextlib.contextmanager
def run_folder(out: PathLike, *, inputs: Iterable[PathLike | None] = (), flag: str = "--output_dir") -> Iterator[Path]:
    """A training stage's output folder: checked on entry, and removed again (with any parents the run made) if
    the run fails before writing anything into it."""
    out = check_run_folder(out, inputs=inputs, flag=flag)
    made = _missing_folders(out)
    try:
        yield out
    except BaseException:
        _remove_empty(made)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def give_usual_permissions(folder: Path) -> None:
    """Folders 0777 and files 0666 (executables 0777), less the umask: what the user's own tools would create.

    mkdtemp makes 0700 folders and transformers writes the weights through mkstemp as 0600, so a folder staged
    from them would otherwise be private to its owner.
    """
    mask = _umask()
    for root, _, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            executable = os.stat(path).st_mode & 0o100
            os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def publish_folder(staged: Path, out: Path) -> None:
    """Swap the complete folder `staged` in at `out` (a sibling) by renames, replacing whatever `out` held.

    The old folder is renamed aside first and deleted only once the new one is in place; if the swap fails, it is
    renamed back. The caller decides whether `out` may be replaced (check_output_folder).
    """
    give_usual_permissions(staged)
    if not out.exists():
        staged.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
    out.rename(old)
    try:
        staged.rename(out)
    except BaseException:
        old.rename(out)
        raise
    try:
        shutil.rmtree(old)
    except OSError as err:  # the new folder is in place; what is left is only the old copy
        logger.warning("could not remove the replaced folder %s (%s); delete it yourself", old, err)


@contextlib.contextmanager
def staged_folder(out: PathLike) -> Iterator[Path]:
    """Yield a new hidden folder beside `out` to write into; when the block ends, swap it in at `out`.

    If the block fails, the staging folder (and any parent folder made for it) is removed and `out` is untouched.
    """
    out = Path(os.path.abspath(out))  # "a/b/.." names folder a, whose parent is where the staging folder goes
    made = _missing_folders(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield staged
        publish_folder(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        _remove_empty(made)
        raise


__all__ = [
    "OutputFolderError",
    "check_output_folder",
    "check_run_folder",
    "give_usual_permissions",
    "is_ours",
    "publish_folder",
    "run_folder",
    "staged_folder",
]
