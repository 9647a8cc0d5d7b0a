"""`nanochat-hf <command>`: one entry point for every stage of the pipeline.

Every command runs under one rule for bad input (see nanochat_hf/errors.py): an input error (ValueError, OSError,
NotImplementedError, SystemExit("message")) prints `nanochat-hf <command>: error: <message>` as one line on stderr
and exits 2; any other exception is a bug and keeps its traceback (exit 1). `nanochat-hf --debug <command>` or
NANOCHAT_HF_DEBUG=1 adds the traceback to an input error as well.
"""

import argparse
import importlib
import sys

from .errors import DEBUG_ENV, run_command
from .hub.convert_cli import add_convert_parser
from .tokenizer.cli import add_tokenizer_parser


def _init_main(args: argparse.Namespace) -> None:
    from .output_folder import check_output_folder
    from .tokenizer.bpe import load_tokenizer
    from .training.init_model import build_model, save_atomically

    check_output_folder(args.out, overwrite=args.overwrite, inputs=[args.tokenizer])
    tokenizer = load_tokenizer(args.tokenizer)
    overrides = {}
    if args.head_dim is not None:
        overrides["head_dim"] = args.head_dim
    if args.sequence_len is not None:
        overrides["max_position_embeddings"] = args.sequence_len
    if args.window_pattern is not None:
        overrides["window_pattern"] = args.window_pattern
    model = build_model(tokenizer, args.depth, args.generation, **overrides)
    save_atomically(model, tokenizer, args.out)
    print(f"saved a {model.num_parameters():,}-parameter d{args.depth} ({args.generation}) model to {args.out}")


def _speedrun_main(args: argparse.Namespace) -> None:
    from .speedrun import StageFailed, run_speedrun  # imported here, so other commands don't load it

    try:
        run_speedrun(args.tier, args.run_dir or f"runs/{args.tier}", corpus=args.corpus, max_steps=args.max_steps,
                     rl=args.rl, pipeline=args.pipeline, accelerate_config=args.accelerate_config,
                     eval_max_per_task=args.eval_max_per_task, eval_max_tokens=args.eval_max_tokens)
    except StageFailed as err:  # reported like every other bad-input error, with exit status 2
        raise ValueError(str(err)) from err


# command -> (module whose `main(argv)` runs it, one-line summary)
PASS_THROUGH = {
    "pretrain": ("training.pretrain", "pretrain on the Trainer with Muon: --config recipes/<tier>/pretrain.yaml [--field value]"),
    "midtrain": ("training.midtrain", "midtrain a base model on the packed conversation mixture: --config "
                 "recipes/<tier>/midtrain.yaml"),
    "sft": ("training.sft", "supervised fine-tuning through TRL's SFTTrainer: --config recipes/<tier>/sft.yaml"),
    "rl": ("training.rl", "RL on GSM8K through TRL's GRPOTrainer: --config recipes/<tier>/rl.yaml"),
    "eval": ("evaluation.evaluate", "evaluate a checkpoint for its stage (CORE + bpb, or the chat tasks) and write results JSON"),
    "report": ("evaluation.report", "write report.md (tables, timings, cost, loss/bpb plots) for a speedrun folder"),
    "chat": ("inference.chat_cli", "chat with a model in the terminal (streaming, tool use); -p PROMPT answers once"),
    "serve": ("inference.serve", "serve the chat Space (Gradio) locally for a model folder or repo id"),
    "push": ("hub.push", "push a model (weights, code, tokenizer, model card) and optionally its Space to the Hub"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanochat-hf",
        description="nanochat on the Hugging Face stack: tokenizer, model, training, evaluation, chat, Hub.",
    )
    parser.add_argument("--debug", action="store_true", help="on an input error, print the traceback above the "
                        f"one-line message (also {DEBUG_ENV}=1); goes before COMMAND")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_tokenizer_parser(sub)
    add_convert_parser(sub)

    init = sub.add_parser(
        "init",
        help="build a freshly initialised model for a tokenizer (nanochat's depth dial)",
        description="Build a NanoChat model from its depth alone, sized for TOKENIZER, and save model + tokenizer "
        "as one save_pretrained folder that AutoModelForCausalLM loads with trust_remote_code=True.",
    )
    init.add_argument("--tokenizer", required=True, help="tokenizer folder or Hub repo id")
    init.add_argument("--depth", type=int, required=True, help="number of layers; sets width, heads and context")
    init.add_argument("--generation", choices=["2025", "2026"], default="2026", help="architecture generation")
    init.add_argument("--head-dim", type=int, help="head dimension (default: nanochat's 128)")
    init.add_argument("--sequence-len", type=int, help="context length (default 2048)")
    init.add_argument("--window-pattern", help="sliding-window pattern of S/L characters (2026 default SSSL)")
    init.add_argument("--out", required=True, help="output folder (new or empty)")
    init.add_argument("--overwrite", action="store_true", help="replace --out if it holds a folder nanochat-hf wrote")
    init.set_defaults(func=_init_main)

    speedrun = sub.add_parser(
        "speedrun",
        help="run every stage of a tier end to end into one run folder",
        description="Chain the pipeline's stages for a tier into RUN_DIR: corpus, tokenizer, pretrain, midtrain (the "
        "2025 pipeline only), SFT, (RL), with an evaluation after each training stage, then report.md. Finished stages are skipped on a "
        "re-run; an interrupted pretraining or midtraining resumes from its last checkpoint. The cpu tier needs no "
        "download: it pretrains on the documentation embedded in Python itself and fine-tunes on the project's own "
        "generated conversations. GPU tiers launch each training stage with `accelerate launch` on every visible "
        "GPU (`bash recipes/speedrun.sh TIER [PIPELINE]` shows the commands).",
    )
    speedrun.add_argument("--tier", choices=["cpu", "d12", "d20", "d24", "d26", "d32"], default="cpu",
                          help="model tier")
    speedrun.add_argument("--pipeline", choices=["2025", "2026"],
                          help="2025: pretrain, midtrain, SFT; 2026: nanochat HEAD's pretrain then SFT from the base "
                          "model (default: 2025 on cpu, 2026 on the GPU tiers)")
    speedrun.add_argument("--run-dir", help="output folder (default runs/<tier>)")
    speedrun.add_argument("--corpus", help="text/jsonl/parquet file or folder to use instead of the tier's corpus")
    speedrun.add_argument("--max-steps", type=int, help="cap every training stage at this many steps (smoke run)")
    speedrun.add_argument("--rl", action="store_true", help="add the RL stage (GRPO on GSM8K; arithmetic on cpu)")
    speedrun.add_argument("--accelerate-config", help="launch the training stages with this accelerate config "
                          "(default: plain python on cpu; single_gpu/ddp_8gpu on GPU tiers)")
    speedrun.add_argument("--eval-max-per-task", type=int,
                          help="items per evaluation task (default: the tier's; -1 all)")
    speedrun.add_argument("--eval-max-tokens", type=int, help="tokens per generated reply in the chat evaluations")
    speedrun.set_defaults(func=_speedrun_main)

    # Stages with their own parsers (recipe dataclasses, the Space's flags): the rest of the command line is
    # handed over untouched, `--help` included.
    for name, (_, summary) in PASS_THROUGH.items():
        stage = sub.add_parser(name, add_help=False, help=summary, description=summary)
        stage.add_argument("args", nargs=argparse.REMAINDER, help=f"see `nanochat-hf {name} --help`")

    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = False
    while argv[:1] == ["--debug"]:  # the global flag; after COMMAND, the rest belongs to the stage
        debug = True
        del argv[0]
    if argv[:1] and argv[0] in PASS_THROUGH:
        module = f".{PASS_THROUGH[argv[0]][0]}"
        run_command(argv[0], lambda: importlib.import_module(module, __package__).main(argv[1:]), debug)
        return
    args = build_parser().parse_args(argv)
    command = " ".join(filter(None, (args.command, getattr(args, "tokenizer_command", None),
                                     getattr(args, "conversion", None))))
    run_command(command, lambda: args.func(args), debug)


if __name__ == "__main__":
    main()
