"""FP8 training through torchao (`nanochat_hf/training/fp8.py`), exercised on CPU with torchao's emulation.

Emulation casts the operands to float8 exactly as on the GPU and does the matmul in high precision, so the
numerics checked here are fp8's; only the speed is not.
"""

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torchao.float8.float8_linear import Float8Linear

from nanochat_hf import NanoChatForCausalLM
from nanochat_hf.training.fp8 import FP8_RECIPES, check_fp8_support, convert_to_fp8, fp8_disabled, fp8_module_filter

from .conftest import randomize, tiny_config

# Width 256 (4 heads of 64) with ONE kv head: q_proj/o_proj (256x256), fc1 (256->1024) and fc2 (1024->256) pass
# nanochat's rule; k_proj/v_proj (256->64), ve_gate (12->1, layers 1 and 3) and smear_gate (24->1) don't; lm_head
# (256->320) would pass the shape rule but is never converted.
FP8_SHAPE = {"head_dim": 64, "aspect_ratio": 64, "num_key_value_heads": 1}
# Written by hand from nanochat's rule (dims % 16 == 0 and min(dims) >= 128), not from fp8_module_filter.
EXPECTED_FP8 = [
    f"model.layers.{i}.{name}"
    for i in range(4)
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.fc1", "mlp.fc2")
]
STAYS_PLAIN = [
    *(f"model.layers.{i}.self_attn.{p}" for i in range(4) for p in ("k_proj", "v_proj")),
    "model.layers.1.self_attn.ve_gate",
    "model.layers.3.self_attn.ve_gate",
    "model.smear_gate",
    "lm_head",
]


def _model(seed: int = 0) -> NanoChatForCausalLM:
    torch.manual_seed(seed)
    config = tiny_config(**FP8_SHAPE)
    assert (config.hidden_size, config.num_key_value_heads, config.value_embed_gate_channels) == (256, 1, 12)
    return randomize(NanoChatForCausalLM(config), seed)


def _ids(seed: int = 0, length: int = 64) -> torch.Tensor:
    return torch.randint(0, 300, (2, length), generator=torch.Generator().manual_seed(seed))


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


# ----------------------------------------------------------------------------------------------------------------
# Which layers


@pytest.mark.parametrize(
    ("module", "fqn", "expected"),
    [
        (nn.Linear(128, 128), "model.layers.0.self_attn.q_proj", True),  # the smallest that qualifies
        (nn.Linear(256, 1024), "model.layers.0.mlp.fc1", True),
        (nn.Linear(256, 112), "x", False),  # a multiple of 16 but under 128
        (nn.Linear(136, 256), "x", False),  # >= 128 but 136 % 16 == 8
        (nn.Linear(256, 200), "x", False),  # out_features 200 % 16 == 8
        (nn.Linear(12, 2), "model.layers.1.self_attn.ve_gate", False),
        (nn.Embedding(320, 256), "model.embed_tokens", False),  # not a Linear
        (nn.Linear(256, 320), "lm_head", False),  # passes the shape rule; lm_head never
        (nn.Linear(256, 320), "model.lm_head", False),
    ],
)
def test_filter_is_nanochats_rule(module, fqn, expected):
    assert fp8_module_filter(module, fqn) is expected


def test_convert_swaps_exactly_nanochats_layers_in_place():
    model = _model()
    plain = copy.deepcopy(model)
    weights = {name: p for name, p in model.named_parameters()}

    converted = convert_to_fp8(model, emulate=True)

    assert converted == EXPECTED_FP8
    assert sorted(n for n, m in model.named_modules() if isinstance(m, Float8Linear)) == sorted(EXPECTED_FP8)
    for name in STAYS_PLAIN:
        assert type(model.get_submodule(name)) is nn.Linear, name
    assert type(model.model.embed_tokens) is nn.Embedding
    assert all(type(m) is nn.Embedding for m in model.model.value_embeds.values())
    # the parameters are the same objects under the same names: optimizer state and checkpoints carry over
    assert {name: p for name, p in model.named_parameters()}.keys() == weights.keys()
    assert all(p is weights[name] for name, p in model.named_parameters())
    assert model.state_dict().keys() == plain.state_dict().keys()
    # the model's own init role travels with each layer (its _init_weights reads it)
    assert model.get_submodule(EXPECTED_FP8[0]).init_role == "qkv"
    assert model.get_submodule("model.layers.0.mlp.fc2").init_role == "zero"
    # a second conversion finds nothing left to do
    assert convert_to_fp8(model, emulate=True) == []


# ----------------------------------------------------------------------------------------------------------------
# Refusals


def test_check_fp8_support_refuses_cpu_with_the_fix():
    with pytest.raises(RuntimeError) as info:
        check_fp8_support("cpu")
    message = str(info.value)
    assert "CPU" in message and "--fp8" in message
    assert "compute capability >= 8.9" in message and "H100" in message
    assert "drop --fp8" in message
    with pytest.raises(RuntimeError, match="'mps' device"):
        check_fp8_support(torch.device("mps"))


def _fake_gpu(monkeypatch, name: str, capability: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_check_fp8_support_by_compute_capability(monkeypatch):
    _fake_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB", (8, 0))
    with pytest.raises(RuntimeError, match=r"A100-SXM4-80GB has compute capability 8\.0.*drop --fp8"):
        check_fp8_support("cuda")
    for name, capability in (("NVIDIA L4", (8, 9)), ("NVIDIA H100 80GB HBM3", (9, 0)), ("NVIDIA B200", (10, 0))):
        _fake_gpu(monkeypatch, name, capability)
        check_fp8_support("cuda:0")  # supported: returns quietly
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        check_fp8_support("cuda")


def test_missing_torchao_says_how_to_install(monkeypatch):
    for name in [n for n in sys.modules if n == "torchao" or n.startswith("torchao.")] or ["torchao"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import torchao` now raises ImportError
    _fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0))
    with pytest.raises(RuntimeError, match=r"torchao.*pip install 'nanochat-hf\[gpu\]'"):
        check_fp8_support("cuda")
    with pytest.raises(RuntimeError, match=r"pip install 'nanochat-hf\[gpu\]'"):
        convert_to_fp8(_model())
    # on the CPU without torchao both problems are named at once
    with pytest.raises(RuntimeError, match=r"CPU.*pip install 'nanochat-hf\[gpu\]'"):
        check_fp8_support("cpu")


def test_unknown_recipe_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="tensorwise, rowwise"):
        convert_to_fp8(model, "rowwise_with_gw_hp")  # torchao has it; nanochat's --fp8-recipe does not
    with pytest.raises(ValueError, match="'delayed'"):
        convert_to_fp8(model, "delayed")
    assert not any(isinstance(m, Float8Linear) for m in model.modules())
    assert FP8_RECIPES == ("tensorwise", "rowwise")


# ----------------------------------------------------------------------------------------------------------------
# Numerics (torchao's emulation on CPU)


@pytest.mark.parametrize(
    ("recipe", "grad_error"),
    # float8_e4m3fn keeps 3 mantissa bits: rounding one operand costs ~2.5% RMS, a product of two ~3.6%.
    # Tensorwise casts grad_output to float8_e5m2 (2 mantissa bits, ~5% alone), so its gradients are ~5.8% off;
    # rowwise keeps grad_output in e4m3 (~3.6%). Measured: forward 3.6% / 3.6%, grad input 5.8% / 3.6%.
    [("tensorwise", (0.045, 0.075)), ("rowwise", (0.025, 0.045))],
)
def test_one_layer_has_the_error_of_its_float8_formats(recipe, grad_error):
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(256, 512, bias=False))
    fp8 = copy.deepcopy(reference)
    assert convert_to_fp8(fp8, recipe, emulate=True) == ["0"]
    x = torch.randn(128, 256)
    x_ref, x_fp8 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_fp8 = reference(x_ref), fp8(x_fp8)
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    y_fp8.backward(grad)
    assert 0.025 < _relative_error(y_fp8, y_ref) < 0.045
    low, high = grad_error
    assert low < _relative_error(x_fp8.grad, x_ref.grad) < high
    assert low < _relative_error(fp8[0].weight.grad, reference[0].weight.grad) < high


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_converted_model_trains_close_to_the_plain_one_through_float8(recipe):
    reference = _model(seed=1).train()
    model = copy.deepcopy(reference)
    convert_to_fp8(model, recipe, emulate=True)
    names = {model.get_submodule(name): name for name in EXPECTED_FP8}
    calls = dict.fromkeys(EXPECTED_FP8, 0)

    def count(module, args, output):
        calls[names[module]] += 1

    for module in names:
        module.register_forward_hook(count)

    ids = _ids(1)
    out, ref = model(ids, labels=ids), reference(ids, labels=ids)
    out.loss.backward()
    ref.loss.backward()

    # Every converted layer runs its own forward (a fused q/k/v matmul over the raw weights would bypass q_proj).
    assert calls == dict.fromkeys(EXPECTED_FP8, 1)
    # 16 layers of ~3.6% matmul error compound to ~5-6.5% on the logits (measured over seeds: 5.1-6.5%) and
    # ~8-10% on the whole gradient; the loss moves by < 0.01 nats. Above zero: fp8 really quantized.
    assert 0.02 < _relative_error(out.logits, ref.logits) < 0.10
    assert abs(out.loss.item() - ref.loss.item()) < 0.02
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    ref_grads = torch.cat([p.grad.flatten() for p in reference.parameters()])
    assert 0.02 < _relative_error(grads, ref_grads) < 0.15
    assert torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0) > 0.99
    for name in EXPECTED_FP8:
        assert model.get_submodule(name).weight.grad.abs().sum() > 0, name
    assert out.logits.dtype == ref.logits.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------------
# fp8_disabled


def test_fp8_disabled_swaps_in_plain_linears_that_share_the_weights():
    reference = _model(seed=2).eval()
    model = copy.deepcopy(reference)
    convert_to_fp8(model, emulate=True)
    fp8_modules = {name: model.get_submodule(name) for name in EXPECTED_FP8}
    ids = _ids(2)

    with torch.no_grad(), fp8_disabled(model) as inside:
        assert inside is model
        plain = {name: model.get_submodule(name) for name in EXPECTED_FP8}
        for name, module in plain.items():
            assert type(module) is nn.Linear, name
            assert module.weight is fp8_modules[name].weight, name  # shared, not copied
            assert module.weight.data_ptr() == fp8_modules[name].weight.data_ptr()
        assert not any(isinstance(m, Float8Linear) for m in model.modules())
        # plain precision again: exactly the unconverted model's logits
        assert torch.equal(model(ids).logits, reference(ids).logits)

    for name, module in fp8_modules.items():
        assert model.get_submodule(name) is module, name
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, reference(ids).logits)

    # restored on an exception too; a second entry reuses the same plain modules (a compiled model then compiles
    # the evaluation graph once, not at every evaluation)
    with pytest.raises(KeyError), fp8_disabled(model):
        again = {name: model.get_submodule(name) for name in EXPECTED_FP8}
        raise KeyError("boom")
    assert all(again[name] is plain[name] for name in EXPECTED_FP8)
    assert all(model.get_submodule(name) is module for name, module in fp8_modules.items())

    # a model without Float8Linear passes through untouched
    modules_before = list(reference.modules())
    with fp8_disabled(reference):
        assert list(reference.modules()) == modules_before


def test_gradients_under_fp8_disabled_reach_the_shared_weights():
    model = _model(seed=3).train()
    convert_to_fp8(model, emulate=True)
    ids = _ids(3, length=16)
    with fp8_disabled(model):
        model(ids, labels=ids).loss.backward()
    for name in EXPECTED_FP8:
        assert model.get_submodule(name).weight.grad is not None, name


# ----------------------------------------------------------------------------------------------------------------
# Saving: plain weights that load where torchao is not installed

LOADER = textwrap.dedent(
    """
    import importlib.machinery, sys
    # As if torchao were not installed: find_spec("torchao") is None (transformers probes it at import) and
    # `import torchao` raises ModuleNotFoundError.
    class HideTorchao(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.partition(".")[0] == "torchao":
                return None
            return super().find_spec(name, path, target)
    sys.meta_path[:] = [HideTorchao if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    assert HideTorchao in sys.meta_path
    import torch
    from transformers import AutoModelForCausalLM
    folders = sys.argv[2:]
    out = {folder: {} for folder in folders}
    # the shipped code first, before nanochat_hf registers its own classes with the Auto API
    for folder in folders:
        remote = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        assert type(remote).__module__.startswith("transformers_modules."), type(remote).__module__
        out[folder]["remote"] = remote.state_dict()
    from nanochat_hf import NanoChatForCausalLM
    from nanochat_hf.training.fp8 import convert_to_fp8, fp8_disabled
    for folder in folders:
        native = NanoChatForCausalLM.from_pretrained(folder)
        out[folder]["native"] = native.state_dict()
        with fp8_disabled(native):  # nothing to swap; must not need torchao
            pass
    try:
        convert_to_fp8(native)
        raise AssertionError("convert_to_fp8 ran without torchao")
    except RuntimeError as e:
        assert "pip install 'nanochat-hf[gpu]'" in str(e), e
    assert "torchao" not in sys.modules
    torch.save(out, sys.argv[1])
    """
)


def test_saved_converted_model_loads_bit_identical_without_torchao(tmp_path: Path):
    expected, folders = {}, []
    for recipe in FP8_RECIPES:
        model = _model(seed=4).train()
        convert_to_fp8(model, recipe, emulate=True)
        # one fp8 training step, so the saved weights are ones that fp8 training produced
        ids = _ids(4, length=32)
        model(ids, labels=ids).loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.01 * p.grad
        folder = tmp_path / recipe
        model.save_pretrained(folder)
        assert any(isinstance(m, Float8Linear) for m in model.modules())  # saving leaves the model converted
        folders.append(str(folder))
        expected[str(folder)] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    script = tmp_path / "load.py"
    script.write_text(LOADER)
    out_path = tmp_path / "out.pt"
    result = subprocess.run(
        [sys.executable, str(script), str(out_path), *folders],
        cwd=tmp_path,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(out_path)
    for folder in folders:
        for kind in ("native", "remote"):
            state = loaded[folder][kind]
            assert state.keys() == expected[folder].keys(), (folder, kind)
            for name, tensor in expected[folder].items():
                assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), (folder, kind, name)
