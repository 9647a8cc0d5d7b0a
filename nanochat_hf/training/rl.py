"""Reinforcement learning on GSM8K through TRL's GRPOTrainer with nanochat's settings (nanochat-spec.md §4.5).

    nanochat-hf rl --config recipes/d20/rl.yaml [--num_iterations 20 ...]
    accelerate launch --config_file accelerate_configs/ddp_8gpu.yaml -m nanochat_hf.training.rl --config ...

nanochat's chat_rl.py is a simplified GRPO, and TRL expresses each of its choices:

==========================================  =========================================================
nanochat                                    GRPOConfig
==========================================  =========================================================
16 samples per question                     ``num_generations=num_samples``
16 questions per step                       completions per step = examples x samples, reached by
                                            gradient accumulation over ``device_batch_size`` rows
temperature 1.0, top-k 50, 256 new tokens   ``temperature``, ``top_k``, ``max_completion_length``
no KL / reference model                     ``beta=0.0``
on-policy, one pass per batch (no ratio)    ``num_iterations=1`` (the PPO ratio is exactly 1)
advantage r - mean(r), no std division      ``scale_rewards="none"``
-sum(logp*adv) / (valid tokens of a pass    ``loss_type="bnpo"`` (a micro-batch's valid tokens, / the
x passes x examples per rank)               accumulation steps), micro-batches in sampler order
stop token <|assistant_end|> not trained    :func:`exclude_stop_token` (TRL's completion_mask keeps it)
reward: exact ``#### <number>`` match       :func:`gsm8k_accuracy` (``nanochat_hf.tasks.gsm8k``)
LRs x 0.05, linear to 0, no weight decay    our Muon + AdamW factory, :class:`NanoChatTRLMixin`
==========================================  =========================================================

Prompts are the question rendered for completion (the conversation without its final assistant answer, then
``<|assistant_start|>``), as nanochat's ``render_for_completion``. Rollouts call the calculator as nanochat's engine
does, through TRL's own tool loop (``tools=[python]``; ``use_tools: false`` turns it off): generation stops at
``<|python_end|>``, the block is parsed into a ``tool_calls`` entry, the result is appended as
``<|output_start|>result<|output_end|>`` and sampling continues in the same turn; those appended tokens are out of the
loss (TRL's ``tool_mask``). See :data:`TOOLS_NOTE` and :mod:`nanochat_hf.training.trl_support`.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import split_tensor_dict

from ..errors import Bound, check_bounds, run_command
from ..modeling_nanochat import NanoChatForCausalLM
from ..output_folder import run_folder
from ..tokenizer.bpe import load_tokenizer
from .arguments import OPTIMIZER_FIELDS, TrainerFields, hand_project_to_wandb, trainer_config
from .optim import orthogonalization_dtype
from .pretrain import (
    LossLog,
    check_parallelism,
    keep_local_gloo_on_loopback,
    parse_args,
    push_if_asked,
    require_model_folder,
    save_final,
)
from .trl_support import (
    FinetuneOptimizerFactory,
    NanoChatTRLMixin,
    enable_tool_rollouts,
    finetune_optimizer_kwargs,
    python,
    score_real_vocab_only,
)

TOOLS_NOTE = (
    "Rollouts call nanochat's calculator through TRL's tool loop: <|python_end|> is a stop token of the generation "
    "config, NANOCHAT_RESPONSE_TEMPLATE (nanochat_hf.training.trl_support) makes tokenizer.parse_response turn "
    "<|python_start|>expr<|python_end|> into a tool call of `python`, TRL appends the chat template's "
    "<|output_start|>result<|output_end|> and generates on; TRL's tool_mask keeps those tokens out of the loss. "
    "Differences from nanochat's engine: a refused expression gets an empty output block (nanochat inserts none), "
    "and each tool call costs a new generate() call over the prompt and completion so far."
)


_BATCH = ("examples_per_step x num_samples completions a step, device_batch_size a pass: set --examples_per_step, "
          "--num_samples and --device_batch_size")
# How RL treats the fields of GRPOConfig (nanochat_hf.training.arguments). GRPO's own `num_iterations` (policy
# updates per generation) is 1, nanochat's on-policy RL; the name is RLArguments' step count, as in every stage.
RL_TRAINER = TrainerFields(
    config_cls=GRPOConfig,
    aliases={"max_steps": "num_iterations", "num_train_epochs": "num_epochs",
             "per_device_train_batch_size": "device_batch_size", "num_generations": "num_samples",
             "max_completion_length": "max_new_tokens", "learning_rate": "matrix_lr", "logging_steps": "log_every",
             "save_steps": "save_every", "save_total_limit": "keep_last"},
    defaults={"beta": 0.0, "scale_rewards": "none", "loss_type": "bnpo",
              "mask_truncated_completions": False,  # nanochat trains on samples cut at max_new_tokens too
              "max_grad_norm": 0.0, "activation_checkpointing": False, "disable_tqdm": False,
              "project": "nanochat-rl"},
    owned={
        **dict.fromkeys(("gradient_accumulation_steps", "steps_per_generation", "generation_batch_size"), _BATCH),
        "save_strategy": "a checkpoint every --save_every steps",
        "warmup_steps": "nanochat's RL has no warmup; its LR falls linearly to 0",
        **OPTIMIZER_FIELDS,
    },
)


@dataclass
class RLArguments:
    """An RL run. Every field can be set in the recipe YAML and overridden on the command line; `trainer_args`
    holds the other GRPOConfig fields given."""

    trainer_fields: ClassVar[TrainerFields] = RL_TRAINER

    output_dir: str = field(default="runs/rl", metadata={
        "help": "checkpoints and the final model: a new or empty folder or one of this stage's runs "
                "(anything else is refused; nothing is deleted)"})
    init_from: str = field(default="runs/d20/sft/final", metadata={"help": "model folder to train"})
    task: str = field(default="gsm8k", metadata={"help": "nanochat_hf.tasks task with `messages` + `answer` rows"})
    data_dir: str | None = field(default=None, metadata={"help": "local copy of the task's dataset (default: Hub)"})
    examples_per_step: int = field(default=16, metadata={"help": "questions per optimizer step (all processes)"})
    num_samples: int = field(default=16, metadata={"help": "completions sampled per question (the group)"})
    device_batch_size: int = field(default=8, metadata={"help": "completions per device per forward pass"})
    max_new_tokens: int = field(default=256, metadata={"help": "tokens sampled per completion at most"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_k: int = field(default=50, metadata={"help": "sample from the k most likely tokens (0: all)"})
    num_epochs: float = field(default=1.0, metadata={"help": "passes over GSM8K train"})
    num_iterations: int = field(default=-1, metadata={
        "help": "optimizer steps; -1: num_epochs over the data. (GRPO's num_iterations, policy updates per "
                "generation, is 1: nanochat's RL is on-policy)"})
    max_examples: int = field(default=-1, metadata={"help": "use only the first N questions; -1: all"})
    embedding_lr: float = field(default=0.2, metadata={"help": "AdamW LR of the token embedding"})
    unembedding_lr: float = field(default=0.004, metadata={"help": "AdamW LR of lm_head"})
    matrix_lr: float = field(default=0.02, metadata={"help": "Muon LR of the block matrices"})
    scalar_lr: float = field(default=0.5, metadata={"help": "AdamW LR of the resid/x0 lambdas"})
    init_lr_frac: float = field(default=0.05, metadata={"help": "every LR is multiplied by this"})
    weight_decay: float = field(default=0.0, metadata={"help": "Muon weight decay"})
    save_every: int = field(default=60, metadata={"help": "steps between checkpoints; -1: none"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints kept on disk"})
    log_every: int = field(default=1, metadata={"help": "steps between log lines"})
    seed: int = field(default=42, metadata={"help": "random seed"})
    report_to: str = field(default="none", metadata={
        "help": "where the Trainer logs: none, all, or one integration (tensorboard, trackio, wandb); --project "
                "and --run_name name the run there"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast"})
    use_tools: bool = field(default=True, metadata={"help": "rollouts call the calculator at <|python_end|>, as "
                                                    "nanochat's engine"})
    trainer_args: dict = field(default_factory=dict, metadata={
        "help": "the other GRPOConfig fields given in the recipe or on the command line"})

    def __post_init__(self) -> None:
        # Refused when parsed, before anything loads; -1 means "derive it" or "off". GRPO's advantage is a
        # reward minus its group's mean: a group of one sample learns nothing (TRL refuses it too).
        check_bounds(self, {
            "examples_per_step": Bound(low=1), "num_samples": Bound(low=2), "device_batch_size": Bound(low=1),
            "max_new_tokens": Bound(low=1), "temperature": Bound(above=0), "top_k": Bound(low=0),
            "num_epochs": Bound(above=0), "num_iterations": Bound(low=1, off=-1),
            "max_examples": Bound(low=1, off=-1),
            "embedding_lr": Bound(low=0), "unembedding_lr": Bound(low=0), "matrix_lr": Bound(low=0),
            "scalar_lr": Bound(low=0), "init_lr_frac": Bound(low=0), "weight_decay": Bound(low=0),
            "save_every": Bound(low=1, off=-1), "keep_last": Bound(low=1), "log_every": Bound(low=1),
            "seed": Bound(low=0),
        })


class NanoChatGRPOTrainer(NanoChatTRLMixin, GRPOTrainer):
    """GRPOTrainer takes no `optimizer_cls_and_kwargs`: our optimizer comes in through `create_optimizer`."""

    def __init__(self, *args, optimizer_kwargs: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.optimizer_kwargs = optimizer_kwargs
        score_real_vocab_only(self.model)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            # Muon orthogonalises in the run's compute dtype, as in every other stage (nanochat's rule)
            self.optimizer = FinetuneOptimizerFactory()(
                self.model if model is None else model,
                ortho_dtype=orthogonalization_dtype(self.args.mixed_precision), **self.optimizer_kwargs)
        return self.optimizer

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        return exclude_stop_token(batch, self.processing_class.convert_tokens_to_ids("<|assistant_end|>"))

    def _prepare_inputs(self, generation_batch):
        # TRL shuffles the generation batch before cutting it into micro-batches; nanochat's passes are
        # device_batch_size consecutive samples (of one question when num_samples is a multiple of it), each
        # normalised by its own valid tokens ("bnpo" divides by them and by the accumulation steps), so keep the
        # sampler's order. One generation per optimizer step (num_iterations=1, steps_per_generation = accumulation).
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        if self._step % self.args.steps_per_generation == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            self._buffered_inputs = split_tensor_dict(batch, self.args.steps_per_generation)
        return self._buffered_inputs[self._step % self.args.steps_per_generation]


def exclude_stop_token(batch: dict, stop_id: int) -> dict:
    """Take the ``<|assistant_end|>`` that ends each completion out of the loss, as nanochat (its engine drops the
    terminal token from the sample and pads with it, masked). TRL keeps it in ``completion_mask``, which also
    serves as attention, so the loss side (``tool_mask``; ones when no tools ran) carries the change."""
    completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
    loss_mask = batch.get("tool_mask")
    loss_mask = torch.ones_like(completion_mask) if loss_mask is None else loss_mask
    stop = (completion_ids == stop_id) & completion_mask.bool()
    batch["tool_mask"] = loss_mask.masked_fill(stop, 0)
    return batch


def parse_rl_args(argv: list[str] | None = None) -> RLArguments:
    return parse_args(argv, RLArguments, prog="nanochat-hf rl",
                      description="RL on GSM8K with TRL's GRPOTrainer and nanochat's settings. --config RECIPE.yaml "
                      "(or --config=RECIPE.yaml) sets the fields below; command-line flags override it. The "
                      "GRPOConfig group's defaults are nanochat's settings; a field marked `same as --X` sets X; one "
                      "marked `set by this stage` is refused.")


def completion_text(completion) -> str:
    """The text of a completion: a string, or (conversational) the contents of its messages, in order."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if isinstance(m.get("content"), str))


def gsm8k_accuracy(completions: list, answer: list[str], **kwargs) -> list[float]:
    """TRL reward function: nanochat's GSM8K reward (1.0 when the ``#### <number>`` answer equals the reference)."""
    from ..tasks.gsm8k import gsm8k_reward

    return [float(gsm8k_reward(completion_text(c), a)) for c, a in zip(completions, answer, strict=True)]


def prompts_for_completion(dataset: Dataset) -> Dataset:
    """GSM8K rows (`messages` ending with the reference answer, and `answer`) as GRPO prompts: the conversation
    without its final assistant message, in the `prompt` column TRL renders with the generation prompt."""
    missing = {"messages", "answer"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"RL data needs columns 'messages' and 'answer'; missing {sorted(missing)} "
                         f"(columns: {dataset.column_names})")

    def to_prompt(row: dict) -> dict:
        messages = row["messages"]
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("each RL conversation must end with the reference assistant message")
        return {"prompt": messages[:-1], "answer": row["answer"]}

    return dataset.map(to_prompt, remove_columns=dataset.column_names)


def grpo_config(run: RLArguments, generation_kwargs: dict | None = None) -> GRPOConfig:
    # GRPOConfig checks the generation batch against the group size when it is built, so the accumulation that
    # makes examples x samples completions per step is derived first, from the launcher's world size.
    world = int(os.environ.get("WORLD_SIZE", 1))
    completions = run.examples_per_step * run.num_samples
    per_pass = run.device_batch_size * world
    if completions % per_pass:
        raise ValueError(f"examples_per_step x num_samples = {completions} completions per step must be a multiple of "
                         f"device_batch_size x processes = {per_pass}; change one of them")
    args = trainer_config(run, defaults={
        "use_cpu": not torch.cuda.is_available(),
        "generation_kwargs": generation_kwargs,
    }, stage_values={
        "output_dir": run.output_dir,
        "per_device_train_batch_size": run.device_batch_size,
        "num_generations": run.num_samples,
        "gradient_accumulation_steps": completions // per_pass,
        "steps_per_generation": completions // per_pass,
        "max_completion_length": run.max_new_tokens,
        "temperature": run.temperature,
        "top_k": run.top_k,
        "num_iterations": 1,
        "num_train_epochs": run.num_epochs,
        "max_steps": run.num_iterations,
        "weight_decay": 0.0,  # Muon's (run.weight_decay) is our optimizer's; the Trainer's groups are unused
        "logging_steps": run.log_every,
        "save_strategy": "steps" if run.save_every > 0 else "no",
        "save_steps": max(run.save_every, 1),
        "save_total_limit": run.keep_last,
        "report_to": run.report_to,
        "seed": run.seed,
        "bf16": run.bf16,
    })
    hand_project_to_wandb(run, args)
    if args.world_size != world:
        raise ValueError(f"WORLD_SIZE={world} but the process group has {args.world_size} processes")
    return args


def load_rl_task(run: RLArguments) -> Dataset:
    from ..tasks import load_task  # imported here: the tasks pull in the datasets of every task

    return load_task(run.task, split="train", path=run.data_dir)


def train(run: RLArguments, dataset: Dataset | None = None, reward_funcs=None,
          generation_kwargs: dict | None = None) -> Path:
    """GRPO on `dataset` (`messages` + `answer`; default: the run's task, GSM8K train) rewarded by `reward_funcs`
    (default nanochat's GSM8K reward); returns the folder of the final model. `generation_kwargs` are extra
    transformers generation settings for the rollouts (e.g. a ``sequence_bias``)."""
    keep_local_gloo_on_loopback()
    require_model_folder(run.init_from, "sft")
    tokenizer = load_tokenizer(run.init_from)
    model = NanoChatForCausalLM.from_pretrained(run.init_from)
    eos_token_id = enable_tool_rollouts(model, tokenizer) if run.use_tools else model.generation_config.eos_token_id
    dataset = load_rl_task(run) if dataset is None else dataset
    if run.max_examples > 0:
        dataset = dataset.select(range(min(run.max_examples, len(dataset))))
    dataset = prompts_for_completion(dataset)
    args = grpo_config(run, generation_kwargs)
    check_parallelism(args.distributed_state.distributed_type)
    Path(run.output_dir).mkdir(parents=True, exist_ok=True)
    optimizer_kwargs = finetune_optimizer_kwargs(run)
    trainer = NanoChatGRPOTrainer(
        model=model,
        reward_funcs=reward_funcs or gsm8k_accuracy,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        optimizer_kwargs=optimizer_kwargs,
        tools=[python] if run.use_tools else None,
    )
    trainer.add_callback(LossLog(trainer))
    trainer.train()
    # <|python_end|> stops generation only inside the tool loop: the saved model's generate() runs whole turns.
    model.generation_config.eos_token_id = eos_token_id
    final = save_final(trainer, tokenizer, run.output_dir)
    push_if_asked(trainer)
    return final


def main(argv: list[str] | None = None) -> None:
    run = parse_rl_args(argv)
    # a folder that is not a run is refused; a run that fails before writing leaves no empty folder behind
    with run_folder(run.output_dir, inputs=[run.init_from, run.data_dir]):
        train(run)


if __name__ == "__main__":  # `accelerate launch -m nanochat_hf.training.rl`: input errors as in the CLI
    run_command("rl", main)
