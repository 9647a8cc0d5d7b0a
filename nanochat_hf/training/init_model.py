"""Build a freshly initialised NanoChat model for a tokenizer and save both as one `save_pretrained` folder."""

import os
from pathlib import Path

from transformers import GenerationConfig, PreTrainedTokenizerBase

from ..configuration_nanochat import NanoChatConfig
from ..modeling_nanochat import NanoChatForCausalLM
from ..output_folder import publish_folder as publish_folder  # re-exported: pretrain imports it from here
from ..output_folder import staged_folder


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Ids of the tokens generation needs; a tokenizer without them was not trained for nanochat."""
    ids = {}
    for name in ("<|bos|>", "<|assistant_end|>"):
        token_id = tokenizer.convert_tokens_to_ids(name)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(
                f"tokenizer has no {name} token; train it with `nanochat-hf tokenizer train` "
                "(or convert a nanochat tokenizer) so it carries nanochat's 9 special tokens."
            )
        ids[name] = token_id
    return ids


def build_model(
    tokenizer: PreTrainedTokenizerBase, depth: int, generation: str = "2026", **overrides
) -> NanoChatForCausalLM:
    """nanochat's depth dial, with the vocabulary and special tokens taken from `tokenizer`."""
    ids = special_token_ids(tokenizer)
    overrides.setdefault("vocab_size", len(tokenizer))
    config = NanoChatConfig.from_depth(
        depth,
        generation,
        bos_token_id=ids["<|bos|>"],
        eos_token_id=ids["<|assistant_end|>"],
        pad_token_id=ids["<|assistant_end|>"],
        **overrides,
    )
    model = NanoChatForCausalLM(config)
    # nanochat's Engine stops on <|assistant_end|> and on <|bos|> (a base model starting a new document).
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|bos|>"],
        eos_token_id=[ids["<|assistant_end|>"], ids["<|bos|>"]],
        pad_token_id=ids["<|assistant_end|>"],
    )
    return model


def save_atomically(model: NanoChatForCausalLM, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike) -> Path:
    """Write model + tokenizer into a hidden folder beside `out_dir`, then swap it in, replacing what was there.

    A crash mid-write leaves the previous `out_dir` (or nothing) behind, never a half-written checkpoint. Whether
    `out_dir` may be replaced is the caller's decision (output_folder.check_output_folder).
    """
    # The tokenizer's length limit is the model's context (transformers' default is ~1e30, i.e. none).
    tokenizer.model_max_length = model.config.max_position_embeddings
    with staged_folder(out_dir) as staged:
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
    return Path(out_dir)
