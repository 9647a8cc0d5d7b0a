"""`nanochat-hf convert ...`: move models between nanochat's own format, nanochat_hf and transformers' built-in
`nanochat` model type."""

import argparse


def _from_nanochat_main(args: argparse.Namespace) -> None:
    from .convert import from_nanochat

    out = from_nanochat(
        args.checkpoint_dir, args.out, step=args.step, tokenizer_dir=args.tokenizer_dir, overwrite=args.overwrite
    )
    print(f"converted nanochat checkpoint {args.checkpoint_dir} to {out}")


def _to_nanochat_main(args: argparse.Namespace) -> None:
    from .convert import to_nanochat

    out = to_nanochat(
        args.model, args.out, step=args.step, keep_fp32_embeddings=args.keep_fp32_embeddings, overwrite=args.overwrite
    )
    print(f"wrote nanochat checkpoint and tokenizer files to {out}")


def _to_transformers_main(args: argparse.Namespace) -> None:
    from .convert import to_transformers

    out = to_transformers(args.model, args.out, overwrite=args.overwrite)
    print(f"wrote a transformers `nanochat` model to {out} (loads without trust_remote_code)")


def _add_overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty OUT if nanochat-hf wrote it (default: refuse; "
        "never the current, home or input folder)"
    )


def add_convert_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `convert` and its three conversions on the top-level CLI's subparsers."""
    convert = subparsers.add_parser(
        "convert",
        help="import nanochat checkpoints; export to nanochat or to transformers' built-in nanochat",
        description="Convert models between nanochat's own checkpoint format (model_<step>.pt, meta_<step>.json, "
        "tokenizer.pkl, token_bytes.pt), nanochat_hf save_pretrained folders and transformers' built-in `nanochat` "
        "model type. Every conversion checks its whole input first and writes OUT only once it has succeeded.",
    )
    sub = convert.add_subparsers(dest="conversion", required=True, metavar="CONVERSION")

    src = sub.add_parser(
        "from-nanochat",
        help="nanochat checkpoint + tokenizer -> nanochat_hf folder",
        description="Import a checkpoint written by nanochat (the October-2025 release or nanochat HEAD; the "
        "generation is detected from the tensors) and its tiktoken tokenizer. OUT is a save_pretrained folder with "
        "fp32 weights, a tokenizer.json giving every token (the 9 special tokens included) its nanochat id, and "
        "nanochat's chat template. Reading tokenizer.pkl runs no pickled code.",
    )
    src.add_argument(
        "--checkpoint-dir",
        required=True,
        help="folder with model_<step>.pt and meta_<step>.json, e.g. $NANOCHAT_BASE_DIR/base_checkpoints/d20",
    )
    src.add_argument("--step", type=int, help="checkpoint step to convert (default: the highest present)")
    src.add_argument(
        "--tokenizer-dir",
        help="folder with tokenizer.pkl and token_bytes.pt (default: the checkpoint folder, else a tokenizer/ "
        "folder beside it or beside its parent, as in $NANOCHAT_BASE_DIR)",
    )
    src.add_argument("--out", required=True, help="output folder (nanochat_hf save_pretrained format)")
    _add_overwrite(src)
    src.set_defaults(func=_from_nanochat_main)

    dst = sub.add_parser(
        "to-nanochat",
        help="nanochat_hf folder -> nanochat checkpoint + tokenizer",
        description="Write a nanochat_hf model in nanochat's own format: model_<step>.pt with nanochat's key names, "
        "vocab padding and dtypes (bf16 token tables, fp32 otherwise), meta_<step>.json, tokenizer.pkl (a pickled "
        "tiktoken Encoding; needs `pip install tiktoken`) and token_bytes.pt. nanochat loads the result with "
        "its own checkpoint_manager; copy the .pt/.json into $NANOCHAT_BASE_DIR/<stage>_checkpoints/<tag>/ and "
        "the tokenizer files into $NANOCHAT_BASE_DIR/tokenizer/. The model must match one nanochat generation "
        "exactly.",
    )
    dst.add_argument("--model", required=True, help="nanochat_hf model folder (save_pretrained output)")
    dst.add_argument(
        "--step",
        type=int,
        help="step number for the file names and meta (default: the step the model was imported at, else 0)",
    )
    dst.add_argument(
        "--keep-fp32-embeddings",
        action="store_true",
        help="keep the token tables fp32 instead of rounding them to bf16 as nanochat stores them",
    )
    dst.add_argument("--out", required=True, help="output folder for the four nanochat files")
    _add_overwrite(dst)
    dst.set_defaults(func=_to_nanochat_main)

    hf = sub.add_parser(
        "to-transformers",
        help="2025-generation nanochat_hf folder -> transformers' built-in `nanochat` model",
        description="Export a 2025-generation model (nanochat's October-2025 architecture) for transformers' "
        "built-in NanoChatForCausalLM, loadable with AutoModelForCausalLM.from_pretrained and no "
        "trust_remote_code. Weights are copied unchanged; config.json is rewritten. Models using any feature the "
        "built-in class lacks (value embeddings, resid/x0 lambdas, smear, backout, sliding windows, q/k scale, "
        "vocab padding: every 2026-generation model) are refused with the list of those features.",
    )
    hf.add_argument("--model", required=True, help="nanochat_hf model folder (save_pretrained output)")
    hf.add_argument("--out", required=True, help="output folder")
    _add_overwrite(hf)
    hf.set_defaults(func=_to_transformers_main)
    return convert


__all__ = ["add_convert_parser"]
