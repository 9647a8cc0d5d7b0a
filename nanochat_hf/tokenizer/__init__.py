"""The tokenizer: nanochat's BPE trained with `tokenizers`, its special tokens and chat template, its CLI."""
