"""Pretraining (and midtraining) on the transformers Trainer with nanochat's recipe.

    nanochat-hf pretrain --config recipes/d20/pretrain.yaml [--depth 12 --device_batch_size 16 --run_name x ...]
    accelerate launch --config_file accelerate_configs/ddp_8gpu.yaml -m nanochat_hf.training.pretrain --config ...

The Trainer adds nothing nanochat does not do: no gradient clipping (nor the grad-norm it would compute), no
weight-decay groups of its own, no data skipping on resume (the stream restores its own state). Every other field of
TrainingArguments can be set in the recipe or on the command line (see nanochat_hf.training.arguments).
"""

import ctypes
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from accelerate.utils import DistributedType
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..data.pretrain import PretrainStream
from ..errors import Bound, UsageError, check_bounds, check_choice, check_source, run_command
from ..evaluation.bpb import evaluate_bpb
from ..modeling_nanochat import NanoChatForCausalLM
from ..output_folder import run_folder
from ..tokenizer.bpe import load_tokenizer, token_bytes
from .arguments import (
    OPTIMIZER_FIELDS,
    TrainerFields,
    hand_project_to_wandb,
    parse_stage_args,
    trainer_config,
)
from .checkpoints import (
    STAGING,
    load_data_state,
    resume_point,
    rotate_checkpoints,
    save_data_state,
    save_optimizer_state,
    truncate_step_logs,
    write_run_record,
)
from .fp8 import FP8_RECIPES, check_fp8_support, convert_to_fp8, fp8_disabled
from .hub_push import HubPushMixin
from .init_model import build_model, publish_folder, save_atomically
from .optim import (
    FSDP_ERROR,
    PRETRAIN_SCHEDULES,
    MuonAdamW,
    NanoChatSchedule,
    nanochat_optimizer,
    orthogonalization_dtype,
)
from .plan import PRETRAIN_DEFAULTS, TrainingPlan, check_batch_divides, gpu_peak_flops, plan_training

# How pretraining (and midtraining) treat the fields of TrainingArguments (nanochat_hf.training.arguments)
PRETRAIN_TRAINER = TrainerFields(
    config_cls=TrainingArguments,
    aliases={"max_steps": "num_iterations", "per_device_train_batch_size": "device_batch_size",
             "learning_rate": "matrix_lr", "logging_steps": "log_every", "save_steps": "save_every",
             "save_total_limit": "keep_last", "eval_steps": "eval_every", "dataloader_num_workers": "num_workers"},
    defaults={"max_grad_norm": 0.0, "activation_checkpointing": False, "disable_tqdm": False, "project": "nanochat",
              # the model's only buffers are its RoPE tables, the same on every rank: nothing to broadcast each step
              "ddp_broadcast_buffers": False},
    owned={
        "gradient_accumulation_steps": "total_batch_size / (device_batch_size x max_seq_len x processes); set "
                                       "--total_batch_size",
        "num_train_epochs": "the data is a stream; the run's length is --num_iterations (or, derived, "
                            "--target_param_data_ratio)",
        "eval_strategy": "val bits per byte every --eval_every steps",
        "per_device_eval_batch_size": "the evaluation's batch is --device_batch_size",
        "save_strategy": "a checkpoint every --save_every steps and one at the end",
        "ignore_data_skip": "the stream restores its own position on resume",
        "resume_from_checkpoint": "--resume true continues from the latest checkpoint in --output_dir",
        "remove_unused_columns": "the stream's batches are the model's inputs",
        **OPTIMIZER_FIELDS,
    },
)


def _generation_default(name: str, help: str):
    """A field left unset (None) that takes base_train's default for the run's generation (PRETRAIN_DEFAULTS);
    its help names both."""
    orig, head = PRETRAIN_DEFAULTS["2025"][name], PRETRAIN_DEFAULTS["2026"][name]
    return field(default=None, metadata={
        "help": f"{help}; unset: {orig} for generation 2025 (nanochat ORIG's), {head} for 2026 (HEAD's)"})


@dataclass
class PretrainArguments:
    """A pretraining run. Every field can be set in the recipe YAML and overridden on the command line. The recipe's
    fields left unset take the base_train defaults of the model's generation: nanochat ORIG's for 2025, HEAD's for
    2026 (training_plan.PRETRAIN_DEFAULTS). `trainer_args` holds the other TrainingArguments fields given."""

    trainer_fields: ClassVar[TrainerFields] = PRETRAIN_TRAINER

    output_dir: str = field(default="runs/pretrain", metadata={
        "help": "checkpoints and the final model: a new or empty folder or one of this stage's runs "
                "(anything else is refused; nothing is deleted)"})
    tokenizer: str = field(default="runs/cpu/tokenizer", metadata={"help": "tokenizer folder or Hub repo id"})
    dataset: str = field(default="karpathy/climbmix-400b-shuffle",
                         metadata={"help": "Hub dataset id or local folder/file of parquet, jsonl or txt"})
    text_column: str = field(default="text", metadata={"help": "column holding the documents"})
    init_from: str | None = field(default=None, metadata={"help": "start from this model folder (midtraining)"})
    depth: int = field(default=20, metadata={"help": "number of layers: the one dial that sizes the model"})
    generation: str = field(default="2026", metadata={"help": "architecture generation, 2025 or 2026"})
    head_dim: int | None = field(default=None, metadata={"help": "head dimension (default 128)"})
    max_seq_len: int = field(default=2048, metadata={"help": "context length T"})
    window_pattern: str | None = field(default=None, metadata={"help": "S/L window pattern (2026 default SSSL)"})
    device_batch_size: int = field(default=32, metadata={"help": "sequences per GPU per micro-step"})
    total_batch_size: int | None = _generation_default("total_batch_size", "tokens per optimizer step; -1 derives it")
    target_param_data_ratio: float | None = _generation_default(
        "target_param_data_ratio", "tokens : params ratio (2025: every parameter; 2026: scaling parameters)")
    num_iterations: int = field(default=-1, metadata={"help": "optimizer steps; -1 derives them from the ratio"})
    embedding_lr: float | None = _generation_default("embedding_lr", "AdamW LR of the token embedding")
    unembedding_lr: float | None = _generation_default("unembedding_lr", "AdamW LR of lm_head")
    matrix_lr: float = field(default=0.02, metadata={"help": "Muon LR of the block matrices"})
    scalar_lr: float = field(default=0.5, metadata={"help": "AdamW LR of the resid/x0 lambdas (2026 only)"})
    weight_decay: float | None = _generation_default(
        "weight_decay", "Muon weight decay at the d12 reference (2025: must be 0, ORIG's Muon has none)")
    warmup_steps: int | None = _generation_default("warmup_steps", "linear LR warmup steps")
    warmdown_ratio: float | None = _generation_default("warmdown_ratio", "fraction of the run spent in LR warmdown")
    final_lr_frac: float | None = _generation_default("final_lr_frac", "LR multiplier at the end of the warmdown")
    eval_every: int = field(default=250, metadata={"help": "steps between val bits-per-byte evaluations; -1 off"})
    eval_tokens: int = field(default=80 * 524288, metadata={"help": "validation tokens per evaluation"})
    save_every: int = field(default=-1, metadata={"help": "steps between checkpoints; -1: only at the end"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints kept on disk"})
    log_every: int = field(default=1, metadata={"help": "steps between log lines"})
    num_workers: int = field(default=2, metadata={"help": "DataLoader workers that tokenize"})
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint in output_dir"})
    seed: int = field(default=42, metadata={"help": "random seed (the model's initialisation and the Trainer's)"})
    report_to: str = field(default="none", metadata={
        "help": "where the Trainer logs: none, all, or one integration (tensorboard, trackio, wandb); --project "
                "and --run_name name the run there"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (the accelerate config may also set it)"})
    torch_compile: bool = field(default=False, metadata={
        "help": "compile the model in place (torch.compile, dynamic=False, as nanochat; the Trainer does not "
                "compile it again)"})
    fp8: bool = field(default=False, metadata={"help": "FP8 training of the block's Linear layers through torchao "
                                               "(CUDA GPUs of compute capability >= 8.9; needs --bf16 true)"})
    fp8_recipe: str = field(default="tensorwise", metadata={"help": "torchao float8 recipe: tensorwise or rowwise"})
    trainer_args: dict = field(default_factory=dict, metadata={
        "help": "the other TrainingArguments fields given in the recipe or on the command line"})

    def __post_init__(self) -> None:
        check_choice(self, "generation", ("2025", "2026"))
        for name, value in PRETRAIN_DEFAULTS[self.generation].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        # Refused when parsed, before anything loads; -1 means "derive it" (nanochat's base_train) or "off".
        check_bounds(self, {
            "depth": Bound(low=1), "head_dim": Bound(low=1), "max_seq_len": Bound(low=1),
            "device_batch_size": Bound(low=1), "total_batch_size": Bound(low=1, off=-1),
            "num_iterations": Bound(low=1, off=-1),
            "embedding_lr": Bound(low=0), "unembedding_lr": Bound(low=0), "matrix_lr": Bound(low=0),
            "scalar_lr": Bound(low=0), "weight_decay": Bound(low=0), "warmup_steps": Bound(low=0),
            "warmdown_ratio": Bound(low=0, high=1), "final_lr_frac": Bound(low=0, high=1),
            "eval_every": Bound(low=1, off=-1), "eval_tokens": Bound(low=1), "save_every": Bound(low=1, off=-1),
            "keep_last": Bound(low=1), "log_every": Bound(low=1), "num_workers": Bound(low=0), "seed": Bound(low=0),
        })
        if self.num_iterations == -1:  # the number of steps comes from the ratio
            check_bounds(self, {"target_param_data_ratio": Bound(above=0)})
        check_choice(self, "fp8_recipe", FP8_RECIPES)
        if self.generation == "2025" and self.init_from is None and self.weight_decay != 0:
            raise UsageError(f"--weight_decay {self.weight_decay}: generation 2025 trains with nanochat ORIG's Muon, "
                             "which has no weight decay; leave it unset or pass 0")
        if self.total_batch_size != -1 and self.init_from is None:
            # a fresh model's context is max_seq_len: a step that whole micro-steps cannot fill fails here, not
            # after the model is built; the launcher's WORLD_SIZE counts the processes
            check_batch_divides(self.total_batch_size, self.device_batch_size, self.max_seq_len,
                                int(os.environ.get("WORLD_SIZE", 1)))


def prepare_for_training(model: NanoChatForCausalLM, run: PretrainArguments, device: torch.device) -> None:
    """FP8 conversion, then compilation, in nanochat's order. Both act in place, so the Trainer, DDP, the optimizer
    and `save_pretrained` see the same module with the same parameter names. Refuses --fp8 where it can't run."""
    if run.fp8:
        check_fp8_support(device)
        if run.fp8_recipe not in FP8_RECIPES:
            raise ValueError(f"--fp8_recipe {run.fp8_recipe!r}: use one of {', '.join(FP8_RECIPES)}")
        if not run.bf16:
            raise ValueError("--fp8 trains under bf16 autocast, as nanochat does: add --bf16 true")
        convert_to_fp8(model, run.fp8_recipe)
    if run.torch_compile:
        # the module compiles itself (not a wrapper), so checkpoints keep their names and DDP wraps it as usual
        model.compile(dynamic=False)


class NanoChatOptimizerFactory:
    """`Trainer(optimizer_cls_and_kwargs=(NanoChatOptimizerFactory, kwargs))`: the Trainer calls it with the model.
    `ortho_dtype` is Muon's (`orthogonalization_dtype` of the run's mixed precision); the rest goes to the groups.
    The optimizer is that of the model's generation (`nanochat_optimizer`): ORIG's for 2025, HEAD's for 2026, in
    every stage that builds it here."""

    def __call__(self, model: NanoChatForCausalLM, ortho_dtype: torch.dtype | None = None, **kwargs) -> MuonAdamW:
        return nanochat_optimizer(model, ortho_dtype=ortho_dtype, **kwargs)


def stage_optimizer_kwargs(run: PretrainArguments, plan: TrainingPlan, mixed_precision: str) -> dict:
    """The optimizer factory's settings for pretraining and midtraining: the run's LRs, the plan's weight decay and
    batch LR scale, and Muon's orthogonalisation in the run's compute dtype."""
    return dict(embedding_lr=run.embedding_lr, unembedding_lr=run.unembedding_lr, matrix_lr=run.matrix_lr,
                scalar_lr=run.scalar_lr, weight_decay=plan.weight_decay, batch_lr_scale=plan.batch_lr_scale,
                ortho_dtype=orthogonalization_dtype(mixed_precision))


class PretrainTrainer(HubPushMixin, Trainer):
    def __init__(self, *args, stream: PretrainStream, val_stream_fn, plan: TrainingPlan, run: PretrainArguments,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.stream = stream
        self.val_stream_fn = val_stream_fn
        self.plan = plan
        self.run = run
        self.token_bytes = None
        self.throughput = Throughput(plan.total_batch_size, self.model.estimate_flops_per_token(), self.args.world_size)

    # --- optimization: nanochat's own -------------------------------------------------------------------------
    # None: base_train's Muon schedules for the model's generation (PRETRAIN_SCHEDULES); midtraining names its own
    schedule_cls: type[NanoChatSchedule] | None = None

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            optimizer = optimizer or self.optimizer
            lr = dict(total_steps=num_training_steps, warmup_steps=self.run.warmup_steps,
                      warmdown_ratio=self.run.warmdown_ratio, final_lr_frac=self.run.final_lr_frac)
            if self.schedule_cls is None:
                muon = PRETRAIN_SCHEDULES[self.model.config.generation]
                self.lr_scheduler = NanoChatSchedule(optimizer, **lr, **muon)
            else:
                self.lr_scheduler = self.schedule_cls(optimizer, **lr)
        return self.lr_scheduler

    def _get_grad_norm(self, model, grad_norm=None):
        # nanochat neither clips nor measures the gradient norm (it costs ~2% MFU); only report one if clipping.
        return grad_norm if self.args.max_grad_norm > 0 else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"], labels=inputs["labels"], shift_labels=inputs["shift_labels"],
                        num_items_in_batch=num_items_in_batch)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs = {**logs, **self.throughput.measure(self.state.global_step)}
        super().log(logs, start_time)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.throughput.last is None:  # start the clock at the first step (resumed runs included)
            self.throughput.last = (self.state.global_step, time.perf_counter())
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_loss = getattr(self, "_step_loss", 0.0) + loss.item()
        return loss

    # --- data: our stream, already sharded per rank, restored from its own state -------------------------------
    def get_train_dataloader(self):
        # The stream's labels are already aligned with input_ids (row[1:]). Under the name `shift_labels` the
        # loss uses them as they are, and the Trainer counts the tokens of a step without dropping one per row.
        return ({**batch, "shift_labels": batch["labels"]} for batch in self.stream)

    # --- evaluation: validation bits per byte ------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        if self.token_bytes is None:
            self.token_bytes = token_bytes(self.processing_class).to(self.args.device)
        self.model.eval()
        with fp8_disabled(self.model):  # nanochat evaluates in bf16
            bpb = evaluate_bpb(self.model, self.val_stream_fn(), self.token_bytes)
        self.model.train()
        metrics = {f"{metric_key_prefix}_bpb": bpb}
        if self.args.should_save:  # the report's bpb curve, beside losses.jsonl
            with open(Path(self.args.output_dir) / "bpb.jsonl", "a") as f:
                f.write(json.dumps({"step": self.state.global_step, "bpb": bpb}) + "\n")
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # --- checkpoints: atomic, with the data state (nanochat_hf.training.checkpoints) -----------------------------------
    def _get_output_dir(self, trial):
        return getattr(self, "_staging_dir", None) or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        name = f"checkpoint-{self.state.global_step}"
        final = Path(self.args.output_dir) / name
        staging = Path(self.args.output_dir) / STAGING  # emptied at start-up by resume_point
        self._staging_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        save_data_state(self.stream.state_dict(), staging / name, self.args.process_index)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if final.exists():  # a checkpoint of an attempt that went further, skipped by resume as incomplete
                shutil.rmtree(final)
            os.replace(staging / name, final)
            staging.rmdir()
            rotate_checkpoints(self.args.output_dir, self.args.save_total_limit, self.state.global_step)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            super()._push_from_checkpoint(str(final))

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # the Trainer asks while the checkpoint is still being written; _save_checkpoint pushes it once complete
        # (with the stream's state, which a checkpoint pushed for resuming needs)
        if getattr(self, "_staging_dir", None) is None:
            super()._push_from_checkpoint(checkpoint_folder)


class BitsPerByteSchedule(TrainerCallback):
    """Evaluates val bits-per-byte every `every` steps and at the end, as nanochat does."""

    def __init__(self, every: int):
        self.every = every

    def on_step_end(self, args, state, control, **kwargs):
        if self.every > 0 and (state.global_step % self.every == 0 or state.global_step == state.max_steps):
            control.should_evaluate = True


class LossLog(TrainerCallback):
    """Appends every optimizer step's exact training loss to `<output_dir>/losses.jsonl` (the Trainer's own log
    rounds to 4 digits): the curve the report plots, and what a resumed run is compared with."""

    def __init__(self, trainer: "PretrainTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        loss = getattr(self.trainer, "_step_loss", None)
        self.trainer._step_loss = 0.0
        if loss is not None and args.should_save:
            with open(Path(args.output_dir) / "losses.jsonl", "a") as f:
                f.write(json.dumps({"step": state.global_step, "loss": loss}) + "\n")


class Throughput:
    """tokens/s and MFU (nanochat's FLOPs per token over the GPU's peak) between two log lines."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, world_size: int):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak = None
        if torch.cuda.is_available():  # a GPU nanochat's table doesn't list reports no MFU
            self.peak = gpu_peak_flops(torch.cuda.get_device_name())
        self.last: tuple[int, float] | None = None

    def measure(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        last, self.last = self.last, (step, now)
        if last is None or step <= last[0]:
            return {}
        tokens_per_s = (step - last[0]) * self.tokens_per_step / (now - last[1])
        metrics = {"tokens_per_s": round(tokens_per_s, 1)}
        if self.peak is not None:
            metrics["mfu"] = round(100 * tokens_per_s * self.flops_per_token / (self.peak * self.world_size), 2)
        return metrics


def parse_args(argv: list[str] | None = None, arguments_cls: type = PretrainArguments,
               prog: str = "nanochat-hf pretrain",
               description: str = "Pretrain with nanochat's recipe. --config RECIPE.yaml (or --config=RECIPE.yaml) "
               "sets the fields below; command-line flags override it. The TrainingArguments group's defaults are "
               "nanochat's settings; a field marked `same as --X` sets X; one marked `set by this stage` is refused."):
    """`--config recipe.yaml` first, then any `--field value` override from the command line (the rules:
    nanochat_hf.training.arguments). Other stages parse their own recipe dataclass (`arguments_cls`, whose
    `trainer_fields` says how it treats its Trainer config's fields) the same way."""
    return parse_stage_args(argv, arguments_cls, arguments_cls.trainer_fields, prog=prog, description=description)


def require_model_folder(init_from: str, previous_stage: str) -> None:
    """A stage that starts from a model refuses, before any work, a folder `save_pretrained` did not write."""
    if not Path(init_from).exists():
        raise UsageError(f"--init_from: no such folder: {init_from}; run `nanochat-hf {previous_stage}` first or "
                         "point at its final/ folder")
    if not Path(init_from, "config.json").is_file():
        raise ValueError(f"--init_from {init_from}: not a save_pretrained model folder (no config.json); "
                         f"run `nanochat-hf {previous_stage}` first or point at its final/ folder")


def save_final(trainer: Trainer, tokenizer, output_dir: str) -> Path:
    """Write the trained model + tokenizer to `<output_dir>/final` atomically (main process); every rank waits."""
    final = Path(output_dir) / "final"
    if trainer.args.should_save:
        save_atomically(trainer.accelerator.unwrap_model(trainer.model), tokenizer, final)
    trainer.accelerator.wait_for_everyone()
    return final


def build_pretrain_model(run: PretrainArguments, tokenizer) -> NanoChatForCausalLM:
    """The model a run starts from; a fresh one is initialised from `run.seed` alone."""
    if run.init_from:
        check_source(run.init_from, "--init_from")
        return NanoChatForCausalLM.from_pretrained(run.init_from)
    overrides = {"max_position_embeddings": run.max_seq_len}
    if run.head_dim is not None:
        overrides["head_dim"] = run.head_dim
    if run.window_pattern is not None:
        overrides["window_pattern"] = run.window_pattern
    torch.manual_seed(run.seed)
    return build_model(tokenizer, run.depth, run.generation, **overrides)


def check_parallelism(distributed_type: DistributedType) -> None:
    """Refuse, at start-up, a launch configuration Muon cannot train under."""
    # `accelerate launch` with an FSDP config announces itself through ACCELERATE_USE_FSDP
    if distributed_type == DistributedType.FSDP or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise ValueError(FSDP_ERROR)


def keep_local_gloo_on_loopback() -> None:
    """Make a one-machine CPU process group talk over the loopback interface.

    gloo picks its interface from the hostname, and on machines where the hostname resolves to an address whose
    traffic to itself goes nowhere (sandboxes, some containers) the ranks wait for each other forever. When the
    rendezvous itself is local, loopback is always right; a multi-node launch names another MASTER_ADDR and is
    left alone, as is an explicit GLOO_SOCKET_IFNAME.
    """
    if torch.cuda.is_available() or "GLOO_SOCKET_IFNAME" in os.environ:
        return
    if os.environ.get("MASTER_ADDR", "127.0.0.1") in ("127.0.0.1", "localhost", "::1"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"


def keep_freed_memory_on_cpu() -> None:
    """On CPU, let glibc keep freed memory in the process instead of handing it back to the kernel.

    A training step frees and reallocates the same large tensors every step (the (B, T, vocab) logits and their
    gradient are 67 MB at the CPU tier). glibc serves blocks that large with mmap and unmaps them on free, so every
    step faults all of those pages in again: 15-20% of a compiled CPU step (benchmarks/vs_nanochat.py). Raising the
    mmap and trim thresholds keeps the pages mapped for reuse; the steps allocate the same shapes, so the heap stops
    growing after the first one. A GPU run's tensors live in CUDA's caching allocator and are left alone; so is any
    libc other than glibc.
    """
    if torch.cuda.is_available() or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # malloc.h; the values are C ints
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(m_mmap_threshold, 1 << 30)  # blocks up to 1 GiB come from the heap, not from mmap
    mallopt(m_trim_threshold, 2**31 - 1)  # never shrink the heap
    mallopt(m_top_pad, 1 << 28)  # grow it 256 MiB at a time


def training_arguments(run: PretrainArguments) -> TrainingArguments:
    """The Trainer settings of a pretraining-style run (midtraining shares them): nanochat's, then the fields the
    run gives (`run.trainer_args`); `max_steps`, `save_steps` and gradient accumulation are set once the plan is
    known."""
    args = trainer_config(run, defaults={
        # Without CUDA, processes launched together (accelerate's cpu_2proc config) form a gloo DDP group.
        "use_cpu": not torch.cuda.is_available(),
    }, stage_values={
        "output_dir": run.output_dir,
        "per_device_train_batch_size": run.device_batch_size,
        "weight_decay": 0.0,  # Muon's (run.weight_decay) is our optimizer's; the Trainer's groups are unused
        "logging_steps": run.log_every,
        "eval_strategy": "no",  # our evaluation is val bits-per-byte on a stream, scheduled by BitsPerByteSchedule
        "save_strategy": "steps",
        "save_total_limit": run.keep_last,
        "ignore_data_skip": True,
        "report_to": run.report_to,
        "seed": run.seed,
        "bf16": run.bf16,
        "remove_unused_columns": False,
        "save_steps": 1,  # replaced below once the plan is known
        "max_steps": 1,
    })
    hand_project_to_wandb(run, args)
    return args


def train(run: PretrainArguments) -> Path:
    """Run (or resume) pretraining; returns the folder of the final model."""
    keep_local_gloo_on_loopback()
    keep_freed_memory_on_cpu()
    training_args = training_arguments(run)
    check_parallelism(training_args.distributed_state.distributed_type)
    world, rank = training_args.world_size, training_args.process_index
    tokenizer = load_tokenizer(run.tokenizer)
    model = build_pretrain_model(run, tokenizer)
    if model.config.generation != run.generation:  # the defaults resolved from --generation must be the model's
        raise UsageError(f"--init_from {run.init_from} is a generation-{model.config.generation} model: add "
                         f"--generation {model.config.generation}, whose nanochat recipe it trains with")
    prepare_for_training(model, run, training_args.device)
    plan = plan_training(
        model.config, device_batch_size=run.device_batch_size, world_size=world,
        target_param_data_ratio=run.target_param_data_ratio, total_batch_size=run.total_batch_size,
        num_iterations=run.num_iterations, weight_decay=run.weight_decay,
    )
    training_args.gradient_accumulation_steps = plan.gradient_accumulation_steps
    training_args.max_steps = plan.num_iterations
    training_args.save_steps = run.save_every if run.save_every > 0 else plan.num_iterations
    seq = model.config.max_position_embeddings
    stream = PretrainStream(run.dataset, tokenizer, seq_len=seq, batch_size=run.device_batch_size, split="train",
                            rank=rank, world_size=world, num_workers=run.num_workers, text_column=run.text_column)
    eval_batches = max(1, run.eval_tokens // (run.device_batch_size * seq * world))

    def val_stream():
        # a fresh stream per evaluation, so every evaluation sees the same tokens
        return PretrainStream(run.dataset, tokenizer, seq_len=seq, batch_size=run.device_batch_size, split="val",
                              rank=rank, world_size=world, num_workers=0, text_column=run.text_column,
                              max_batches=eval_batches)

    resume_from = resume_point(run.output_dir, resume=run.resume, rank=rank, world_size=world)
    if resume_from is not None:
        stream.load_state_dict(load_data_state(resume_from, rank))
    optimizer_kwargs = stage_optimizer_kwargs(run, plan, training_args.mixed_precision)
    trainer = PretrainTrainer(
        model=model,
        args=training_args,
        processing_class=tokenizer,
        optimizer_cls_and_kwargs=(NanoChatOptimizerFactory, optimizer_kwargs),
        callbacks=[
            BitsPerByteSchedule(run.eval_every),
        ],
        stream=stream,
        val_stream_fn=val_stream,
        plan=plan,
        run=run,
    )
    trainer.add_callback(LossLog(trainer))
    if trainer.args.should_save:
        truncate_step_logs(run.output_dir, resume_from)
    if rank == 0:
        print(f"[pretrain] {model.num_parameters():,} parameters; plan {json.dumps(asdict(plan))}", flush=True)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    final = Path(run.output_dir) / "final"
    if trainer.args.should_save:
        staged = final.with_name("final.tmp")
        trainer.save_model(str(staged), _internal_call=True)  # the Hub push, if asked for, comes after publishing
        tokenizer.model_max_length = model.config.max_position_embeddings  # not transformers' ~1e30
        tokenizer.save_pretrained(staged)
        # what HEAD's SFT reads from the base model's folder: the optimizer to warm-start, the settings to inherit
        save_optimizer_state(trainer.optimizer, staged)
        write_run_record(staged, "pretrain", recorded_arguments(run), asdict(plan))
        publish_folder(staged, final)
    trainer.accelerator.wait_for_everyone()
    push_if_asked(trainer)
    return final


def recorded_arguments(run: PretrainArguments) -> dict:
    """The run's arguments for its record, without secrets (a --hub_token given on the command line)."""
    arguments = asdict(run)
    arguments["trainer_args"] = {k: v for k, v in run.trainer_args.items() if not k.endswith("_token")}
    return arguments


def push_if_asked(trainer: Trainer) -> None:
    """`--push_to_hub`: the Trainer's push at the end of a stage (HubPushMixin stages our repo folder)."""
    if trainer.args.push_to_hub:
        trainer.push_to_hub()


def main(argv: list[str] | None = None) -> None:
    run = parse_args(argv)
    # a folder that is not a run is refused; a run that fails before writing leaves no empty folder behind
    with run_folder(run.output_dir, inputs=[run.tokenizer, run.dataset, run.init_from]):
        train(run)


if __name__ == "__main__":  # `accelerate launch -m nanochat_hf.training.pretrain`: input errors as in the CLI
    run_command("pretrain", main)

