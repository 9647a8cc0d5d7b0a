"""Midtraining: the pretraining Trainer run on a packed conversation mixture (nanochat-spec.md §4.3).

    nanochat-hf midtrain --config recipes/d20/midtrain.yaml [--num_iterations 100 ...]
    accelerate launch --config_file accelerate_configs/ddp_8gpu.yaml -m nanochat_hf.midtrain --config ...

Everything but the data is pretraining's: :class:`~nanochat_hf.pretrain.PretrainTrainer` with Muon, the atomic
checkpoints (with this stream's state, so a run resumes exactly), the loss log and validation bits per byte. The
data is the stage's mixture (``nanochat_hf.tasks.build_mixture("midtrain", tier)``, or a local file of
conversations), rendered through the chat template and best-fit packed into BOS-aligned rows
(:class:`~nanochat_hf.data.conversations.ConversationStream`). The last ``val_rows`` conversations of the mixture
are held out for bits per byte. With ``num_iterations: -1`` the run is one pass over the training conversations.

nanochat's settings (ORIG mid_train.py): start from the base model, base LRs unscaled (``init_lr_frac`` 1.0), no
weight decay, no warmup, LR flat for 80% of the run then linear to 0.
"""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, load_dataset

from .data.conversations import ConversationStream, count_tokens, render_dataset
from .modeling_nanochat import NanoChatForCausalLM
from .pretrain import (
    DATA_STATE,
    BitsPerByteSchedule,
    LossLog,
    NanoChatOptimizerFactory,
    PretrainArguments,
    PretrainTrainer,
    check_parallelism,
    keep_freed_memory_on_cpu,
    keep_local_gloo_on_loopback,
    latest_checkpoint,
    parse_args,
    prepare_for_training,
    require_model_folder,
    save_final,
    training_arguments,
    truncate_step_logs,
)
from .tokenizer import load_tokenizer
from .training_plan import plan_training


@dataclass
class MidtrainArguments(PretrainArguments):
    """A midtraining run: pretraining's fields (the model comes from `init_from`) plus where the conversations
    come from."""

    output_dir: str = field(default="runs/midtrain", metadata={"help": "checkpoints and the final model"})
    init_from: str | None = field(default="runs/d20/pretrain/final",
                                  metadata={"help": "base model folder (its tokenizer is used)"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder (default: init_from's)"})
    tier: str = field(default="d20", metadata={"help": "mixture of nanochat_hf.tasks.build_mixture for this tier"})
    data_dir: str | None = field(default=None, metadata={"help": "local copies of the mixture's Hub datasets"})
    conversations: str | None = field(default=None,
                                      metadata={"help": "a .jsonl/.parquet file of {'messages': [...]} rows to use "
                                                "instead of the tier's mixture"})
    val_rows: int = field(default=1000, metadata={"help": "conversations held out for validation bits per byte"})
    max_rows: int = field(default=-1, metadata={"help": "use only the first N conversations (smoke runs); -1: all"})
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


def parse_midtrain_args(argv: list[str] | None = None) -> MidtrainArguments:
    return parse_args(argv, MidtrainArguments, prog="nanochat-hf midtrain",
                      description="Midtrain a base model on a conversation mixture with nanochat's recipe. "
                      "--config RECIPE.yaml sets the fields below; command-line flags override it.")


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
        from .tasks import build_mixture  # imported here: the tasks pull in the datasets of every task

        dataset = build_mixture(stage, tier=run.tier, data_dir=run.data_dir, seed=run.seed)
    if run.max_rows > 0:
        dataset = dataset.select(range(min(run.max_rows, len(dataset))))
    return dataset


def split_validation(dataset: Dataset, val_rows: int, world_size: int) -> tuple[Dataset, Dataset]:
    if len(dataset) < val_rows + world_size:
        raise ValueError(f"the mixture has {len(dataset)} conversations: too few to hold out val_rows={val_rows} and "
                         f"still give each of {world_size} processes one; lower --val_rows")
    cut = len(dataset) - val_rows
    return dataset.select(range(cut)), dataset.select(range(cut, len(dataset)))


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
        train_set, val_set = split_validation(stage_mixture("midtrain", run), run.val_rows, world)
        train_set = render_dataset(train_set, tokenizer, max_tokens=seq + 1, num_proc=run.num_proc, name="midtrain")
        val_set = render_dataset(val_set, tokenizer, max_tokens=seq + 1, num_proc=run.num_proc, name="midtrain val")

    num_iterations = run.num_iterations
    if num_iterations == -1:
        total = run.total_batch_size if run.total_batch_size > 0 else run.device_batch_size * seq * world
        num_iterations = max(1, math.ceil(count_tokens(train_set) / total))
    plan = plan_training(model.config, device_batch_size=run.device_batch_size, world_size=world,
                         total_batch_size=run.total_batch_size, num_iterations=num_iterations,
                         weight_decay=run.weight_decay)
    training_args.gradient_accumulation_steps = plan.gradient_accumulation_steps
    training_args.max_steps = plan.num_iterations
    training_args.save_steps = run.save_every if run.save_every > 0 else plan.num_iterations

    def stream(dataset: Dataset, **kwargs) -> ConversationStream:
        return ConversationStream(dataset, seq_len=seq, batch_size=run.device_batch_size,
                                  bos_token_id=tokenizer.bos_token_id, rank=rank, world_size=world,
                                  assistant_only=run.assistant_only_loss, **kwargs)

    eval_batches = max(1, run.eval_tokens // (run.device_batch_size * seq * world))
    train_stream = stream(train_set)
    resume_from = latest_checkpoint(run.output_dir) if run.resume else None
    if resume_from is not None:
        train_stream.load_state_dict(torch.load(resume_from / DATA_STATE.format(rank=rank), weights_only=False))
    optimizer_kwargs = dict(embedding_lr=run.embedding_lr, unembedding_lr=run.unembedding_lr,
                            matrix_lr=run.matrix_lr, scalar_lr=run.scalar_lr, weight_decay=plan.weight_decay,
                            batch_lr_scale=plan.batch_lr_scale)
    trainer = PretrainTrainer(
        model=model,
        args=training_args,
        processing_class=tokenizer,
        optimizer_cls_and_kwargs=(NanoChatOptimizerFactory, optimizer_kwargs),
        callbacks=[BitsPerByteSchedule(run.eval_every)],
        stream=train_stream,
        val_stream_fn=lambda: stream(val_set, loop=False, max_batches=eval_batches),
        plan=plan,
        run=run,
    )
    trainer.add_callback(LossLog(trainer))
    if resume_from is not None and trainer.args.should_save:
        truncate_step_logs(run.output_dir, resume_from)
    if rank == 0:
        print(f"[midtrain] {len(train_set):,} conversations ({len(val_set):,} held out); plan "
              f"{json.dumps(asdict(plan))}", flush=True)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return save_final(trainer, tokenizer, run.output_dir)


def main(argv: list[str] | None = None) -> None:
    train(parse_midtrain_args(argv))


if __name__ == "__main__":
    main()
