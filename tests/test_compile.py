"""The model compiles whole (`fullgraph=True`, `dynamic=False`, as nanochat compiles its GPT), trains to the same
loss and gradients as eager, and a second step reuses the graph."""

import pytest
import torch

from nanochat_hf import NanoChatForCausalLM

from .conftest import randomize, tiny_config

ATOL = 1e-5


def loss_and_grads(model, ids, forward=None):
    """One training step's loss and gradients; `forward` (e.g. the compiled model) runs the step instead."""
    for p in model.parameters():
        p.grad = None
    loss = (model if forward is None else forward)(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "generation,backend",
    [("2025", "sdpa"), ("2026", "sdpa"), ("2026", "eager")],
)
def test_compiled_training_step_equals_eager_and_does_not_recompile(generation, backend):
    assert NanoChatForCausalLM._can_compile_fullgraph
    torch.manual_seed(0)
    model = randomize(NanoChatForCausalLM(tiny_config(generation, attn_implementation=backend))).train()
    assert model.config._attn_implementation == backend
    if generation == "2026":
        assert min(model.config.layer_windows) < 48 - 1  # the short windows are crossed
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    gen = torch.Generator().manual_seed(1)
    for step in range(2):
        ids = torch.randint(0, 300, (2, 48), generator=gen)
        loss_e, grads_e = loss_and_grads(model, ids)
        # the second step must reuse the first step's graphs
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            loss_c, grads_c = loss_and_grads(model, ids, compiled)
        assert abs(loss_c - loss_e) <= ATOL, f"step {step}"
        for name, grad in grads_e.items():
            torch.testing.assert_close(grads_c[name], grad, atol=ATOL, rtol=1e-4, msg=f"step {step}: {name}")


def test_compiled_flex_forward_equals_eager():
    torch.manual_seed(0)
    model = randomize(NanoChatForCausalLM(tiny_config("2026"))).eval()
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids).logits
        model.set_attn_implementation("flex_attention")
        torch._dynamo.reset()
        got = torch.compile(model, fullgraph=True, dynamic=False)(ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
