"""Supervised fine-tuning through TRL's SFTTrainer, as either of nanochat's two pipelines (nanochat-spec.md §4.4).

    nanochat-hf sft --config recipes/d20/sft.yaml [--num_iterations 100 ...]          # 2025: after midtraining
    nanochat-hf sft --config recipes/d24/sft-2026.yaml                                 # 2026: from the base model
    accelerate launch --config_file accelerate_configs/ddp_8gpu.yaml -m nanochat_hf.training.sft --config ...

``pipeline: "2025"`` (ORIG chat_sft.py) fine-tunes the midtrained model: each conversation is its own row, padded
to the longest in the micro-batch with ``<|assistant_end|>`` (masked), ``target_examples_per_step`` conversations a
step, base LRs x 0.02 falling linearly to 0 over one epoch, validation loss on the tasks' test conversations.

``pipeline: "2026"`` (HEAD chat_sft.py) fine-tunes the base model:

* The sequence length, device batch, total batch (tokens a step) and the three base LRs are inherited from the
  base run's record (``run_args.json``, which pretraining writes beside its final model); a value given here wins.
* The optimizer is warm-started (``load_optimizer``, default true) from the state pretraining left in the base
  model's folder (``optimizer.pt``): Muon's momentum buffers and AdamW's moments carry over, the hyper-parameters are
  this run's (LRs x 0.8, Muon weight decay 0).
* The mixture (SmolTalk + MMLU x3 + GSM8K x4, one epoch) is packed by nanochat's BOS-aligned best-fit rule
  (:func:`~nanochat_hf.data.conversations.pack_conversations`): rows of T+1 tokens, the largest conversation that
  fits goes in, the rest of a row that none fits is BOS padding with masked targets, nothing is cropped. TRL trains
  on those rows in order; the targets are the chat template's generation mask.
* LR: constant, then a linear warmdown over the last 50% to 0; Muon momentum 0.85 -> 0.95 over 300 steps.
* Every ``eval_every`` steps (and at the end) val bits per byte on the packed test conversations, and every
  ``chatcore_every`` steps ChatCORE (every categorical problem, the first 24 generative ones).

Both: the loss is nanochat's, the mean over the supervised tokens of each micro-batch averaged over the
micro-batches of a step (not TRL's default, one mean over every supervised token of the step); our Muon + AdamW
through the Trainer's factory hook; no gradient clipping; the loss on the real vocabulary when the model pads it
(see :mod:`nanochat_hf.training.trl_support`).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from datasets import Dataset
from torch.utils.data import SequentialSampler
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from ..data.conversations import ConversationStream, collate_packed_rows, pack_conversations, render_dataset
from ..errors import Bound, UsageError, check_bounds, check_choice, run_command
from ..evaluation.bpb import evaluate_bpb
from ..modeling_nanochat import NanoChatForCausalLM
from ..output_folder import run_folder
from ..tokenizer.bpe import load_tokenizer, token_bytes
from .arguments import OPTIMIZER_FIELDS, TrainerFields, hand_project_to_wandb, trainer_config
from .checkpoints import read_run_record, warm_start_optimizer
from .midtrain import CONVERSATION_BOUNDS, ConversationDataArguments, stage_mixture, validation_mixture
from .optim import NanoChatSchedule, orthogonalization_dtype
from .pretrain import (
    LossLog,
    check_parallelism,
    keep_local_gloo_on_loopback,
    parse_args,
    push_if_asked,
    require_model_folder,
    save_final,
)
from .trl_support import FinetuneOptimizerFactory, NanoChatTRLMixin, finetune_optimizer_kwargs, score_real_vocab_only

PIPELINES = ("2025", "2026")
# nanochat's chat_sft defaults where the pipelines differ (None fields of SFTArguments take these)
PIPELINE_DEFAULTS: dict[str, dict] = {
    "2025": dict(device_batch_size=4, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, init_lr_frac=0.02,
                 warmdown_ratio=1.0, eval_every=100, chatcore_every=-1, load_optimizer=False),
    "2026": dict(init_lr_frac=0.8, warmdown_ratio=0.5, eval_every=200, chatcore_every=200, load_optimizer=True),
}
# HEAD inherits these from the base run, falling back to its own defaults where the base recorded none
INHERITED_FALLBACKS = {"device_batch_size": 32, "total_batch_size": 524288, "embedding_lr": 0.3,
                       "unembedding_lr": 0.004, "matrix_lr": 0.02}
# where each inherited value sits in run_args.json: the run's arguments, or the plan they resolved to
_RECORD_SECTION = {"device_batch_size": "arguments", "total_batch_size": "plan", "embedding_lr": "arguments",
                   "unembedding_lr": "arguments", "matrix_lr": "arguments"}
# HEAD renders every conversation truncated to 2,048 tokens (render_conversation's max_tokens)
RENDER_MAX_TOKENS = 2048
MIXTURE = {"2025": "sft", "2026": "sft-2026"}
# Muon's momentum: ORIG's SFT keeps the groups' 0.95; HEAD's warms it up from 0.85 over 300 steps
MOMENTUM_SCHEDULE = {"2025": None, "2026": "warmup"}
_PACKING = ("packing follows --pipeline: 2026 packs conversations best-fit into BOS-aligned rows (nanochat HEAD's), "
            "2025 trains one conversation a row (ORIG's)")
# How SFT treats the fields of SFTConfig (nanochat_hf.training.arguments)
SFT_TRAINER = TrainerFields(
    config_cls=SFTConfig,
    aliases={"max_steps": "num_iterations", "num_train_epochs": "num_epochs",
             "per_device_train_batch_size": "device_batch_size", "learning_rate": "matrix_lr",
             "logging_steps": "log_every", "save_steps": "save_every", "save_total_limit": "keep_last",
             "eval_steps": "eval_every", "dataset_num_proc": "num_proc", "max_length": "max_seq_len"},
    defaults={"max_grad_norm": 0.0, "activation_checkpointing": False, "disable_tqdm": False,
              "project": "nanochat-sft"},
    owned={
        "gradient_accumulation_steps": "2025: target_examples_per_step / (device_batch_size x processes), set "
                                       "--target_examples_per_step; 2026: total_batch_size / (device_batch_size x "
                                       "max_seq_len x processes), set --total_batch_size",
        **dict.fromkeys(("packing", "packing_strategy", "padding_free", "eval_packing"), _PACKING),
        **dict.fromkeys(("assistant_only_loss", "completion_only_loss"),
                        "the loss is on nanochat's mask (the chat template's generation tokens)"),
        "dataset_kwargs": _PACKING,
        "remove_unused_columns": _PACKING,
        "eval_strategy": "an evaluation every --eval_every steps",
        "save_strategy": "a checkpoint every --save_every steps",
        "warmup_steps": "nanochat's SFT has no warmup; shape the LR with --warmdown_ratio and --final_lr_frac",
        **OPTIMIZER_FIELDS,
    },
)


@dataclass
class SFTArguments(ConversationDataArguments):
    """An SFT run. Every field can be set in the recipe YAML and overridden on the command line. A field left
    unset takes its pipeline's nanochat default (2026: inherited from the base run where HEAD inherits it).
    `trainer_args` holds the other SFTConfig fields given."""

    trainer_fields: ClassVar[TrainerFields] = SFT_TRAINER

    output_dir: str = field(default="runs/sft", metadata={
        "help": "checkpoints and the final model: a new or empty folder or one of this stage's runs "
                "(anything else is refused; nothing is deleted)"})
    init_from: str = field(default="runs/d20/mid", metadata={
        "help": "model folder to fine-tune: the midtrained model (2025) or the base model (2026)"})
    pipeline: str = field(default="2025", metadata={
        "help": "2025: nanochat ORIG's SFT after midtraining; 2026: HEAD's SFT from the base model"})
    max_seq_len: int = field(default=-1, metadata={"help": "2025: truncate conversations to this many tokens; "
                                                   "2026: the packed rows' length; -1: the model's context"})
    device_batch_size: int | None = field(default=None, metadata={
        "help": "conversations (2025) or packed rows (2026) per device per micro-step; default 4 (2025) or the "
                "base run's (2026)"})
    target_examples_per_step: int = field(default=32, metadata={"help": "2025: conversations per optimizer step"})
    total_batch_size: int | None = field(default=None, metadata={
        "help": "2026: tokens per optimizer step; default: the base run's"})
    num_epochs: float = field(default=1.0, metadata={"help": "passes over the mixture"})
    num_iterations: int = field(default=-1, metadata={"help": "optimizer steps; -1: num_epochs over the mixture"})
    embedding_lr: float | None = field(default=None, metadata={
        "help": "AdamW LR of the token embedding; default 0.2 (2025) or the base run's (2026)"})
    unembedding_lr: float | None = field(default=None, metadata={
        "help": "AdamW LR of lm_head; default 0.004 (2025) or the base run's (2026)"})
    matrix_lr: float | None = field(default=None, metadata={
        "help": "Muon LR of the block matrices; default 0.02 (2025) or the base run's (2026)"})
    scalar_lr: float = field(default=0.5, metadata={"help": "AdamW LR of the resid/x0 lambdas"})
    init_lr_frac: float | None = field(default=None, metadata={
        "help": "every LR is multiplied by this; default 0.02 (2025) or 0.8 (2026)"})
    warmdown_ratio: float | None = field(default=None, metadata={
        "help": "fraction of the run over which the LR falls linearly to final_lr_frac; default 1.0 (2025) or 0.5 "
                "(2026)"})
    final_lr_frac: float = field(default=0.0, metadata={"help": "LR multiplier at the end of the warmdown"})
    weight_decay: float = field(default=0.0, metadata={"help": "Muon weight decay"})
    load_optimizer: bool | None = field(default=None, metadata={
        "help": "2026: warm-start Muon and AdamW from the optimizer.pt pretraining saved beside the base model "
                "(default true)"})
    eval_every: int | None = field(default=None, metadata={
        "help": "steps between validation losses (2025, default 100) or val bits per byte (2026, default 200); -1 "
                "off"})
    eval_tokens: int = field(default=40 * 524288, metadata={"help": "2026: validation tokens per evaluation"})
    chatcore_every: int | None = field(default=None, metadata={
        "help": "steps between ChatCORE evaluations (Hub tiers); default -1 (2025, off) or 200 (2026)"})
    chatcore_max_cat: int = field(default=-1, metadata={
        "help": "problems per multiple-choice task in the ChatCORE evaluation; -1: all"})
    chatcore_max_sample: int = field(default=24, metadata={
        "help": "problems per generative task in the ChatCORE evaluation; -1: all"})
    save_every: int = field(default=-1, metadata={"help": "steps between checkpoints; -1: none"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints kept on disk"})
    log_every: int = field(default=1, metadata={"help": "steps between log lines"})
    num_proc: int | None = field(default=None, metadata={"help": "processes tokenizing the conversations"})
    seed: int = field(default=42, metadata={"help": "random seed"})
    report_to: str = field(default="none", metadata={
        "help": "where the Trainer logs: none, all, or one integration (tensorboard, trackio, wandb); --project "
                "and --run_name name the run there"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast"})
    torch_compile: bool = field(default=False, metadata={
        "help": "2026: compile the model (torch.compile, dynamic=False, as HEAD's SFT); the packed rows keep "
                "every step's shapes equal"})
    trainer_args: dict = field(default_factory=dict, metadata={
        "help": "the other SFTConfig fields given in the recipe or on the command line"})

    def __post_init__(self) -> None:
        check_choice(self, "pipeline", PIPELINES)
        for name, value in PIPELINE_DEFAULTS[self.pipeline].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        # Refused when parsed, before anything loads; -1 means "derive it" or "off".
        check_bounds(self, {
            **CONVERSATION_BOUNDS, "max_seq_len": Bound(low=2, off=-1),
            "device_batch_size": Bound(low=1), "target_examples_per_step": Bound(low=1),
            "total_batch_size": Bound(low=1), "num_epochs": Bound(above=0), "num_iterations": Bound(low=1, off=-1),
            "embedding_lr": Bound(low=0), "unembedding_lr": Bound(low=0), "matrix_lr": Bound(low=0),
            "scalar_lr": Bound(low=0), "init_lr_frac": Bound(low=0), "warmdown_ratio": Bound(low=0, high=1),
            "final_lr_frac": Bound(low=0, high=1), "weight_decay": Bound(low=0),
            "eval_every": Bound(low=1, off=-1), "eval_tokens": Bound(low=1), "chatcore_every": Bound(low=1, off=-1),
            "chatcore_max_cat": Bound(low=1, off=-1), "chatcore_max_sample": Bound(low=1, off=-1),
            "save_every": Bound(low=1, off=-1), "keep_last": Bound(low=1), "log_every": Bound(low=1),
            "num_proc": Bound(low=1), "seed": Bound(low=0),
        })
        if self.pipeline == "2025" and self.load_optimizer:
            raise UsageError("--load_optimizer true: the 2025 pipeline fine-tunes the midtrained model, whose run "
                             "keeps no optimizer state; use --pipeline 2026 (from the base model) or drop the flag")
        if self.pipeline == "2025" and self.total_batch_size is not None:
            raise UsageError("--total_batch_size: the 2025 pipeline counts a step in conversations; set "
                             "--target_examples_per_step instead (or use --pipeline 2026)")


def inherit_from_base(run: SFTArguments, record: dict | None) -> list[str]:
    """HEAD's inheritance: every unset field of INHERITED_FALLBACKS takes the base run's value (`record`, its
    run_args.json; None for a base model from elsewhere), else HEAD's fallback. Returns what it did, one line each."""
    said = []
    for name, fallback in INHERITED_FALLBACKS.items():
        recorded = record[_RECORD_SECTION[name]].get(name) if record is not None else None
        if recorded is not None and not isinstance(recorded, int | float):
            raise ValueError(f"{run.init_from}/run_args.json: {name} is {recorded!r}, not a number; fix or delete "
                             "the file")
        value = getattr(run, name)
        if value is None:
            value = recorded if recorded is not None else fallback
            setattr(run, name, value)
            said.append(f"{name}={value} inherited from the base run" if recorded is not None
                        else f"{name}={value} (nanochat's fallback: the base run recorded none)")
        elif recorded is not None and value != recorded:
            said.append(f"{name}={value} overrides the base run's {recorded}")
    return said


class NanoChatSFTTrainer(NanoChatTRLMixin, SFTTrainer):
    """TRL's SFTTrainer with nanochat's optimizer, schedule and loss normalisation. Without `run`, the schedule is
    the 2025 pipeline's default (linear to 0 over the run, momentum held)."""

    def __init__(self, *args, run: SFTArguments | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.run = run
        score_real_vocab_only(self.model)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.run is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        self.lr_scheduler = NanoChatSchedule(
            optimizer or self.optimizer, total_steps=num_training_steps, warmup_steps=0,
            warmdown_ratio=self.run.warmdown_ratio, final_lr_frac=self.run.final_lr_frac,
            momentum_schedule=MOMENTUM_SCHEDULE[self.run.pipeline], weight_decay_schedule=False,
        )
        return self.lr_scheduler

    def _get_num_items_in_batch(self, batch_samples, device):
        # nanochat's normalisation: with no count of the step's tokens, TRL takes the mean over each micro-batch's
        # supervised tokens and the Trainer divides it by the number of micro-batches.
        return None


class PackedSFTTrainer(NanoChatSFTTrainer):
    """HEAD's SFT on packed rows: taken in order, its own LR and momentum schedule, the optimizer warm-started from
    the base run, and evaluation by val bits per byte and ChatCORE."""

    def __init__(self, *args, run: SFTArguments, val_stream_fn, **kwargs):
        super().__init__(*args, run=run, **kwargs)
        self.val_stream_fn = val_stream_fn
        self.token_bytes = None

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.run.load_optimizer and not getattr(self, "_warm_started", False):
            warm_start_optimizer(self.optimizer, self.run.init_from)
            self._warm_started = True
            if self.args.process_index == 0:
                print(f"[sft] optimizer state warm-started from {Path(self.run.init_from) / 'optimizer.pt'} "
                      "(momentum buffers and moments; this run's LRs)", flush=True)
        return optimizer

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        step, metrics = self.state.global_step, {}
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        if self.val_stream_fn is not None and due(step, self.run.eval_every, self.state.max_steps):
            if self.token_bytes is None:
                self.token_bytes = token_bytes(self.processing_class)
            metrics[f"{metric_key_prefix}_bpb"] = evaluate_bpb(model, self.val_stream_fn(), self.token_bytes)
        if due(step, self.run.chatcore_every, self.state.max_steps):
            metrics.update(self._chatcore(model))
        model.train()
        if metrics and self.args.should_save:  # the report's curves, beside losses.jsonl (as pretraining's)
            with open(Path(self.args.output_dir) / "bpb.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "bpb": metrics.get(f"{metric_key_prefix}_bpb"),
                                    **{k: v for k, v in metrics.items() if k.startswith("chatcore")}}) + "\n")
        if metrics:
            self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _chatcore(self, model) -> dict[str, float]:
        from ..evaluation.chat import measure_chatcore  # the tasks and the engine load only when asked for

        # the main process evaluates while the others wait: the problems are not split across ranks
        results: dict[str, float] = {}
        if self.args.process_index == 0:
            with torch.compiler.set_stance("force_eager"):  # shapes change with every prompt
                results = measure_chatcore(model, self.processing_class, max_categorical=self.run.chatcore_max_cat,
                                           max_generative=self.run.chatcore_max_sample,
                                           batch_size=self.run.device_batch_size, data_dir=self.run.data_dir)
        self.accelerator.wait_for_everyone()
        return results


def due(step: int, every: int, last: int) -> bool:
    """Whether an evaluation run every `every` steps (-1: never) falls at `step`; the last step always has one."""
    return every > 0 and step > 0 and (step % every == 0 or step == last)


class EvaluationSchedule(TrainerCallback):
    """Asks the Trainer to evaluate whenever a val bits-per-byte or a ChatCORE evaluation is due."""

    def __init__(self, *everies: int):
        self.everies = everies

    def on_step_end(self, args, state, control, **kwargs):
        if any(due(state.global_step, every, state.max_steps) for every in self.everies):
            control.should_evaluate = True


def parse_sft_args(argv: list[str] | None = None) -> SFTArguments:
    return parse_args(argv, SFTArguments, prog="nanochat-hf sft",
                      description="Supervised fine-tuning with TRL's SFTTrainer and nanochat's recipe (--pipeline "
                      "2025: after midtraining; 2026: HEAD's, from the base model). --config RECIPE.yaml (or "
                      "--config=RECIPE.yaml) sets the fields below; command-line flags override it. The SFTConfig "
                      "group's defaults are nanochat's settings; a field marked `same as --X` sets X; one marked "
                      "`set by this stage` is refused.")


def sft_config(run: SFTArguments, max_length: int, eval_set: Dataset | None) -> SFTConfig:
    packed = run.pipeline == "2026"
    evaluate = not packed and eval_set is not None and run.eval_every > 0
    args = trainer_config(run, defaults={
        "per_device_eval_batch_size": run.device_batch_size,
        "use_cpu": not torch.cuda.is_available(),
    }, stage_values={
        "output_dir": run.output_dir,
        "per_device_train_batch_size": run.device_batch_size,
        "num_train_epochs": run.num_epochs,
        "max_steps": run.num_iterations,
        "weight_decay": 0.0,  # Muon's (run.weight_decay) is our optimizer's; the Trainer's groups are unused
        "logging_steps": run.log_every,
        "eval_strategy": "steps" if evaluate else "no",
        "eval_steps": run.eval_every if evaluate else None,
        "save_strategy": "steps" if run.save_every > 0 else "no",
        "save_steps": max(run.save_every, 1),
        "save_total_limit": run.keep_last,
        "report_to": run.report_to,
        "seed": run.seed,
        "bf16": run.bf16,
        # 2025: TRL renders each conversation and masks it; 2026: the rows arrive packed, masked and shifted
        "assistant_only_loss": not packed,
        "packing": False,
        "padding_free": False,
        "max_length": max_length,
        "dataset_num_proc": run.num_proc,
        "dataset_kwargs": {"skip_prepare_dataset": True} if packed else None,
        "remove_unused_columns": not packed,
    })
    hand_project_to_wandb(run, args)
    if packed:
        per_step = run.device_batch_size * max_length * args.world_size
        if run.total_batch_size % per_step:
            raise ValueError(f"total_batch_size={run.total_batch_size:,} tokens is not a multiple of "
                             f"device_batch_size x max_seq_len x processes = {run.device_batch_size} x {max_length} x "
                             f"{args.world_size}; change one of them")
        args.gradient_accumulation_steps = run.total_batch_size // per_step
        return args
    per_step = run.device_batch_size * args.world_size
    if run.target_examples_per_step % per_step:
        raise ValueError(f"target_examples_per_step={run.target_examples_per_step} is not a multiple of "
                         f"device_batch_size x processes = {run.device_batch_size} x {args.world_size}; change "
                         "one of them")
    args.gradient_accumulation_steps = run.target_examples_per_step // per_step
    return args


def _messages(dataset: Dataset, name: str) -> Dataset:
    if "messages" not in dataset.column_names:
        raise ValueError(f"the {name} have no 'messages' column (columns: {dataset.column_names})")
    return dataset.select_columns(["messages"])


def train(run: SFTArguments, dataset: Dataset | None = None, val_dataset: Dataset | None = None) -> Path:
    """Fine-tune `run.init_from` on `dataset` (a `messages` column; default: the tier's SFT mixture of the
    pipeline), validating on `val_dataset` (default: the tier's test conversations); returns the final model's
    folder."""
    keep_local_gloo_on_loopback()
    require_model_folder(run.init_from, "midtrain" if run.pipeline == "2025" else "pretrain")
    tokenizer = load_tokenizer(run.init_from)
    model = NanoChatForCausalLM.from_pretrained(run.init_from)
    max_length = run.max_seq_len if run.max_seq_len > 0 else model.config.max_position_embeddings
    if run.pipeline == "2026":
        for line in inherit_from_base(run, read_run_record(run.init_from)):
            print(f"[sft] {line}", flush=True)
    if run.chatcore_every > 0 and run.tier == "cpu" and run.data_dir is None:
        raise UsageError("--chatcore_every: ChatCORE's tasks are Hub datasets, which the CPU tier does not read; "
                         "set --chatcore_every -1, or --data_dir to local copies of them")
    given = dataset is not None
    dataset = _messages(dataset if given else stage_mixture(MIXTURE[run.pipeline], run), "SFT data")
    if val_dataset is None and run.eval_every > 0 and (not given or run.val_conversations):
        # the tasks' test conversations, never rows of the training mixture
        val_dataset = validation_mixture(run, MIXTURE[run.pipeline])
    eval_set = None if val_dataset is None else _messages(val_dataset, "validation conversations")
    args = sft_config(run, max_length=max_length, eval_set=eval_set)
    Path(run.output_dir).mkdir(parents=True, exist_ok=True)
    check_parallelism(args.distributed_state.distributed_type)
    optimizer_kwargs = dict(finetune_optimizer_kwargs(run), ortho_dtype=orthogonalization_dtype(args.mixed_precision))
    common = dict(model=model, args=args, processing_class=tokenizer,
                  optimizer_cls_and_kwargs=(FinetuneOptimizerFactory, optimizer_kwargs))
    if run.pipeline == "2025":
        trainer = NanoChatSFTTrainer(train_dataset=dataset, eval_dataset=eval_set, run=run, **common)
    else:
        trainer = packed_trainer(run, model, tokenizer, dataset, eval_set, max_length, args, common)
    trainer.add_callback(LossLog(trainer))
    trainer.train()
    final = save_final(trainer, tokenizer, run.output_dir)
    push_if_asked(trainer)
    return final


def packed_trainer(run: SFTArguments, model: NanoChatForCausalLM, tokenizer, dataset: Dataset,
                   eval_set: Dataset | None, seq_len: int, args: SFTConfig, common: dict) -> PackedSFTTrainer:
    """HEAD's SFT: the conversations rendered and packed into rows of `seq_len` + 1 tokens (once, on the main
    process first; every rank reads the same cached rows and the Trainer gives each its share)."""
    bos = tokenizer.bos_token_id
    with args.main_process_first(desc="packing the SFT mixture"):
        rendered = render_dataset(dataset, tokenizer, max_tokens=RENDER_MAX_TOKENS, num_proc=run.num_proc,
                                  name="SFT mixture")
        rows = pack_conversations(rendered, seq_len=seq_len, bos_token_id=bos)
        val_rendered = None if eval_set is None else render_dataset(
            eval_set, tokenizer, max_tokens=RENDER_MAX_TOKENS, num_proc=run.num_proc, name="SFT validation")
    world, rank = args.world_size, args.process_index
    val_batches = max(1, run.eval_tokens // (run.device_batch_size * seq_len * world))

    def val_stream():
        # a fresh stream per evaluation: every evaluation scores the same rows
        return ConversationStream(val_rendered, seq_len=seq_len, batch_size=run.device_batch_size, bos_token_id=bos,
                                  rank=rank, world_size=world, assistant_only=True, loop=False,
                                  max_batches=val_batches)

    if run.torch_compile:
        model.compile(dynamic=False)  # in place, as pretraining: checkpoints keep their parameter names
    if rank == 0:
        print(f"[sft] {len(dataset):,} conversations packed into {len(rows):,} rows of {seq_len + 1} tokens; "
              f"{run.device_batch_size} rows x {args.gradient_accumulation_steps} micro-steps x {world} processes "
              f"a step", flush=True)
    trainer = PackedSFTTrainer(train_dataset=rows, data_collator=collate_packed_rows, run=run,
                               val_stream_fn=None if val_rendered is None else val_stream, **common)
    trainer.add_callback(EvaluationSchedule(run.eval_every, run.chatcore_every))
    return trainer


def main(argv: list[str] | None = None) -> None:
    run = parse_sft_args(argv)
    # a folder that is not a run is refused; a run that fails before writing leaves no empty folder behind
    with run_folder(run.output_dir, inputs=[run.init_from, run.data_dir, run.conversations, run.val_conversations]):
        train(run)


if __name__ == "__main__":  # `accelerate launch -m nanochat_hf.training.sft`: input errors as in the CLI
    run_command("sft", main)
