"""FP8 training through torchao's float8 API, as nanochat HEAD's `--fp8`.

The block's large Linear layers become torchao `Float8Linear`: each of a Linear's three matmuls (output, grad
input, grad weight) casts its operands to float8 with a dynamic scale and runs on the FP8 tensor cores of
Hopper/Ada GPUs. Master weights stay where they were (fp32 parameters with the same names), so optimizers,
checkpoints and `save_pretrained` folders are the same with and without `--fp8`. Evaluation runs in plain
precision under `fp8_disabled`, as nanochat's `disable_fp8`.

torchao is an optional dependency (`pip install 'nanochat-hf[gpu]'`): it is imported only inside the functions
that need it, so this module imports anywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

FP8_RECIPES = ("tensorwise", "rowwise")

# FP8 matmuls run on compute capability 8.9 (Ada) and 9.0 (Hopper) and later.
MIN_CAPABILITY = (8, 9)

# nanochat HEAD's filter: FP8 GEMMs need both dims divisible by 16, and below 128 the casts cost more than the
# matmul saves. So ve_gate (12 -> kv_heads) and smear_gate (24 -> 1) stay in plain precision.
_DIM_MULTIPLE = 16
_MIN_DIM = 128

# What every nn.Linear has; anything else on one (the model's `init_role`) is carried over to its Float8Linear.
_PLAIN_LINEAR_ATTRIBUTES = frozenset(vars(nn.Linear(1, 1, bias=False, device="meta")))

_INSTALL_HINT = "pip install 'nanochat-hf[gpu]'"
_GPU_HINT = "a CUDA GPU with compute capability >= 8.9 (Hopper/Ada: H100, H200, L4, RTX 4090...)"

# The plain Linear that stands in for each Float8Linear under `fp8_disabled`, made once and reused, so that a
# compiled model sees the same modules at every evaluation and its graph for them is compiled once.
_plain_twins: weakref.WeakKeyDictionary[nn.Module, nn.Linear] = weakref.WeakKeyDictionary()


def _torchao_float8() -> Any:
    """`torchao.float8`, or a RuntimeError that says how to install it."""
    try:
        import torchao.float8
    except ImportError as e:
        raise RuntimeError(f"FP8 training needs torchao, which is not installed: {_INSTALL_HINT}") from e
    return torchao.float8


def _is_float8(module: nn.Module) -> bool:
    # By name, so that a model can be inspected (and fp8_disabled run) without importing torchao.
    return type(module).__name__ == "Float8Linear" and type(module).__module__.startswith("torchao.")


def check_fp8_support(device: torch.device | str) -> None:
    """Raise a RuntimeError naming the problem and the fix when FP8 training can't run here: torchao missing
    (say: pip install 'nanochat-hf[gpu]'), CPU or any non-CUDA device, or a CUDA GPU below compute capability 8.9
    (FP8 needs Hopper/Ada: H100, H200, L4, RTX 4090...). Called at start-up: --fp8 is never silently ignored."""
    device = torch.device(device)
    fix = f"FP8 training needs {_GPU_HINT}: run on such a GPU, or drop --fp8"
    problems = []
    if device.type != "cuda":
        where = "the CPU" if device.type == "cpu" else f"a {device.type!r} device"
        problems.append(f"this run is on {where}, and {fix}")
    elif not torch.cuda.is_available():
        problems.append(f"CUDA is not available (torch {torch.__version__}, CUDA {torch.version.cuda}), and {fix}")
    else:
        capability = tuple(torch.cuda.get_device_capability(device))
        if capability < MIN_CAPABILITY:
            name = torch.cuda.get_device_name(device)
            major, minor = capability
            problems.append(f"{name} has compute capability {major}.{minor}, with no FP8 matmul, and {fix}")
    try:
        _torchao_float8()
    except RuntimeError as e:
        problems.append(str(e))
    if problems:
        raise RuntimeError("--fp8 cannot run here: " + "; and ".join(problems) + ".")


def fp8_module_filter(module: nn.Module, fqn: str) -> bool:
    """nanochat's rule: a Linear whose two dims are multiples of 16 and at least 128; and lm_head never, so the
    logits (softcapped, then a softmax over the whole vocabulary) stay in plain precision like the embeddings.
    That last part is ours: nanochat HEAD's filter looks at shapes only, so its lm_head does run in FP8."""
    if not isinstance(module, nn.Linear) or _is_float8(module):
        return False
    if fqn == "lm_head" or fqn.endswith(".lm_head"):
        return False
    dims = (module.in_features, module.out_features)
    return all(d % _DIM_MULTIPLE == 0 for d in dims) and min(dims) >= _MIN_DIM


def convert_to_fp8(model: nn.Module, recipe: str = "tensorwise", *, emulate: bool = False) -> list[str]:
    """Swap the block's Linear layers for torchao Float8Linear in place (before torch.compile, as nanochat does);
    returns the converted module names. emulate=True is torchao's CPU emulation, for tests only."""
    if recipe not in FP8_RECIPES:
        raise ValueError(f"unknown FP8 recipe {recipe!r}; choose one of {', '.join(FP8_RECIPES)}")
    float8 = _torchao_float8()
    config = float8.Float8LinearConfig.from_recipe_name(recipe)
    if emulate:
        config = dataclasses.replace(config, emulate=True)
    # Keep the old modules to carry their extra attributes over (e.g. the model's `init_role`, which its
    # `_init_weights` reads): torchao builds each Float8Linear afresh and shares only weight and bias.
    originals: dict[str, nn.Module] = {}

    def keep(module: nn.Module, fqn: str) -> bool:
        if fp8_module_filter(module, fqn):
            originals[fqn] = module
            return True
        return False

    float8.convert_to_float8_training(model, config=config, module_filter_fn=keep)
    for fqn, old in originals.items():
        new = model.get_submodule(fqn)
        # torchao keeps `weight` the very Parameter of the old Linear (it wraps it only for FSDP float8
        # all-gather, which we never enable): state_dict names and values are those of the plain model, so a
        # checkpoint saves plain and loads without torchao. Should a torchao release change that, fail here.
        if new.weight is not old.weight:
            raise RuntimeError(f"torchao replaced the weight of {fqn}; its checkpoints would not be plain")
        _copy_extra_attributes(old, new)
    return list(originals)


def _copy_extra_attributes(source: nn.Module, target: nn.Module) -> None:
    for key, value in vars(source).items():
        if key not in _PLAIN_LINEAR_ATTRIBUTES and not hasattr(target, key):
            setattr(target, key, value)


def _plain_twin(fp8_module: nn.Linear) -> nn.Linear:
    twin = _plain_twins.get(fp8_module)
    if twin is None:
        # On the meta device: the twin owns no memory of its own; it takes the Float8Linear's Parameters below.
        twin = nn.Linear(fp8_module.in_features, fp8_module.out_features, bias=False, device="meta")
        _plain_twins[fp8_module] = twin
    # Re-pointed at every entry, in case the Parameters were replaced since the last one.
    twin.weight = fp8_module.weight
    twin.bias = fp8_module.bias
    twin.train(fp8_module.training)
    return twin


@contextlib.contextmanager
def fp8_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block in plain Linear layers (bf16 under autocast, else the weights' dtype), as nanochat evaluates
    with `disable_fp8`; the Float8Linear modules come back on exit. The plain layers share the weights: nothing
    is copied, and a model with no Float8Linear passes through unchanged."""
    swapped = []
    for name, module in list(model.named_modules()):
        if name and _is_float8(module):  # name "" is the model itself, which has no parent to swap it in
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            swapped.append((parent, attr, module))
            setattr(parent, attr, _plain_twin(module))
    try:
        yield model
    finally:
        for parent, attr, module in swapped:
            setattr(parent, attr, module)


__all__ = ["FP8_RECIPES", "check_fp8_support", "convert_to_fp8", "fp8_disabled", "fp8_module_filter"]
