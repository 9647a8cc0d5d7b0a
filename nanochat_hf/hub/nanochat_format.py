"""nanochat's checkpoint format, read without running its code: the parameter-name table between nanochat's keys
and ours, finding a checkpoint's `model_<step>.pt` / `meta_<step>.json`, reading them, and telling the two
architecture generations apart (shared/reference/nanochat-spec.md §11).
"""

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


class ConversionError(ValueError):
    """A checkpoint, tokenizer or model folder that cannot be converted; the message names the file and why."""


# ---------------------------------------------------------------------------------------------------------------
# Parameter names: nanochat's on the left, ours on the right. `{i}` is a layer index. Every tensor of either format
# appears here exactly once, so a key matching no row is unknown and is reported, never dropped.

_KEY_TABLE: tuple[tuple[str, str], ...] = (
    ("transformer.wte.weight", "model.embed_tokens.weight"),
    ("transformer.h.{i}.attn.c_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("transformer.h.{i}.attn.c_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("transformer.h.{i}.attn.c_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("transformer.h.{i}.attn.c_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("transformer.h.{i}.attn.ve_gate.weight", "model.layers.{i}.self_attn.ve_gate.weight"),
    ("transformer.h.{i}.mlp.c_fc.weight", "model.layers.{i}.mlp.fc1.weight"),
    ("transformer.h.{i}.mlp.c_proj.weight", "model.layers.{i}.mlp.fc2.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("value_embeds.{i}.weight", "model.value_embeds.{i}.weight"),
    ("resid_lambdas", "model.resid_lambdas"),
    ("x0_lambdas", "model.x0_lambdas"),
    ("smear_lambda", "model.smear_lambda"),
    ("smear_gate.weight", "model.smear_gate.weight"),
    ("backout_lambda", "model.backout_lambda"),
)


def _template_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


_TO_OURS = [(_template_regex(theirs), ours) for theirs, ours in _KEY_TABLE]
_TO_NANOCHAT = [(_template_regex(ours), theirs) for theirs, ours in _KEY_TABLE]


def _rename(key: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, target in table:
        match = pattern.fullmatch(key)
        if match:
            return target.format(**match.groupdict())
    return None


def nanochat_to_our_key(key: str) -> str | None:
    """Our parameter name for a nanochat state-dict key (without `_orig_mod.`), or None if it has none."""
    return _rename(key, _TO_OURS)


def our_to_nanochat_key(key: str) -> str | None:
    """nanochat's state-dict key for one of our parameter names, or None if it has none."""
    return _rename(key, _TO_NANOCHAT)


# Tensors with one row per token id: nanochat pads them to its vocab multiple, we to ours (see `_fit_rows`).
_VOCAB_ROW_KEYS = re.compile(r"model\.embed_tokens\.weight|lm_head\.weight|model\.value_embeds\.\d+\.weight")

# What separates the 2026 generation's state dict from the 2025 one: feature -> test on nanochat's keys.
_2026_FEATURES: dict[str, re.Pattern] = {
    "resid/x0 lambdas (resid_lambdas, x0_lambdas)": re.compile(r"resid_lambdas|x0_lambdas"),
    "smear (smear_lambda, smear_gate.weight)": re.compile(r"smear_lambda|smear_gate\.weight"),
    "backout (backout_lambda)": re.compile(r"backout_lambda"),
    "value embeddings (value_embeds.N.weight, attn.ve_gate.weight)": re.compile(
        r"value_embeds\.\d+\.weight|transformer\.h\.\d+\.attn\.ve_gate\.weight"
    ),
}


# ---------------------------------------------------------------------------------------------------------------
# Reading nanochat's files


@dataclass
class NanochatCheckpoint:
    step: int
    model_path: Path
    meta_path: Path


_MODEL_FILE = re.compile(r"model_(\d+)\.pt")


def find_checkpoint(checkpoint_dir: PathLike, step: int | None = None) -> NanochatCheckpoint:
    """`model_<step>.pt` and `meta_<step>.json` in `checkpoint_dir`; the highest step when `step` is None
    (as nanochat's own loader picks it)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise ConversionError(f"{checkpoint_dir}: checkpoint directory not found")
    models = {}
    for path in checkpoint_dir.iterdir():
        match = _MODEL_FILE.fullmatch(path.name)
        if match and path.is_file():
            models[int(match.group(1))] = path
    if not models:
        raise ConversionError(
            f"{checkpoint_dir}: no model_<step>.pt file; point at the folder holding nanochat's model_000650.pt and "
            "meta_000650.json (e.g. $NANOCHAT_BASE_DIR/base_checkpoints/d20)"
        )
    if step is None:
        step = max(models)
    elif step not in models:
        raise ConversionError(
            f"{checkpoint_dir}: no checkpoint for step {step} (model_{step:06d}.pt); steps present: {sorted(models)}"
        )
    model_path = models[step]
    meta_path = model_path.with_name(model_path.name.replace("model_", "meta_", 1).removesuffix(".pt") + ".json")
    if not meta_path.is_file():
        raise ConversionError(f"{meta_path}: missing; nanochat writes it next to {model_path.name}")
    return NanochatCheckpoint(step=step, model_path=model_path, meta_path=meta_path)


def _torch_load(path: Path) -> Any:
    """`torch.load` with `weights_only=True` (no code runs); memory-mapped so a multi-GB file is not read twice."""
    if not path.is_file():
        raise ConversionError(f"{path}: file not found")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) serialization
    except Exception as err:
        raise ConversionError(
            f"{path}: cannot be read as a torch.save() file of tensors ({type(err).__name__}: {err}); "
            "the file may be truncated (an interrupted download or save) or corrupt"
        ) from err


def read_nanochat_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """nanochat's state dict with the `_orig_mod.` prefix of `torch.compile`d models removed."""
    path = Path(path)
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a state_dict (a dict of tensors), got {type(obj).__name__}")
    state = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        # removeprefix, not lstrip: nanochat's ORIG loader used lstrip("_orig_mod."), which also ate leading
        # letters of real names (fixed upstream in 8681922).
        name = key.removeprefix("_orig_mod.")
        if name in state:
            raise ConversionError(f"{path}: {name!r} is present both with and without the `_orig_mod.` prefix")
        state[name] = value
    return state


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


_MODEL_CONFIG_FIELDS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
# nanochat trains at 2,048 tokens. A context past 2^20 tokens is no model anyone trained with nanochat: it is a
# damaged meta file, and its RoPE tables alone (positions x head_dim) would take gigabytes to build.
MAX_SEQUENCE_LEN = 2**20


def read_nanochat_meta(path: PathLike) -> dict:
    """The meta JSON; its `model_config` must have every field nanochat's `GPTConfig` needs."""
    path = Path(path)
    meta = _read_json(path)
    model_config = meta.get("model_config")
    if not isinstance(model_config, dict):
        raise ConversionError(f"{path}: no `model_config` object (nanochat's loader builds GPTConfig from it)")
    missing = [f for f in _MODEL_CONFIG_FIELDS if f not in model_config]
    if missing:
        raise ConversionError(f"{path}: model_config lacks {', '.join(missing)}")
    for field in _MODEL_CONFIG_FIELDS:
        value = model_config[field]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConversionError(f"{path}: model_config.{field} = {value!r}; expected a positive integer")
    if model_config["sequence_len"] > MAX_SEQUENCE_LEN:
        raise ConversionError(
            f"{path}: model_config.sequence_len = {model_config['sequence_len']} tokens is beyond the "
            f"{MAX_SEQUENCE_LEN:,} this converter accepts (nanochat trains at 2,048); the meta file is damaged or "
            "not nanochat's: use the meta_<step>.json written with this model_<step>.pt"
        )
    return meta


def detect_generation(state: dict[str, torch.Tensor], meta: dict, model_path: Path, meta_path: Path) -> str:
    """The nanochat generation of a state dict: "2025" with no 2026 feature, "2026" with all; others refused.

    nanochat gained the 2026 features one at a time (2026-01-11 .. 2026-03-14), changing details no key records
    (gate widths and ranges, RoPE base, q/k scale, window sizes) along the way; only the two end points can be
    reproduced exactly, so a checkpoint with some but not all of them is not guessed at.
    """
    present = [name for name, pattern in _2026_FEATURES.items() if any(pattern.fullmatch(k) for k in state)]
    absent = [name for name in _2026_FEATURES if name not in present]
    window_pattern = meta["model_config"].get("window_pattern")
    if not present:
        if window_pattern is not None and set(str(window_pattern).upper()) != {"L"}:
            raise ConversionError(
                f"{meta_path}: model_config.window_pattern={window_pattern!r} (sliding windows) but {model_path} "
                "has none of the 2026 tensors; this mix matches no nanochat generation"
            )
        return "2025"
    if absent:
        raise ConversionError(
            f"{model_path}: unknown nanochat generation: it has {'; '.join(present)} but lacks {'; '.join(absent)}. "
            "The 2025 generation (nanochat 3a5e0bc) has none of these tensors and the 2026 generation (nanochat "
            "HEAD, 2026-03-14 and later) has all of them; checkpoints of the commits in between differ in details "
            "the file does not record, so they are not converted"
        )
    return "2026"
