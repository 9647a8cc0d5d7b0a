"""nanochat's hyper-parameter transfer: from the depth to the token budget, batch size, LRs and accumulation.

Reference point (nanochat HEAD, base_train.py): a d12 model trained at the same tokens:params ratio with a batch
of 2^19 tokens. Every other depth scales its batch by Power Lines (B ~ D^0.383), its LRs by sqrt(B / 2^19) and
its Muon weight decay by sqrt(B / B_ref) * D_ref / D. D is the token budget the ratio gives (`target_tokens`), also
when the number of iterations is set explicitly: that sets the run's length (`total_tokens`), as in base_train.
"""

import math
from dataclasses import dataclass

import torch

from .configuration_nanochat import NanoChatConfig
from .modeling_nanochat import NanoChatForCausalLM

B_REF = 2**19


def scaling_params(config: NanoChatConfig) -> int:
    """Parameters that count for the scaling laws: the block matrices plus lm_head (nanochat, Kaplan-style)."""
    with torch.device("meta"):
        counts = NanoChatForCausalLM(config).num_scaling_params()
    return counts["transformer_matrices"] + counts["lm_head"]


@dataclass(frozen=True)
class TrainingPlan:
    num_iterations: int
    total_batch_size: int  # tokens per optimizer step, across all ranks
    gradient_accumulation_steps: int
    target_tokens: int  # the ratio's token budget, which the batch size and weight decay are scaled by
    total_tokens: int  # what the run trains on: num_iterations x total_batch_size
    batch_lr_scale: float
    weight_decay: float
    scaling_params: int


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
    target_param_data_ratio: float = 12.0,
    total_batch_size: int = -1,
    num_iterations: int = -1,
    weight_decay: float = 0.28,
) -> TrainingPlan:
    """The schedule nanochat derives from the depth. `-1` means "derive it"; explicit values win."""
    if target_param_data_ratio <= 0:
        raise ValueError(f"target_param_data_ratio={target_param_data_ratio} must be greater than 0: the token budget it "
                         "gives sets the batch size and the weight decay, also when num_iterations is given")
    seq = config.max_position_embeddings
    params = scaling_params(config)
    target_tokens = int(target_param_data_ratio * params)
    reference = NanoChatConfig.from_depth(12, config.generation, vocab_size=config.vocab_size,
                                          max_position_embeddings=seq)
    d_ref = target_param_data_ratio * scaling_params(reference)
    if total_batch_size == -1:
        total_batch_size = 2 ** round(math.log2(B_REF * (target_tokens / d_ref) ** 0.383))
    tokens_per_micro_step = check_batch_divides(total_batch_size, device_batch_size, seq, world_size)
    if num_iterations == -1:
        num_iterations = max(1, target_tokens // total_batch_size)
    return TrainingPlan(
        num_iterations=num_iterations,
        total_batch_size=total_batch_size,
        gradient_accumulation_steps=total_batch_size // tokens_per_micro_step,
        target_tokens=target_tokens,
        total_tokens=num_iterations * total_batch_size,
        batch_lr_scale=math.sqrt(total_batch_size / B_REF),
        weight_decay=weight_decay * math.sqrt(total_batch_size / B_REF) * (d_ref / target_tokens),
        scaling_params=params,
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
