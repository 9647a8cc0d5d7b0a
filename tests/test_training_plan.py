"""The depth dial's hyper-parameter transfer against nanochat's base_train, with its numbers written out: scaling
parameters from nanochat-spec.md §1.5 (d12 110,100,912; d20 435,160,240; d24 729,810,624), B_REF = 2^19."""

import math

import pytest

from nanochat_hf import NanoChatConfig
from nanochat_hf.training.plan import plan_training

D12, D20, D24 = 110_100_912, 435_160_240, 729_810_624


@pytest.mark.parametrize("depth, params, batch", [(20, D20, 2**20), (24, D24, 2**20)])
@pytest.mark.parametrize("num_iterations", [-1, 100, 20_000])
def test_weight_decay_follows_the_ratio_derived_token_budget(depth, params, batch, num_iterations):
    """base_train: wd = 0.28 * sqrt(B / 2^19) * D_REF / target_tokens, with target_tokens = int(12 * params) and
    D_REF = 12 * params(d12), whatever --num-iterations says (it sets the length of the run, not the budget that
    the weight decay is scaled by)."""
    plan = plan_training(NanoChatConfig.from_depth(depth), device_batch_size=16, world_size=8,
                         num_iterations=num_iterations)
    assert plan.total_batch_size == batch
    expected = 0.28 * math.sqrt(batch / 2**19) * (12 * D12) / int(12 * params)
    assert plan.weight_decay == pytest.approx(expected, rel=1e-12)
    assert plan.target_tokens == int(12 * params)
    assert plan.num_iterations == (int(12 * params) // batch if num_iterations == -1 else num_iterations)
    assert plan.total_tokens == plan.num_iterations * batch


def test_weight_decay_literals():
    """The values nanochat-spec.md §2.3 lists: d20 0.100, d24 0.0597 (to the digits given there)."""
    for depth, wd, digits in ((20, 0.100, 3), (24, 0.0597, 4)):
        plan = plan_training(NanoChatConfig.from_depth(depth), device_batch_size=16, world_size=8,
                             num_iterations=10)
        assert round(plan.weight_decay, digits) == wd, depth


@pytest.mark.parametrize("num_iterations", [-1, 100])
def test_a_ratio_without_a_token_budget_is_refused(num_iterations):
    with pytest.raises(ValueError, match="target_param_data_ratio=0.0 must be greater than 0"):
        plan_training(NanoChatConfig.from_depth(4), device_batch_size=1, world_size=1, target_param_data_ratio=0.0,
                      total_batch_size=2048, num_iterations=num_iterations)


# nanochat ORIG (3a5e0bc) base_train, which trained the 2025 generation: N counts every parameter, the batch is a
# fixed 524,288 tokens, iterations = 20 * N // 524,288 (nanochat-spec.md §1.5, d20 and d32 as logged).
@pytest.mark.parametrize("depth, params, iterations", [(20, 560_988_160, 21_400), (32, 1_879_048_192, 71_680)])
def test_2025_models_plan_by_nanochat_origs_base_train(depth, params, iterations):
    config = NanoChatConfig.from_depth(depth, "2025")
    assert config.vocab_size == 65_536
    plan = plan_training(config, device_batch_size=32, world_size=8)
    assert (plan.scaling_params, plan.num_iterations, plan.total_batch_size) == (params, iterations, 524_288)
    assert plan.target_tokens == 20 * params and plan.total_tokens == iterations * 524_288
    assert plan.gradient_accumulation_steps == 1  # 524,288 / (32 x 2048 x 8)
    assert (plan.batch_lr_scale, plan.weight_decay) == (1.0, 0.0)
    assert plan.recipe == "nanochat ORIG (3a5e0bc)"


def test_2025_plan_scales_nothing_by_an_explicit_batch_and_refuses_weight_decay():
    config = NanoChatConfig.from_depth(20, "2025")
    plan = plan_training(config, device_batch_size=32, world_size=8, total_batch_size=2**20, num_iterations=100)
    assert (plan.num_iterations, plan.total_batch_size, plan.batch_lr_scale, plan.weight_decay) == (100, 2**20, 1.0,
                                                                                                     0.0)
    assert plan.target_tokens == 20 * 560_988_160
    with pytest.raises(ValueError, match="ORIG's Muon, which has no weight decay"):
        plan_training(config, device_batch_size=32, world_size=8, weight_decay=0.28)


def test_2026_plan_defaults_are_still_heads():
    plan = plan_training(NanoChatConfig.from_depth(20), device_batch_size=16, world_size=8)
    assert (plan.num_iterations, plan.total_batch_size, plan.scaling_params) == (4980, 2**20, D20)
    assert round(plan.weight_decay, 3) == 0.100 and plan.recipe == "nanochat HEAD (92d63d4)"
