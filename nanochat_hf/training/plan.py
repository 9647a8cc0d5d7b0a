"""nanochat's hyper-parameter transfer: from the depth to the token budget, batch size, LRs and accumulation.

Reference point (nanochat HEAD, base_train.py): a d12 model trained at the same tokens:params ratio with a batch
of 2^19 tokens. Every other depth scales its batch by Power Lines (B ~ D^0.383), its LRs by sqrt(B / 2^19) and
its Muon weight decay by sqrt(B / B_ref) * D_ref / D. D is the token budget the ratio gives (`target_tokens`), also
when the number of iterations is set explicitly: that sets the run's length (`total_tokens`), as in base_train.

The 2025 generation trains with the recipe it was released with, nanochat ORIG (3a5e0bc): a ratio of 20 tokens per
parameter, every parameter counted (embeddings and lm_head too), a fixed batch of 524,288 tokens and no scaling of
the LRs or the weight decay by it (ORIG's Muon has no weight decay).
"""

import math
from dataclasses import dataclass

import torch

from ..configuration_nanochat import NanoChatConfig
from ..modeling_nanochat import NanoChatForCausalLM

B_REF = 2**19
ORIG_TOTAL_BATCH_SIZE = 524_288  # ORIG base_train's fixed batch, in tokens

# base_train's defaults for each architecture generation: ORIG's (3a5e0bc) for the 2025 models it released, HEAD's
# (92d63d4) for the 2026 ones. The pretraining arguments left unset take their model's column; -1 derives a value.
PRETRAIN_DEFAULTS: dict[str, dict[str, float]] = {
    "2025": dict(target_param_data_ratio=20.0, total_batch_size=ORIG_TOTAL_BATCH_SIZE, embedding_lr=0.2,
                 unembedding_lr=0.004, weight_decay=0.0, warmup_steps=0, warmdown_ratio=0.2, final_lr_frac=0.0),
    "2026": dict(target_param_data_ratio=12.0, total_batch_size=-1, embedding_lr=0.3, unembedding_lr=0.008,
                 weight_decay=0.28, warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05),
}
RECIPES = {"2025": "nanochat ORIG (3a5e0bc)", "2026": "nanochat HEAD (92d63d4)"}


def _param_counts(config: NanoChatConfig) -> dict[str, int]:
    with torch.device("meta"):
        return NanoChatForCausalLM(config).num_scaling_params()


def scaling_params(config: NanoChatConfig) -> int:
    """Parameters that count for the scaling laws: the block matrices plus lm_head (nanochat HEAD, Kaplan-style)."""
    counts = _param_counts(config)
    return counts["transformer_matrices"] + counts["lm_head"]


def total_params(config: NanoChatConfig) -> int:
    """Every parameter, embeddings and lm_head included: what nanochat ORIG's ratio counts (d20: 560,988,160)."""
    return _param_counts(config)["total"]


@dataclass(frozen=True)
class TrainingPlan:
    num_iterations: int
    total_batch_size: int  # tokens per optimizer step, across all ranks
    gradient_accumulation_steps: int
    target_tokens: int  # the ratio's token budget, which the batch size and weight decay are scaled by
    total_tokens: int  # what the run trains on: num_iterations x total_batch_size
    batch_lr_scale: float
    weight_decay: float
    scaling_params: int  # the parameters the ratio counts: HEAD's scaling parameters, or ORIG's every parameter
    recipe: str  # whose base_train this plan is: nanochat ORIG's (2025 models) or HEAD's (2026 models)


def check_batch_divides(total_batch_size: int, device_batch_size: int, seq: int, world_size: int) -> int:
    """Refuse a step of `total_batch_size` tokens that whole micro-steps cannot make up, as nanochat does; returns
    the tokens of one micro-step over all processes."""
    tokens_per_micro_step = device_batch_size * seq * world_size
    if total_batch_size % tokens_per_micro_step:
        raise ValueError(
            f"total_batch_size={total_batch_size:,} tokens is not a multiple of device_batch_size x sequence length x "
            f"world size = {device_batch_size} x {seq} x {world_size} = {tokens_per_micro_step:,}; change "
            "--total_batch_size, --device_batch_size or the number of processes so that it divides"
        )
    return tokens_per_micro_step


def plan_training(
    config: NanoChatConfig,
    *,
    device_batch_size: int,
    world_size: int,
    target_param_data_ratio: float | None = None,
    total_batch_size: int = -1,
    num_iterations: int = -1,
    weight_decay: float | None = None,
) -> TrainingPlan:
    """The schedule nanochat derives from the depth, by the base_train of the model's generation (ORIG for 2025,
    HEAD for 2026). `-1` means "derive it", None "the generation's default"; explicit values win."""
    defaults = PRETRAIN_DEFAULTS[config.generation]
    if target_param_data_ratio is None:
        target_param_data_ratio = defaults["target_param_data_ratio"]
    if weight_decay is None:
        weight_decay = defaults["weight_decay"]
    if target_param_data_ratio <= 0:
        raise ValueError(f"target_param_data_ratio={target_param_data_ratio} must be greater than 0: the token budget it "
                         "gives sets the batch size and the weight decay, also when num_iterations is given")
    plan = _plan_orig if config.generation == "2025" else _plan_head
    return plan(config, device_batch_size=device_batch_size, world_size=world_size,
                target_param_data_ratio=target_param_data_ratio, total_batch_size=total_batch_size,
                num_iterations=num_iterations, weight_decay=weight_decay)


def _plan_head(config: NanoChatConfig, *, device_batch_size: int, world_size: int, target_param_data_ratio: float,
               total_batch_size: int, num_iterations: int, weight_decay: float) -> TrainingPlan:
    """HEAD's base_train: Power Lines batch, LRs scaled by sqrt(B / 2^19), weight decay by the token budget."""
    seq = config.max_position_embeddings
    params = scaling_params(config)
    target_tokens = int(target_param_data_ratio * params)
    reference = NanoChatConfig.from_depth(12, config.generation, vocab_size=config.vocab_size,
                                          max_position_embeddings=seq)
    d_ref = target_param_data_ratio * scaling_params(reference)
    if total_batch_size == -1:
        total_batch_size = 2 ** round(math.log2(B_REF * (target_tokens / d_ref) ** 0.383))
    return _finish_plan(config, device_batch_size=device_batch_size, world_size=world_size,
                        total_batch_size=total_batch_size, num_iterations=num_iterations, target_tokens=target_tokens,
                        batch_lr_scale=math.sqrt(total_batch_size / B_REF),
                        weight_decay=weight_decay * math.sqrt(total_batch_size / B_REF) * (d_ref / target_tokens),
                        params=params, generation="2026")


def _plan_orig(config: NanoChatConfig, *, device_batch_size: int, world_size: int, target_param_data_ratio: float,
               total_batch_size: int, num_iterations: int, weight_decay: float) -> TrainingPlan:
    """ORIG's base_train: `num_iterations = ratio * every parameter // batch`, the batch fixed (524,288 unless
    given), nothing scaled by it."""
    if weight_decay != 0:
        raise ValueError(f"weight_decay={weight_decay}: a 2025-generation model trains with nanochat ORIG's Muon, "
                         "which has no weight decay; set --weight_decay 0 (its default for generation 2025)")
    params = total_params(config)
    target_tokens = int(target_param_data_ratio * params)
    if total_batch_size == -1:
        total_batch_size = ORIG_TOTAL_BATCH_SIZE
    return _finish_plan(config, device_batch_size=device_batch_size, world_size=world_size,
                        total_batch_size=total_batch_size, num_iterations=num_iterations, target_tokens=target_tokens,
                        batch_lr_scale=1.0, weight_decay=0.0, params=params, generation="2025")


def _finish_plan(config: NanoChatConfig, *, device_batch_size: int, world_size: int, total_batch_size: int,
                 num_iterations: int, target_tokens: int, batch_lr_scale: float, weight_decay: float, params: int,
                 generation: str) -> TrainingPlan:
    """What both recipes share once the batch is known: micro-steps that divide it, and the run's length (-1: the
    token budget's)."""
    tokens_per_micro_step = check_batch_divides(total_batch_size, device_batch_size, config.max_position_embeddings,
                                                world_size)
    if num_iterations == -1:
        num_iterations = max(1, target_tokens // total_batch_size)
    return TrainingPlan(
        num_iterations=num_iterations,
        total_batch_size=total_batch_size,
        gradient_accumulation_steps=total_batch_size // tokens_per_micro_step,
        target_tokens=target_tokens,
        total_tokens=num_iterations * total_batch_size,
        batch_lr_scale=batch_lr_scale,
        weight_decay=weight_decay,
        scaling_params=params,
        recipe=RECIPES[generation],
    )


# Peak dense bf16 FLOP/s per GPU, nanochat's `get_peak_flops` table (the MFU denominator; fp8 runs are divided by it
# too). The first entry whose name occurs in the device name wins, so the variants come before their family.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200 NVL", 836e12),
    ("H200 PCIe", 836e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


def gpu_peak_flops(device_name: str) -> float | None:
    """nanochat's peak for a CUDA device name (`torch.cuda.get_device_name()`); None for a GPU it doesn't list."""
    return next((flops for gpu, flops in PEAK_FLOPS if gpu in device_name), None)
