"""The depth dial's hyper-parameter transfer against nanochat's base_train, with its numbers written out: scaling
parameters from nanochat-spec.md §1.5 (d12 110,100,912; d20 435,160,240; d24 729,810,624), B_REF = 2^19."""

import math

import pytest

from nanochat_hf import NanoChatConfig
from nanochat_hf.training_plan import plan_training

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
