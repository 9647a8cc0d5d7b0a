"""Interop with Karpathy's nanochat: import its checkpoints and tokenizers, export to its format, and export
2025-generation models to transformers' built-in `nanochat` model type.

nanochat's on-disk format (shared/reference/nanochat-spec.md §11): `model_<step:06d>.pt` (a `torch.save`d
state_dict in nanochat's key names), `meta_<step:06d>.json` (`model_config` and training metadata),
`tokenizer.pkl` (a pickled `tiktoken.Encoding`) and `token_bytes.pt` (bytes per token id, int32).

Every converter validates its whole input before it writes anything, and writes into a temporary folder beside
`out` that is renamed into place only once complete: a failed conversion leaves no `out` behind.
"""

import json
import logging
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedConfig

from ..configuration_nanochat import GENERATION_PRESETS, NanoChatConfig, nanochat_short_window
from ..modeling_nanochat import NanoChatForCausalLM
from ..output_folder import OutputFolderError, check_output_folder, staged_folder
from .nanochat_format import (
    _VOCAB_ROW_KEYS,
    ConversionError,
    PathLike,
    _read_json,
    _torch_load,
    detect_generation,
    find_checkpoint,
    nanochat_to_our_key,
    our_to_nanochat_key,
    read_nanochat_meta,
    read_nanochat_state_dict,
)
from .tiktoken_format import (
    TiktokenState,
    _import_tiktoken,
    hf_to_tiktoken,
    nanochat_token_bytes,
    read_tiktoken_pickle,
    tiktoken_to_hf,
    write_tiktoken_pickle,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Output folders: checked before any work, staged beside `out` and swapped in when complete (output_folder)


def _check_out(out: Path, overwrite: bool, sources: list[Path]) -> None:
    """output_folder's rules, reported as the ConversionError every converter raises for bad arguments."""
    try:
        check_output_folder(out, overwrite=overwrite, inputs=sources)
    except OutputFolderError as err:
        raise ConversionError(str(err)) from None


# ---------------------------------------------------------------------------------------------------------------
# nanochat -> nanochat_hf


def find_tokenizer_dir(checkpoint_dir: Path, tokenizer_dir: PathLike | None) -> Path:
    """Where `tokenizer.pkl` is: --tokenizer-dir, else the checkpoint folder itself (Hub uploads keep all four
    files together), else `tokenizer/` in a parent folder ($NANOCHAT_BASE_DIR/tokenizer next to
    $NANOCHAT_BASE_DIR/base_checkpoints/<tag>)."""
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
        if not (tokenizer_dir / "tokenizer.pkl").is_file():
            raise ConversionError(f"{tokenizer_dir / 'tokenizer.pkl'}: file not found")
        return tokenizer_dir
    candidates = [checkpoint_dir, checkpoint_dir / "tokenizer"]
    candidates += [parent / "tokenizer" for parent in checkpoint_dir.resolve().parents[:2]]
    for candidate in candidates:
        if (candidate / "tokenizer.pkl").is_file():
            return candidate
    raise ConversionError(
        f"{checkpoint_dir}: no tokenizer.pkl found in {', '.join(str(c) for c in candidates)}; pass --tokenizer-dir"
    )


def _read_token_bytes(path: Path, vocab_size: int) -> None:
    """token_bytes.pt is recomputed from the vocabulary when needed; a present one must fit the tokenizer, as a
    mismatch means the tokenizer files come from different runs."""
    if not path.is_file():
        logger.info("%s not found; token byte lengths are recomputed from the vocabulary", path)
        return
    token_bytes = _torch_load(path)
    if not isinstance(token_bytes, torch.Tensor) or token_bytes.dim() != 1 or token_bytes.numel() != vocab_size:
        shape = tuple(token_bytes.shape) if isinstance(token_bytes, torch.Tensor) else type(token_bytes).__name__
        raise ConversionError(
            f"{path}: holds {shape}, expected one length per token ({vocab_size},) for tokenizer.pkl's vocabulary"
        )


def _config_from_meta(meta: dict, meta_path: Path, generation: str, special_ids: dict[str, int]) -> NanoChatConfig:
    mc = meta["model_config"]
    fields: dict[str, Any] = {
        "generation": generation,
        "vocab_size": mc["vocab_size"],
        "hidden_size": mc["n_embd"],
        "intermediate_size": 4 * mc["n_embd"],  # nanochat's MLP is always 4x
        "num_hidden_layers": mc["n_layer"],
        "num_attention_heads": mc["n_head"],
        "num_key_value_heads": mc["n_kv_head"],
        "max_position_embeddings": mc["sequence_len"],
        "bos_token_id": special_ids["<|bos|>"],
        "eos_token_id": special_ids["<|assistant_end|>"],
        "pad_token_id": special_ids["<|assistant_end|>"],
    }
    if generation == "2026":
        # nanochat's own loader fills a missing window_pattern with "L" (checkpoints from before windows existed).
        fields["window_pattern"] = mc.get("window_pattern", "L")
    try:
        return NanoChatConfig(**fields)
    except ValueError as err:
        raise ConversionError(f"{meta_path}: model_config describes no valid model ({err})") from err


def _expected_shapes(config: NanoChatConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        model = NanoChatForCausalLM(config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def _fit_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Resize a per-token-id table (embeddings, value embeddings, lm_head) to `rows` rows.

    Rows at and beyond `vocab_size` are padding: no token id looks them up and the logits are sliced to
    `vocab_size` before softcap, so they never influence an output. nanochat HEAD pads to a multiple of 64 and ORIG
    does not pad; our config pads to its own `pad_vocab_size_to` (1 for 2025, 64 for 2026). Importing maps
    nanochat's rows to our `padded_vocab_size`, exporting maps ours to what nanochat's generation expects: dropping
    padding rows or appending zero rows changes no logit, and where both sides pad alike (every checkpoint nanochat
    itself wrote, both generations) the rows are kept bit-exact, padding included.
    """
    if tensor.shape[0] > rows:
        return tensor[:rows].clone()
    if tensor.shape[0] < rows:
        pad = torch.zeros(rows - tensor.shape[0], *tensor.shape[1:], dtype=tensor.dtype)
        return torch.cat([tensor, pad])
    return tensor


def _match_tensors(
    tensors: dict[str, torch.Tensor],
    expected: dict[str, torch.Size],
    rename: Callable[[str], str | None],
    source: Path,
    allowed_rows: tuple[int, ...],
    vocab_note: str,
) -> dict[str, torch.Tensor]:
    """Rename every tensor, check the name set and every shape, resize the vocab tables. Reports all problems of
    a kind at once; nothing unknown is dropped and nothing expected is left unfilled.

    The per-token tables may have any of `allowed_rows` rows (the vocabulary, padded or not); any other count
    means the weights were trained for another vocabulary than the tokenizer's (`vocab_note` says whose)."""
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unknown = []
    for key, tensor in tensors.items():
        target = rename(key)
        if target is None or target not in expected:
            unknown.append(key)
        else:
            mapped[target] = tensor
            origin[target] = key
    missing = [name for name in expected if name not in mapped]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown keys {unknown[:12]}{' ...' if len(unknown) > 12 else ''}")
        if missing:
            parts.append(f"missing keys {missing[:12]}{' ...' if len(missing) > 12 else ''}")
        raise ConversionError(f"{source}: {' and '.join(parts)} for this model configuration")
    out, errors = {}, []
    for target, tensor in mapped.items():
        want = expected[target]
        if not tensor.is_floating_point():
            errors.append(f"{origin[target]} has dtype {tensor.dtype}, expected floating point")
            continue
        if _VOCAB_ROW_KEYS.fullmatch(target):
            if tensor.dim() != 2 or tensor.shape[1] != want[1] or tensor.shape[0] not in allowed_rows:
                rows = " or ".join(str(r) for r in allowed_rows)
                errors.append(
                    f"{origin[target]} has shape {tuple(tensor.shape)}, expected ({rows}, {want[1]}) for {vocab_note}"
                )
                continue
            tensor = _fit_rows(tensor, want[0])
        elif tensor.shape != want:
            errors.append(f"{origin[target]} has shape {tuple(tensor.shape)}, expected {tuple(want)}")
            continue
        out[target] = tensor
    if errors:
        raise ConversionError(f"{source}: " + "; ".join(errors))
    return out


def _nanochat_rows(generation: str, vocab_size: int) -> int:
    """Rows of nanochat's per-token tables: HEAD pads to a multiple of 64, ORIG does not pad."""
    multiple = 64 if generation == "2026" else 1
    return math.ceil(vocab_size / multiple) * multiple


def _generation_config(special_ids: dict[str, int]):
    from transformers import GenerationConfig

    # nanochat's Engine stops on <|assistant_end|> and on <|bos|> (a base model starting a new document).
    return GenerationConfig(
        bos_token_id=special_ids["<|bos|>"],
        eos_token_id=[special_ids["<|assistant_end|>"], special_ids["<|bos|>"]],
        pad_token_id=special_ids["<|assistant_end|>"],
    )


def from_nanochat(
    checkpoint_dir: PathLike,
    out: PathLike,
    step: int | None = None,
    tokenizer_dir: PathLike | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Convert a nanochat checkpoint (either generation) and its tokenizer into a `save_pretrained` folder.

    Weights are upcast to fp32 (nanochat's bf16 tables upcast exactly); the tokenizer becomes `tokenizer.json`
    with the same id for every token. nanochat's meta JSON (minus `model_config`) is kept in
    `config.nanochat_meta` so `to_nanochat` can write it back.
    """
    from ..training.init_model import save_atomically, special_token_ids

    checkpoint_dir, out = Path(checkpoint_dir), Path(out)
    checkpoint = find_checkpoint(checkpoint_dir, step)
    tok_dir = find_tokenizer_dir(checkpoint_dir, tokenizer_dir)
    _check_out(out, overwrite, [checkpoint_dir, tok_dir])
    meta = read_nanochat_meta(checkpoint.meta_path)
    pkl_path = tok_dir / "tokenizer.pkl"
    tiktoken_state = read_tiktoken_pickle(pkl_path)
    tokenizer = tiktoken_to_hf(tiktoken_state, pkl_path)
    _read_token_bytes(tok_dir / "token_bytes.pt", tiktoken_state.vocab_size)
    vocab_size = meta["model_config"]["vocab_size"]
    if tiktoken_state.vocab_size != vocab_size:
        raise ConversionError(
            f"{pkl_path}: the tokenizer has {tiktoken_state.vocab_size} tokens but {checkpoint.meta_path} says "
            f"vocab_size={vocab_size}; the tokenizer belongs to another model (nanochat's loader asserts they match)"
        )
    state = read_nanochat_state_dict(checkpoint.model_path)
    generation = detect_generation(state, meta, checkpoint.model_path, checkpoint.meta_path)
    special_ids = special_token_ids(tokenizer)
    config = _config_from_meta(meta, checkpoint.meta_path, generation, special_ids)
    # Provenance for `to_nanochat`: the file name's step (nanochat's RL meta has none) and the rest of the meta.
    config.nanochat_meta = {"step": checkpoint.step} | {
        key: value for key, value in meta.items() if key not in ("step", "model_config")
    }
    # Either generation's row count is accepted: the 2025 architecture was also trained with 64-padding
    # (nanochat bc51da8, 2025-12-23, before the 2026 features arrived).
    weights = _match_tensors(
        state,
        _expected_shapes(config),
        nanochat_to_our_key,
        checkpoint.model_path,
        tuple(sorted({vocab_size, _nanochat_rows("2026", vocab_size)})),
        f"vocab_size={vocab_size} ({checkpoint.meta_path.name}, {pkl_path.name})",
    )
    # nanochat keeps the embedding tables in bf16 and the rest in fp32; fp32 everywhere is exact and uniform.
    weights = {name: tensor.to(torch.float32) for name, tensor in weights.items()}
    with torch.device("meta"):
        model = NanoChatForCausalLM(config)
    model.load_state_dict(weights, strict=True, assign=True)
    model.generation_config = _generation_config(special_ids)
    save_atomically(model.eval(), tokenizer, out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# nanochat_hf -> nanochat


def _read_our_config(model_dir: Path) -> NanoChatConfig:
    config_path = model_dir / "config.json"
    raw = _read_json(config_path)
    if raw.get("model_type") != NanoChatConfig.model_type:
        raise ConversionError(
            f"{config_path}: model_type {raw.get('model_type')!r}; expected {NanoChatConfig.model_type!r} "
            "(a nanochat_hf model folder)"
        )
    try:
        return NanoChatConfig.from_pretrained(model_dir)
    except ValueError as err:
        raise ConversionError(f"{config_path}: {err}") from err


def _safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of a `save_pretrained` folder: one file, or the shards its index lists."""
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if not index.is_file():
        raise ConversionError(f"{model_dir}: no model.safetensors (or model.safetensors.index.json) found")
    weight_map = _read_json(index).get("weight_map") or {}
    files = [model_dir / name for name in sorted(set(weight_map.values()))]
    for path in files:
        if not path.is_file():
            raise ConversionError(f"{path}: file not found (listed in {index.name})")
    return files


def _read_safetensors(model_dir: Path, *, shapes_only: bool = False) -> tuple[dict[str, Any], list[Path]]:
    """All tensors of a `save_pretrained` folder (or, with `shapes_only`, their shapes, read from the headers
    alone) and the files they came from."""
    from safetensors import SafetensorError, safe_open

    files = _safetensors_files(model_dir)
    tensors: dict[str, Any] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = torch.Size(f.get_slice(key).get_shape()) if shapes_only else f.get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise ConversionError(f"{path}: cannot be read as safetensors ({err}); truncated or corrupt?") from err
    return tensors, files


def nanochat_generation_of(config: NanoChatConfig) -> str:
    """The nanochat generation that computes exactly what `config` does; refuses configs nanochat cannot express
    (a mix of features, other widths or constants), listing every difference."""
    preset = GENERATION_PRESETS[config.generation]
    # Vocab padding is absent on purpose: padding rows are never read, and the export pads as nanochat does.
    skip = ("rope_theta", "window_pattern", "pad_vocab_size_to")
    wanted: dict[str, Any] = {name: value for name, value in preset.items() if name not in skip}
    wanted |= {
        "rope_theta": preset["rope_theta"],
        "intermediate_size": 4 * config.hidden_size,
        "hidden_act": "relu2",
        "final_logit_softcapping": 15.0,
        "rms_norm_eps": None,
        # 2025 attends to the whole causal past; 2026's "L" layers see one sequence length back
        "long_window": config.max_position_embeddings if config.generation == "2026" else -1,
    }
    if config.generation == "2026":
        wanted |= {
            "short_window": nanochat_short_window(config.max_position_embeddings),
            "value_embed_gate_channels": 12,
            "value_embed_gate_range": 3.0,
            "smear_gate_channels": 24,
        }
    actual = {name: getattr(config, name) for name in wanted}
    differences = [
        f"{name}={actual[name]!r} (nanochat: {value!r})" for name, value in wanted.items() if actual[name] != value
    ]
    if config.generation == "2025" and set(config.window_pattern.upper()) != {"L"}:
        differences.append(f"window_pattern={config.window_pattern!r} (nanochat 2025 has no sliding windows)")
    if differences:
        raise ConversionError(
            f"this {config.generation}-generation model differs from nanochat's {config.generation} architecture: "
            + ", ".join(differences)
        )
    return config.generation


def _nanochat_key_order(name: str) -> tuple:
    """nanochat's state_dict order: lambdas, transformer.*, lm_head, smear_gate, value_embeds (layer-wise)."""
    head = ["resid_lambdas", "x0_lambdas", "smear_lambda", "backout_lambda"]
    if name in head:
        return (0, head.index(name))
    layer = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", name)
    if name == "transformer.wte.weight":
        return (1, -1)
    if layer:
        parts = [
            "attn.c_q.weight",
            "attn.c_k.weight",
            "attn.c_v.weight",
            "attn.c_proj.weight",
            "attn.ve_gate.weight",
            "mlp.c_fc.weight",
            "mlp.c_proj.weight",
        ]
        return (1, int(layer.group(1)), parts.index(layer.group(2)))
    if name == "lm_head.weight":
        return (2,)
    if name == "smear_gate.weight":
        return (3,)
    return (4, int(name.split(".")[1]))


def to_nanochat(
    model_dir: PathLike,
    out: PathLike,
    *,
    step: int | None = None,
    keep_fp32_embeddings: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a nanochat_hf model folder in nanochat's own format: `model_<step>.pt`, `meta_<step>.json`,
    `tokenizer.pkl` and `token_bytes.pt`, loadable by nanochat's `checkpoint_manager` (same keys, meta fields,
    padding and dtypes as nanochat writes).

    nanochat stores `transformer.wte` (and in 2026 the `value_embeds`) in bf16: tables with values bf16 cannot hold
    are rounded, with a warning, unless `keep_fp32_embeddings` keeps them fp32 (nanochat loads them all the same).
    `step` defaults to the step recorded when the model was imported from nanochat, else 0.
    """
    from ..tokenizer.bpe import load_tokenizer

    model_dir, out = Path(model_dir), Path(out)
    if not model_dir.is_dir():
        raise ConversionError(f"{model_dir}: model folder not found")
    _check_out(out, overwrite, [model_dir])
    config = _read_our_config(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise ConversionError(f"{model_dir / 'tokenizer.json'}: file not found; nanochat needs the tokenizer too")
    try:
        generation = nanochat_generation_of(config)
    except ConversionError as err:
        raise ConversionError(f"{model_dir}: {err}") from err
    tensors, files = _read_safetensors(model_dir)
    try:
        tokenizer = load_tokenizer(str(model_dir))
    except (OSError, ValueError) as err:
        raise ConversionError(f"{model_dir}: cannot load the tokenizer ({err})") from err
    tiktoken_state = hf_to_tiktoken(tokenizer, model_dir / "tokenizer.json")
    if tiktoken_state.vocab_size != config.vocab_size:
        raise ConversionError(
            f"{model_dir / 'tokenizer.json'}: the tokenizer has {tiktoken_state.vocab_size} tokens but config.json "
            f"says vocab_size={config.vocab_size}"
        )
    rows = _nanochat_rows(generation, config.vocab_size)
    ours = _match_tensors(
        tensors,
        _expected_shapes(config),
        lambda key: key,
        files[0],
        (config.padded_vocab_size,),
        f"vocab_size={config.vocab_size} padded to a multiple of {config.pad_vocab_size_to} (config.json)",
    )
    state = {}
    for name, tensor in ours.items():
        theirs = our_to_nanochat_key(name)
        if _VOCAB_ROW_KEYS.fullmatch(name):
            tensor = _fit_rows(tensor, rows)
        state[theirs] = _nanochat_dtype(theirs, tensor, keep_fp32_embeddings)
    state = {name: state[name].contiguous() for name in sorted(state, key=_nanochat_key_order)}

    recorded = dict(getattr(config, "nanochat_meta", None) or {})
    step = step if step is not None else int(recorded.pop("step", 0))
    recorded.pop("step", None)
    model_config = {
        "sequence_len": config.max_position_embeddings,
        "vocab_size": config.vocab_size,
        "n_layer": config.num_hidden_layers,
        "n_head": config.num_attention_heads,
        "n_kv_head": config.num_key_value_heads,
        "n_embd": config.hidden_size,
    }
    if generation == "2026":
        # HEAD's GPTConfig has window_pattern; ORIG's does not and would reject the extra field.
        model_config["window_pattern"] = config.window_pattern
    meta = {"step": step, "model_config": model_config} | recorded

    _import_tiktoken()  # fail before writing anything
    with staged_folder(out) as staged:
        torch.save(state, staged / f"model_{step:06d}.pt")
        (staged / f"meta_{step:06d}.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        write_tiktoken_pickle(tiktoken_state, staged / "tokenizer.pkl")
        torch.save(nanochat_token_bytes(tiktoken_state), staged / "token_bytes.pt")
    return out


def _nanochat_dtype(name: str, tensor: torch.Tensor, keep_fp32_embeddings: bool) -> torch.Tensor:
    """nanochat's storage dtypes: bf16 token tables (wte, value_embeds), fp32 for everything else."""
    if keep_fp32_embeddings or not (name == "transformer.wte.weight" or name.startswith("value_embeds.")):
        return tensor.to(torch.float32)
    rounded = tensor.to(torch.bfloat16)
    if not torch.equal(rounded.to(tensor.dtype), tensor):
        change = (rounded.to(torch.float32) - tensor.to(torch.float32)).abs().max().item()
        logger.warning(
            "%s: rounded to bfloat16 as nanochat stores it (max change %.3g); use keep_fp32_embeddings "
            "(--keep-fp32-embeddings) to keep it exact",
            name,
            change,
        )
    return rounded


# ---------------------------------------------------------------------------------------------------------------
# nanochat_hf -> transformers' built-in `nanochat`


def builtin_gaps(config: NanoChatConfig) -> list[str]:
    """Features of `config` that transformers' built-in NanoChatForCausalLM (the 2025 architecture) lacks."""
    gaps = []
    if config.value_embeds:
        gaps.append("value embeddings")
    if config.residual_lambdas:
        gaps.append("resid/x0 lambdas")
    if config.smear:
        gaps.append("smear")
    if config.backout:
        gaps.append("backout")
    # The built-in class attends to the whole causal past at any length: only -1 (unlimited) windows match it.
    windows = sorted({w for w in config.layer_windows if w >= 0})
    if windows:
        gaps.append(f"sliding windows ({config.window_pattern}, windows {windows})")
    if config.qk_scale != 1.0:
        gaps.append(f"q/k scale {config.qk_scale}")
    if config.padded_vocab_size != config.vocab_size:
        gaps.append(f"vocab padding ({config.vocab_size} -> {config.padded_vocab_size} rows)")
    return gaps


def builtin_config(config: NanoChatConfig) -> PreTrainedConfig:
    """The config of transformers' built-in `nanochat` class that computes what a 2025-generation `config` does."""
    import transformers

    return transformers.NanoChatConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        hidden_act=config.hidden_act,
        attention_dropout=config.attention_dropout,
        # ours None = the dtype's epsilon (nanochat's F.rms_norm(eps=None)); the built-in class needs a number, and
        # fp32's is what nanochat uses in fp32. (In bf16 inference nanochat would use bf16's 2**-7 instead.)
        rms_norm_eps=config.rms_norm_eps if config.rms_norm_eps is not None else torch.finfo(torch.float32).eps,
        rope_parameters=dict(config.rope_parameters),
        final_logit_softcapping=config.final_logit_softcapping,
        initializer_range=config.initializer_range,
        use_cache=config.use_cache,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        tie_word_embeddings=False,
    )


def to_transformers(model_dir: PathLike, out: PathLike, *, overwrite: bool = False) -> Path:
    """Export a 2025-generation model for transformers' built-in `nanochat` model type (no trust_remote_code).

    Weight names are already the built-in class's, so the weight files are copied unchanged; config.json is
    rewritten for `transformers.NanoChatConfig` and the tokenizer and generation config are copied. A model with
    any feature the built-in class lacks is refused, with the list of those features.
    """

    model_dir, out = Path(model_dir), Path(out)
    if not model_dir.is_dir():
        raise ConversionError(f"{model_dir}: model folder not found")
    _check_out(out, overwrite, [model_dir])
    config = _read_our_config(model_dir)
    gaps = builtin_gaps(config)
    if gaps:
        raise ConversionError(
            f"{model_dir}: transformers' built-in NanoChatForCausalLM implements nanochat's 2025 architecture and "
            f"cannot run this {config.generation}-generation model: it lacks {', '.join(gaps)}. Keep the "
            "nanochat_hf folder (it loads with trust_remote_code=True) or use `nanochat-hf convert to-nanochat`"
        )
    # The files are copied, not loaded: check names and shapes from their headers so a mismatch fails here.
    shapes, weight_files = _read_safetensors(model_dir, shapes_only=True)
    expected = _expected_shapes(config)
    wrong = sorted(set(shapes) ^ set(expected)) + [k for k in expected if k in shapes and shapes[k] != expected[k]]
    if wrong:
        raise ConversionError(f"{weight_files[0]}: tensors do not match config.json: {wrong[:12]}")
    builtin = builtin_config(config)
    builtin.architectures = ["NanoChatForCausalLM"]
    if getattr(config, "dtype", None) is not None:
        builtin.dtype = config.dtype
    # Weights, tokenizer and generation config go across unchanged; our config.json and remote code do not, nor
    # anything else a training folder may hold (optimizer state, trainer logs).
    index = model_dir / "model.safetensors.index.json"
    copied = [*weight_files, *([index] if index.is_file() else [])]
    copied += [model_dir / name for name in _COPIED_FILES if (model_dir / name).is_file()]
    with staged_folder(out) as staged:
        builtin.save_pretrained(staged)
        for path in copied:
            shutil.copy2(path, staged / path.name)
        _strip_auto_map(staged / "tokenizer_config.json")
    return out


_COPIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "README.md",
)


def _strip_auto_map(path: Path) -> None:
    """A tokenizer_config.json auto_map would make AutoTokenizer ask for trust_remote_code."""
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    if "auto_map" in data:
        del data["auto_map"]
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


__all__ = [
    "ConversionError",
    "TiktokenState",
    "builtin_gaps",
    "detect_generation",
    "find_checkpoint",
    "from_nanochat",
    "hf_to_tiktoken",
    "nanochat_generation_of",
    "nanochat_to_our_key",
    "our_to_nanochat_key",
    "read_nanochat_meta",
    "read_nanochat_state_dict",
    "read_tiktoken_pickle",
    "tiktoken_to_hf",
    "to_nanochat",
    "to_transformers",
    "write_tiktoken_pickle",
]
