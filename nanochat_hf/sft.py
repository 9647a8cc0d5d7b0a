"""Supervised fine-tuning through TRL's SFTTrainer with nanochat's recipe (nanochat-spec.md §4.4, ORIG chat_sft.py).

    nanochat-hf sft --config recipes/d20/sft.yaml [--num_iterations 100 ...]
    accelerate launch --config_file accelerate_configs/ddp_8gpu.yaml -m nanochat_hf.sft --config ...

* Loss mask: ``assistant_only_loss=True``; the chat template's ``{% generation %}`` marks are nanochat's mask
  (assistant text, python calls and ``<|assistant_end|>`` trained; user turns, ``<|assistant_start|>`` and tool
  outputs not).
* No packing, as nanochat: each conversation is its own row, padded to the longest in the micro-batch with
  ``<|assistant_end|>`` (masked), so conversations never attend to each other.
* Optimizer: our Muon + AdamW through the Trainer's factory hook, base LRs x ``init_lr_frac`` (0.02), LR linear to 0
  over one epoch, no weight decay, no gradient clipping; ``target_examples_per_step`` conversations per step.
* The loss is on the real vocabulary even when the model pads it (see :mod:`nanochat_hf.trl_support`).
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from .errors import Bound, check_bounds, run_command
from .midtrain import split_validation, stage_mixture
from .modeling_nanochat import NanoChatForCausalLM
from .optim import orthogonalization_dtype
from .output_folder import run_folder
from .pretrain import (
    LossLog,
    check_parallelism,
    keep_local_gloo_on_loopback,
    parse_args,
    require_model_folder,
    save_final,
)
from .tokenizer import load_tokenizer
from .trl_support import FinetuneOptimizerFactory, NanoChatTRLMixin, finetune_optimizer_kwargs, score_real_vocab_only


@dataclass
class SFTArguments:
    """An SFT run. Every field can be set in the recipe YAML and overridden on the command line."""

    output_dir: str = field(default="runs/sft", metadata={
        "help": "checkpoints and the final model: a new or empty folder or one of this stage's runs "
                "(anything else is refused; nothing is deleted)"})
    init_from: str = field(default="runs/d20/midtrain/final", metadata={"help": "model folder to fine-tune"})
    tier: str = field(default="d20", metadata={"help": "mixture of nanochat_hf.tasks.build_mixture for this tier"})
    data_dir: str | None = field(default=None, metadata={"help": "local copies of the mixture's Hub datasets"})
    conversations: str | None = field(default=None,
                                      metadata={"help": "a .jsonl/.parquet file of {'messages': [...]} rows to use "
                                                "instead of the tier's mixture"})
    val_rows: int = field(default=0, metadata={"help": "conversations held out for the validation loss"})
    max_rows: int = field(default=-1, metadata={"help": "use only the first N conversations (smoke runs); -1: all"})
    max_seq_len: int = field(default=-1, metadata={"help": "truncate conversations to this many tokens; -1: the "
                                                   "model's context"})
    device_batch_size: int = field(default=4, metadata={"help": "conversations per device per micro-step"})
    target_examples_per_step: int = field(default=32, metadata={"help": "conversations per optimizer step"})
    num_epochs: float = field(default=1.0, metadata={"help": "passes over the mixture"})
    num_iterations: int = field(default=-1, metadata={"help": "optimizer steps; -1: num_epochs over the mixture"})
    embedding_lr: float = field(default=0.2, metadata={"help": "AdamW LR of the token embedding"})
    unembedding_lr: float = field(default=0.004, metadata={"help": "AdamW LR of lm_head"})
    matrix_lr: float = field(default=0.02, metadata={"help": "Muon LR of the block matrices"})
    scalar_lr: float = field(default=0.5, metadata={"help": "AdamW LR of the resid/x0 lambdas"})
    init_lr_frac: float = field(default=0.02, metadata={"help": "every LR is multiplied by this"})
    weight_decay: float = field(default=0.0, metadata={"help": "Muon weight decay"})
    eval_every: int = field(default=100, metadata={"help": "steps between validation losses; -1 off"})
    save_every: int = field(default=-1, metadata={"help": "steps between checkpoints; -1: none"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints kept on disk"})
    log_every: int = field(default=1, metadata={"help": "steps between log lines"})
    num_proc: int | None = field(default=None, metadata={"help": "processes tokenizing the conversations"})
    seed: int = field(default=42, metadata={"help": "random seed"})
    report_to: str = field(default="none", metadata={"help": "none, tensorboard or trackio"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast"})

    def __post_init__(self) -> None:
        # Refused when parsed, before anything loads; -1 means "derive it" or "off".
        check_bounds(self, {
            "val_rows": Bound(low=0), "max_rows": Bound(low=1, off=-1), "max_seq_len": Bound(low=1, off=-1),
            "device_batch_size": Bound(low=1), "target_examples_per_step": Bound(low=1),
            "num_epochs": Bound(above=0), "num_iterations": Bound(low=1, off=-1),
            "embedding_lr": Bound(low=0), "unembedding_lr": Bound(low=0), "matrix_lr": Bound(low=0),
            "scalar_lr": Bound(low=0), "init_lr_frac": Bound(low=0), "weight_decay": Bound(low=0),
            "eval_every": Bound(low=1, off=-1), "save_every": Bound(low=1, off=-1), "keep_last": Bound(low=1),
            "log_every": Bound(low=1), "num_proc": Bound(low=1), "seed": Bound(low=0),
        })


class NanoChatSFTTrainer(NanoChatTRLMixin, SFTTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        score_real_vocab_only(self.model)


def parse_sft_args(argv: list[str] | None = None) -> SFTArguments:
    return parse_args(argv, SFTArguments, prog="nanochat-hf sft",
                      description="Supervised fine-tuning with TRL's SFTTrainer and nanochat's recipe. --config "
                      "RECIPE.yaml sets the fields below; command-line flags override it.")


def sft_config(run: SFTArguments, max_length: int, eval_set: Dataset | None) -> SFTConfig:
    evaluate = eval_set is not None and run.eval_every > 0
    args = SFTConfig(
        output_dir=run.output_dir,
        per_device_train_batch_size=run.device_batch_size,
        per_device_eval_batch_size=run.device_batch_size,
        num_train_epochs=run.num_epochs,
        max_steps=run.num_iterations,
        max_grad_norm=0.0,
        weight_decay=0.0,
        logging_steps=run.log_every,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=run.eval_every if evaluate else None,
        save_strategy="steps" if run.save_every > 0 else "no",
        save_steps=max(run.save_every, 1),
        save_total_limit=run.keep_last,
        report_to=[] if run.report_to == "none" else [run.report_to],
        seed=run.seed,
        bf16=run.bf16,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False,
        assistant_only_loss=True,
        packing=False,
        padding_free=False,
        max_length=max_length,
        dataset_num_proc=run.num_proc,
        disable_tqdm=False,
    )
    per_step = run.device_batch_size * args.world_size
    if run.target_examples_per_step % per_step:
        raise ValueError(f"target_examples_per_step={run.target_examples_per_step} is not a multiple of "
                         f"device_batch_size x processes = {run.device_batch_size} x {args.world_size}; change "
                         "one of them")
    args.gradient_accumulation_steps = run.target_examples_per_step // per_step
    return args


def train(run: SFTArguments, dataset: Dataset | None = None) -> Path:
    """Fine-tune `run.init_from` on `dataset` (a `messages` column; default: the tier's SFT mixture); returns the
    folder of the final model."""
    keep_local_gloo_on_loopback()
    require_model_folder(run.init_from, "midtrain")
    tokenizer = load_tokenizer(run.init_from)
    model = NanoChatForCausalLM.from_pretrained(run.init_from)
    max_length = run.max_seq_len if run.max_seq_len > 0 else model.config.max_position_embeddings
    dataset = stage_mixture("sft", run) if dataset is None else dataset
    if "messages" not in dataset.column_names:
        raise ValueError(f"the SFT data has no 'messages' column (columns: {dataset.column_names})")
    dataset = dataset.select_columns(["messages"])
    eval_set = None
    if run.val_rows > 0:
        dataset, eval_set = split_validation(dataset, run.val_rows, 1)
    args = sft_config(run, max_length=max_length, eval_set=eval_set)
    Path(run.output_dir).mkdir(parents=True, exist_ok=True)
    check_parallelism(args.distributed_state.distributed_type)
    optimizer_kwargs = dict(finetune_optimizer_kwargs(run), ortho_dtype=orthogonalization_dtype(args.mixed_precision))
    trainer = NanoChatSFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        optimizer_cls_and_kwargs=(FinetuneOptimizerFactory, optimizer_kwargs),
    )
    trainer.add_callback(LossLog(trainer))
    trainer.train()
    return save_final(trainer, tokenizer, run.output_dir)


def main(argv: list[str] | None = None) -> None:
    run = parse_sft_args(argv)
    # a folder that is not a run is refused; a run that fails before writing leaves no empty folder behind
    with run_folder(run.output_dir, inputs=[run.init_from, run.data_dir, run.conversations]):
        train(run)


if __name__ == "__main__":  # `accelerate launch -m nanochat_hf.sft`: input errors as in the CLI
    run_command("sft", main)
