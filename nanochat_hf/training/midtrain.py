"""Midtraining: the pretraining Trainer run on a packed conversation mixture (nanochat-spec.md §4.3).

    nanochat-hf midtrain --config recipes/d20/midtrain.yaml [--num_iterations 100 ...]
    accelerate launch --config_file accelerate_configs/ddp_8gpu.yaml -m nanochat_hf.training.midtrain --config ...

Everything but the data is pretraining's: :class:`~nanochat_hf.training.pretrain.PretrainTrainer` with Muon, the atomic
checkpoints (with this stream's state, so a run resumes exactly), the loss log and validation bits per byte. The
data is the stage's mixture (``nanochat_hf.tasks.build_mixture("midtrain", tier)``, or a local file of
conversations), rendered through the chat template and best-fit packed into BOS-aligned rows
(:class:`~nanochat_hf.data.conversations.ConversationStream`). Bits per byte are measured on the tasks' test splits
(``build_mixture("midtrain", tier, split="val")``: SmolTalk test, MMLU test[:5200], GSM8K test[:420] as nanochat's),
or a local ``val_conversations`` file, never on rows taken from the training mixture. With ``num_iterations: -1``
the run is one pass over the training conversations: the fewest steps whose packed batches hold every conversation
once (nanochat stops when its data cursor wraps).

nanochat's settings (ORIG mid_train.py): start from the base model, base LRs unscaled (``init_lr_frac`` 1.0), no
weight decay, no warmup, LR flat for 80% of the run then linear to 0.
"""

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from datasets import Dataset, load_dataset

from ..data.conversations import ConversationStream, render_dataset
from ..errors import Bound, check_bounds, run_command
from ..modeling_nanochat import NanoChatForCausalLM
from ..output_folder import run_folder
from ..tokenizer.bpe import load_tokenizer
from .checkpoints import load_data_state, resume_point, truncate_step_logs
from .optim import MuonAdamW, NanoChatSchedule
from .plan import plan_training
from .pretrain import (
    PRETRAIN_TRAINER,
    BitsPerByteSchedule,
    LossLog,
    NanoChatOptimizerFactory,
    PretrainArguments,
    PretrainTrainer,
    check_parallelism,
    keep_freed_memory_on_cpu,
    keep_local_gloo_on_loopback,
    parse_args,
    prepare_for_training,
    push_if_asked,
    require_model_folder,
    save_final,
    stage_optimizer_kwargs,
    training_arguments,
)


@dataclass
class ConversationDataArguments:
    """Where a chat stage's conversations come from: the fields midtraining and SFT share."""

    tier: str = field(default="d20", metadata={"help": "mixture of nanochat_hf.tasks.build_mixture for this tier"})
    data_dir: str | None = field(default=None, metadata={"help": "local copies of the mixture's Hub datasets"})
    conversations: str | None = field(default=None,
                                      metadata={"help": "a .jsonl/.parquet file of {'messages': [...]} rows to use "
                                                "instead of the tier's mixture"})
    val_conversations: str | None = field(default=None,
                                          metadata={"help": "a .jsonl/.parquet file of validation conversations (with "
                                                    "--conversations; default: the tier's test-split mixture)"})
    val_rows: int = field(default=0, metadata={"help": "use only the first N validation conversations; 0: all"})
    max_rows: int = field(default=-1, metadata={"help": "use only the first N conversations (smoke runs); -1: all"})


# Checked by each stage's __post_init__ with its own bounds.
CONVERSATION_BOUNDS = {"val_rows": Bound(low=0), "max_rows": Bound(low=1, off=-1)}


@dataclass
class MidtrainArguments(PretrainArguments, ConversationDataArguments):
    """A midtraining run: pretraining's fields (the model comes from `init_from`) plus where the conversations
    come from."""

    # pretraining's treatment of the TrainingArguments fields; nanochat's wandb project of mid_train
    trainer_fields: ClassVar = replace(PRETRAIN_TRAINER,
                                       defaults={**PRETRAIN_TRAINER.defaults, "project": "nanochat-mid"})

    output_dir: str = field(default="runs/midtrain", metadata={
        "help": "checkpoints and the final model: a new or empty folder or one of this stage's runs "
                "(anything else is refused; nothing is deleted)"})
    init_from: str | None = field(default="runs/d20/pretrain/final",
                                  metadata={"help": "base model folder (its tokenizer is used)"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder (default: init_from's)"})
    assistant_only_loss: bool = field(default=False,
                                      metadata={"help": "train only on nanochat's masked tokens (ORIG midtraining "
                                                "trains on every token)"})
    num_proc: int | None = field(default=None, metadata={"help": "processes rendering the conversations"})
    embedding_lr: float = field(default=0.2, metadata={"help": "AdamW LR of the token embedding"})
    unembedding_lr: float = field(default=0.004, metadata={"help": "AdamW LR of lm_head"})
    weight_decay: float = field(default=0.0, metadata={"help": "Muon weight decay"})
    warmup_steps: int = field(default=0, metadata={"help": "linear LR warmup steps"})
    warmdown_ratio: float = field(default=0.2, metadata={"help": "fraction of the run spent in LR warmdown"})
    final_lr_frac: float = field(default=0.0, metadata={"help": "LR multiplier at the end of the warmdown"})
    eval_every: int = field(default=150, metadata={"help": "steps between val bits-per-byte evaluations; -1 off"})
    eval_tokens: int = field(default=20 * 524288, metadata={"help": "validation tokens per evaluation"})
    total_batch_size: int = field(default=524288, metadata={"help": "tokens per optimizer step"})
    num_iterations: int = field(default=-1, metadata={"help": "optimizer steps; -1: one pass over the mixture"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bounds(self, {**CONVERSATION_BOUNDS, "num_proc": Bound(low=1)})


class MidtrainSchedule(NanoChatSchedule):
    """Pretraining's LR and weight-decay schedule with ORIG mid_train's Muon momentum (0.85 -> 0.95 over 300 steps,
    then held; pretraining's climbs to 0.97 over 400 steps and dips during the warmdown)."""

    def __init__(self, optimizer: MuonAdamW, total_steps: int, **kwargs):
        super().__init__(optimizer, total_steps, momentum_schedule="warmup", **kwargs)


class MidtrainTrainer(PretrainTrainer):
    schedule_cls = MidtrainSchedule


def parse_midtrain_args(argv: list[str] | None = None) -> MidtrainArguments:
    return parse_args(argv, MidtrainArguments, prog="nanochat-hf midtrain",
                      description="Midtrain a base model on a conversation mixture with nanochat's recipe. "
                      "--config RECIPE.yaml (or --config=RECIPE.yaml) sets the fields below; command-line flags "
                      "override it. The TrainingArguments group's defaults are nanochat's settings; a field marked "
                      "`same as --X` sets X; one marked `set by this stage` is refused.")


def load_conversations(path: str) -> Dataset:
    """A local .jsonl/.json/.parquet file of conversations (a `messages` column)."""
    suffix = Path(path).suffix
    builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(suffix)
    if builder is None or not Path(path).is_file():
        raise ValueError(f"conversations={path!r}: expected an existing .jsonl, .json or .parquet file")
    dataset = load_dataset(builder, data_files=path, split="train")
    if "messages" not in dataset.column_names:
        raise ValueError(f"{path}: no 'messages' column (columns: {dataset.column_names})")
    return dataset


def stage_mixture(stage: str, run) -> Dataset:
    """The stage's conversations: a local file when given, else the tier's mixture from nanochat_hf.tasks."""
    if run.conversations:
        dataset = load_conversations(run.conversations)
    else:
        from ..tasks import build_mixture  # imported here: the tasks pull in the datasets of every task

        dataset = build_mixture(stage, tier=run.tier, data_dir=run.data_dir, seed=run.seed)
    if run.max_rows > 0:
        dataset = dataset.select(range(min(run.max_rows, len(dataset))))
    return dataset


def validation_mixture(run, stage: str = "midtrain") -> Dataset:
    """The conversations a stage validates on: the tasks' test splits of its mixture, as nanochat's mid_train and
    chat_sft (or the run's `val_conversations` file); the first `val_rows` of them when that is set."""
    if run.val_conversations:
        dataset = load_conversations(run.val_conversations)
    elif run.conversations:
        raise ValueError("--conversations needs --val_conversations FILE for validation (or --eval_every -1): "
                         "validation never uses the training conversations")
    else:
        from ..tasks import build_mixture  # imported here: the tasks pull in the datasets of every task

        dataset = build_mixture(stage, tier=run.tier, data_dir=run.data_dir, seed=run.seed, split="val")
    if run.val_rows > 0:
        dataset = dataset.select(range(min(run.val_rows, len(dataset))))
    return dataset


def batches_per_pass(stream_fn, world_size: int) -> int:
    """Packed batches the busiest rank needs for one pass over its shard (best-fit packing pads rows, so the
    token count alone underestimates it)."""
    return max(sum(1 for _ in stream_fn(rank=r, loop=False)) for r in range(world_size))


def train(run: MidtrainArguments) -> Path:
    """Run (or resume) midtraining; returns the folder of the final model."""
    keep_local_gloo_on_loopback()
    keep_freed_memory_on_cpu()
    if not run.init_from:
        raise ValueError("midtraining starts from a base model: set --init_from to a pretrained model folder")
    require_model_folder(run.init_from, "pretrain")
    training_args = training_arguments(run)
    check_parallelism(training_args.distributed_state.distributed_type)
    world, rank = training_args.world_size, training_args.process_index
    tokenizer = load_tokenizer(run.tokenizer or run.init_from)
    model = NanoChatForCausalLM.from_pretrained(run.init_from)
    prepare_for_training(model, run, training_args.device)
    seq = model.config.max_position_embeddings

    with training_args.main_process_first(desc="rendering the mixture"):
        train_set = render_dataset(stage_mixture("midtrain", run), tokenizer, max_tokens=seq + 1,
                                   num_proc=run.num_proc, name="midtrain")
        val_set = None
        if run.eval_every > 0:
            val_set = render_dataset(validation_mixture(run), tokenizer, max_tokens=seq + 1, num_proc=run.num_proc,
                                     name="midtrain val")

    def stream(dataset: Dataset, **kwargs) -> ConversationStream:
        kwargs = {"rank": rank, **kwargs}
        return ConversationStream(dataset, seq_len=seq, batch_size=run.device_batch_size,
                                  bos_token_id=tokenizer.bos_token_id, world_size=world,
                                  assistant_only=run.assistant_only_loss, **kwargs)

    def make_plan(num_iterations: int):
        return plan_training(model.config, device_batch_size=run.device_batch_size, world_size=world,
                             total_batch_size=run.total_batch_size, num_iterations=num_iterations,
                             weight_decay=run.weight_decay)

    plan = make_plan(max(run.num_iterations, 1))
    if run.num_iterations == -1:  # one pass: the fewest steps whose micro-batches cover every conversation once
        batches = batches_per_pass(lambda **kw: stream(train_set, **kw), world)
        plan = make_plan(math.ceil(batches / plan.gradient_accumulation_steps))
    training_args.gradient_accumulation_steps = plan.gradient_accumulation_steps
    training_args.max_steps = plan.num_iterations
    training_args.save_steps = run.save_every if run.save_every > 0 else plan.num_iterations

    eval_batches = max(1, run.eval_tokens // (run.device_batch_size * seq * world))
    train_stream = stream(train_set)
    resume_from = resume_point(run.output_dir, resume=run.resume, rank=rank, world_size=world)
    if resume_from is not None:
        train_stream.load_state_dict(load_data_state(resume_from, rank))
    optimizer_kwargs = stage_optimizer_kwargs(run, plan, training_args.mixed_precision)
    trainer = MidtrainTrainer(
        model=model,
        args=training_args,
        processing_class=tokenizer,
        optimizer_cls_and_kwargs=(NanoChatOptimizerFactory, optimizer_kwargs),
        callbacks=[BitsPerByteSchedule(run.eval_every)],
        stream=train_stream,
        val_stream_fn=None if val_set is None else lambda: stream(val_set, loop=False, max_batches=eval_batches),
        plan=plan,
        run=run,
    )
    trainer.add_callback(LossLog(trainer))
    if trainer.args.should_save:
        truncate_step_logs(run.output_dir, resume_from)
    if rank == 0:
        print(f"[midtrain] {len(train_set):,} conversations ({len(val_set or []):,} for validation); plan "
              f"{json.dumps(asdict(plan))}", flush=True)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    final = save_final(trainer, tokenizer, run.output_dir)
    push_if_asked(trainer)
    return final


def main(argv: list[str] | None = None) -> None:
    run = parse_midtrain_args(argv)
    # a folder that is not a run is refused; a run that fails before writing leaves no empty folder behind
    with run_folder(run.output_dir, inputs=[run.init_from, run.tokenizer, run.data_dir]):
        train(run)


if __name__ == "__main__":  # `accelerate launch -m nanochat_hf.training.midtrain`: input errors as in the CLI
    run_command("midtrain", main)
