"""The DCLM eval bundle that nanochat's CORE metric reads: find it, download it once, parse it.

Layout (nanochat-spec.md §5.1), the same whether it came from the zip or from a local folder::

    eval_bundle/
      core.yaml              icl_tasks: [{label, dataset_uri, num_fewshot: [k, ...], icl_task_type,
                                          continuation_delimiter (optional, default " ")}, ...]
      eval_meta_data.csv     columns include "Eval Task" and "Random baseline" (percent)
      eval_data/<dataset_uri>  one JSON object per line

Where it is looked for, first match wins: the `bundle` argument, ``$NANOCHAT_EVAL_BUNDLE``, then the cache
(``$NANOCHAT_HF_CACHE`` or ``~/.cache/nanochat_hf``)``/eval_bundle``; a missing cache is filled from nanochat's
URL. A path may name the ``eval_bundle`` folder itself, a folder that contains it, or the zip.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
BUNDLE_ENV = "NANOCHAT_EVAL_BUNDLE"
CACHE_ENV = "NANOCHAT_HF_CACHE"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
# nanochat shuffles each task's items with this seed before cropping to max_per_task (scripts/base_eval.py)
SHUFFLE_SEED = 1337


class EvalBundleError(ValueError):
    """The eval bundle is missing, unreachable or malformed; the message says which file and how to fix it."""


@dataclass(frozen=True)
class CoreTask:
    label: str
    dataset_uri: str
    task_type: str
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float  # percent, as the csv stores it


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "nanochat_hf").expanduser()


def _as_bundle_dir(path: Path) -> Path | None:
    for candidate in (path, path / "eval_bundle"):
        if (candidate / "core.yaml").is_file():
            return candidate
    return None


def _extract(zip_path: Path, into: Path) -> Path:
    """Unpack a bundle zip into `into`/eval_bundle, all or nothing (a crash leaves no half-written folder)."""
    target = into / "eval_bundle"
    if _as_bundle_dir(target):
        return target
    into.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".eval_bundle-", dir=into))
    try:
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(staging)
        found = _as_bundle_dir(staging) or next(
            (d for d in staging.iterdir() if d.is_dir() and _as_bundle_dir(d)), None
        )
        if found is None:
            raise EvalBundleError(f"{zip_path}: no core.yaml inside; is this nanochat's eval_bundle.zip?")
        try:
            os.replace(_as_bundle_dir(found), target)
        except OSError:
            if not _as_bundle_dir(target):  # another process finished first: fine; anything else: an error
                raise
    except zipfile.BadZipFile as e:
        raise EvalBundleError(f"{zip_path}: not a zip file ({e}); delete it and retry") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _download(into: Path) -> Path:
    from filelock import FileLock

    into.mkdir(parents=True, exist_ok=True)
    # one download even when every rank of `accelerate launch` asks at once
    with FileLock(str(into / "eval_bundle.lock")):
        if _as_bundle_dir(into / "eval_bundle"):
            return into / "eval_bundle"
        zip_path = into / "eval_bundle.zip"
        if not zip_path.is_file():
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
                raise EvalBundleError(
                    f"CORE's eval bundle not found offline (HF_HUB_OFFLINE=1): not in {into}; download "
                    f"{EVAL_BUNDLE_URL} while online, then pass --bundle FILE (or set ${BUNDLE_ENV}=FILE) with the "
                    f"zip or the unpacked eval_bundle/ folder"
                )
            partial = zip_path.with_suffix(".zip.part")
            try:
                urllib.request.urlretrieve(EVAL_BUNDLE_URL, partial)  # noqa: S310 - nanochat's fixed https URL
            except OSError as e:
                partial.unlink(missing_ok=True)
                raise EvalBundleError(
                    f"could not download the CORE eval bundle from {EVAL_BUNDLE_URL} ({e}); download it by hand "
                    f"and point ${BUNDLE_ENV} (or --bundle) at the zip or the unpacked eval_bundle/ folder"
                ) from e
            os.replace(partial, zip_path)
        return _extract(zip_path, into)


def resolve_bundle(bundle: str | os.PathLike | None = None) -> Path:
    """The ``eval_bundle`` folder to read, downloading nanochat's bundle into the cache on first use."""
    named = bundle if bundle is not None else os.environ.get(BUNDLE_ENV) or None
    if named is not None:
        path = Path(named).expanduser()
        if path.is_file() and zipfile.is_zipfile(path):
            return _extract(path, cache_dir() / "bundles" / _digest(str(path.resolve()))[:16])
        found = _as_bundle_dir(path) if path.is_dir() else None
        if found is None:
            source = "--bundle" if bundle is not None else f"${BUNDLE_ENV}"
            raise EvalBundleError(
                f"{path} ({source}): no core.yaml there or in {path}/eval_bundle; give the unpacked eval_bundle/ "
                f"folder or eval_bundle.zip"
            )
        return found
    cached = _as_bundle_dir(cache_dir() / "eval_bundle")
    return cached if cached is not None else _download(cache_dir())


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def bundle_fingerprint(bundle_dir: Path) -> str:
    """Changes when any bundle file changes (content of the small files, size and mtime of the data)."""
    parts = [(bundle_dir / "core.yaml").read_text(encoding="utf-8")]
    meta = bundle_dir / "eval_meta_data.csv"
    parts.append(meta.read_text(encoding="utf-8") if meta.is_file() else "")
    for path in sorted((bundle_dir / "eval_data").rglob("*.jsonl")):
        stat = path.stat()
        parts.append(f"{path.relative_to(bundle_dir)}:{stat.st_size}:{stat.st_mtime_ns}")
    return _digest("\n".join(parts))[:16]


def _read_baselines(bundle_dir: Path) -> dict[str, float]:
    path = bundle_dir / "eval_meta_data.csv"
    if not path.is_file():
        raise EvalBundleError(f"{path}: missing; the bundle needs it for each task's random baseline")
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"Eval Task", "Random baseline"} - set(reader.fieldnames or ())
        if missing:
            raise EvalBundleError(f"{path}: no column(s) {sorted(missing)} (has {reader.fieldnames})")
        baselines = {}
        for line, row in enumerate(reader, start=2):
            try:
                baselines[row["Eval Task"]] = float(row["Random baseline"])
            except (TypeError, ValueError) as e:
                raise EvalBundleError(f"{path}:{line}: 'Random baseline' is not a number: {row}") from e
    return baselines


def load_core_tasks(bundle_dir: Path) -> list[CoreTask]:
    """Every task of ``core.yaml``, in its order, with its baseline from ``eval_meta_data.csv``."""
    path = bundle_dir / "core.yaml"
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise EvalBundleError(f"{path}: not valid YAML ({e})") from e
    entries = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(entries, list) or not entries:
        raise EvalBundleError(f"{path}: needs a non-empty 'icl_tasks' list")
    baselines = _read_baselines(bundle_dir)
    tasks = []
    for i, entry in enumerate(entries):
        where = f"{path}: icl_tasks[{i}]"
        if not isinstance(entry, dict):
            raise EvalBundleError(f"{where}: expected a mapping, got {entry!r}")
        missing = [k for k in ("label", "dataset_uri", "num_fewshot", "icl_task_type") if k not in entry]
        if missing:
            raise EvalBundleError(f"{where}: missing {missing}")
        label, task_type = str(entry["label"]), entry["icl_task_type"]
        if task_type not in TASK_TYPES:
            raise EvalBundleError(f"{where} ({label}): icl_task_type {task_type!r} is not one of {TASK_TYPES}")
        shots = entry["num_fewshot"]
        shots = shots[0] if isinstance(shots, list) and shots else shots  # nanochat uses the first listed
        if not isinstance(shots, int) or shots < 0:
            raise EvalBundleError(f"{where} ({label}): num_fewshot must be a non-negative int or list of them")
        if label not in baselines:
            raise EvalBundleError(f"{bundle_dir / 'eval_meta_data.csv'}: no 'Random baseline' row for {label!r}")
        data = bundle_dir / "eval_data" / entry["dataset_uri"]
        if not data.is_file():
            raise EvalBundleError(f"{where} ({label}): data file {data} does not exist")
        tasks.append(
            CoreTask(
                label=label,
                dataset_uri=str(entry["dataset_uri"]),
                task_type=task_type,
                num_fewshot=shots,
                continuation_delimiter=str(entry.get("continuation_delimiter", " ")),
                random_baseline=baselines[label],
            )
        )
    return tasks


_FIELDS = {
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
}


@lru_cache(maxsize=64)
def _read_items(path: Path, mtime_ns: int, task_type: str) -> tuple[dict, ...]:
    items = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalBundleError(f"{path}:{line_no}: not valid JSON ({e})") from e
            missing = [k for k in _FIELDS[task_type] if k not in item]
            if missing:
                raise EvalBundleError(f"{path}:{line_no}: a {task_type} item needs {missing}")
            items.append(item)
    if not items:
        raise EvalBundleError(f"{path}: no items")
    return tuple(items)


def load_task_data(bundle_dir: Path, task: CoreTask, max_per_task: int = -1) -> tuple[list[dict], int]:
    """nanochat's evaluation pool for `task` and how many of its first items to evaluate.

    nanochat shuffles all items with Random(1337), keeps the first `max_per_task` (-1 = all), evaluates them and
    draws few-shot examples from the same kept items. A crop smaller than the shot count would leave too few
    examples to draw from (nanochat then crashes); here the pool then keeps ``num_fewshot + 1`` items while only
    the first `max_per_task` are evaluated, so tiny CPU runs work. Otherwise the result is nanochat's exactly."""
    path = bundle_dir / "eval_data" / task.dataset_uri
    data = list(_read_items(path, path.stat().st_mtime_ns, task.task_type))
    random.Random(SHUFFLE_SEED).shuffle(data)
    if task.num_fewshot >= len(data):
        raise EvalBundleError(f"{path}: {task.label} is {task.num_fewshot}-shot but has only {len(data)} items")
    num_eval = len(data) if max_per_task <= 0 else min(max_per_task, len(data))
    return data[: max(num_eval, task.num_fewshot + 1)], num_eval
