"""MuonAdamW against torch's own optimizers, its state round trip, its schedules, its compiled path against its eager
one, and DDP (2 gloo processes)."""

import copy
import datetime
import faulthandler
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import TrainingArguments

from nanochat_hf.training import optim
from nanochat_hf.training.optim import (
    FSDP_ERROR,
    MuonAdamW,
    NanoChatSchedule,
    lr_multiplier,
    muon_momentum,
    nanochat_param_groups,
    orthogonalization_dtype,
    orthogonalize,
    weight_decay_multiplier,
)
from nanochat_hf.training.pretrain import keep_local_gloo_on_loopback

from . import nanochat_constants as nc
from .conftest import tiny_config


def _matrices(seed: int, shapes) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in shapes]


def _set_grads(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (48, 48)])
def test_classic_configuration_equals_torch_muon(shape):
    ours_params = _matrices(0, [shape, shape, shape])
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in ours_params]
    ours = MuonAdamW(
        [dict(kind="muon", params=ours_params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, beta2=None,
              weight_decay=0.1)],
        orthogonalizer="newton_schulz", row_equilibration=False, renormalize=False, cautious_weight_decay=False,
        ortho_dtype=torch.bfloat16,  # torch.optim.Muon's
    )
    ref = torch.optim.Muon(ref_params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1,
                           adjust_lr_fn="original")
    for step in range(3):
        _set_grads(ours_params, step)
        _set_grads(ref_params, step)
        ours.step()
        ref.step()
        for a, b in zip(ours_params, ref_params, strict=True):
            assert (a - b).abs().max().item() <= 1e-6, f"step {step}"


def _nanochat_muon_reference(params, grads_per_step, lr, wd, momentum=0.95, beta2=0.9):
    """nanochat's Muon step (nanochat-spec §2.2, steps 1-8) restated on one stack, fp32 throughout (nanochat's
    COMPUTE_DTYPE on CPU and on GPUs without bf16), with nanochat's literal Polar Express coefficients."""
    p = torch.stack([q.detach().clone() for q in params])
    rows, cols = p.shape[-2:]
    buf = torch.zeros_like(p)
    red_dim = -1 if rows >= cols else -2
    second = torch.zeros(p.shape[0], rows, 1) if rows >= cols else torch.zeros(p.shape[0], 1, cols)
    for grads in grads_per_step:
        g = torch.stack(grads)
        buf.lerp_(g, 1 - momentum)
        g = g.lerp(buf, momentum)
        g = g * ((g.norm(dim=(-2, -1), keepdim=True) / rows**0.5) / g.norm(dim=-1, keepdim=True))  # MuonEq
        x = g.mT if rows > cols else g
        x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
        for a, b, c in nc.POLAR_EXPRESS:
            A = x @ x.mT
            x = a * x + (b * A + c * A @ A) @ x
        u = x.mT if rows > cols else x
        u = u * (min(rows, cols) ** 0.5 / u.norm(dim=(-2, -1), keepdim=True))  # Muon+
        v_mean = u.square().mean(dim=red_dim, keepdim=True)  # NorMuon
        v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * u.size(red_dim)).sqrt()
        second.lerp_(v_mean, 1 - beta2)
        step = second.clamp_min(1e-10).rsqrt()
        scaled = u * step
        u = scaled * (v_norm / scaled.norm(dim=(-2, -1), keepdim=True))
        eff_lr = lr * max(1.0, rows / cols) ** 0.5
        mask = (u * p) >= 0  # cautious weight decay
        p = p - eff_lr * u - eff_lr * wd * p * mask
    return p


@pytest.mark.parametrize("shape", [(24, 64), (64, 24), (40, 40)])
def test_default_configuration_equals_nanochat_muon(shape):
    params = _matrices(7, [shape] * 3)
    gen = torch.Generator().manual_seed(8)
    grads_per_step = [[torch.randn(shape, generator=gen) for _ in params] for _ in range(3)]
    expected = _nanochat_muon_reference(params, grads_per_step, lr=0.02, wd=0.2)
    opt = MuonAdamW([dict(kind="muon", params=params, lr=0.02, weight_decay=0.2)], ortho_dtype=torch.float32)
    for grads in grads_per_step:
        for q, g in zip(params, grads, strict=True):
            q.grad = g.clone()
        opt.step()
    assert (torch.stack([q.detach() for q in params]) - expected).abs().max().item() <= 1e-5


# wide and tall Muon groups and an AdamW group: _compiled_case's shapes (compiled graphs are shared)
FP32_CASE = (((24, 64), 3, 0.02), ((64, 24), 2, 0.03))


@pytest.mark.parametrize("compile_step", [False, True])
def test_fp32_runs_orthogonalise_in_fp32_as_nanochat(compile_step):
    """nanochat orthogonalises in its COMPUTE_DTYPE: fp32 on CPU and on GPUs without bf16. A run without bf16 (mixed
    precision "no") gets fp32, and so does an optimizer on CPU given no dtype: a step is then nanochat's fp32 step
    (measured 6e-8 off after 3 steps). The bf16 a bf16 run gets moves the same steps by ~1e-3."""
    gen = torch.Generator().manual_seed(8)
    params = {shape: _matrices(7, [shape] * count) for shape, count, _ in FP32_CASE}
    grads = {shape: [[torch.randn(shape, generator=gen) for _ in range(count)] for _ in range(3)]
             for shape, count, _ in FP32_CASE}
    expected = {shape: _nanochat_muon_reference(params[shape], grads[shape], lr=lr, wd=0.2)
                for shape, _, lr in FP32_CASE}

    def distance(ortho_dtype) -> float:
        ours = {shape: [torch.nn.Parameter(p.detach().clone()) for p in ps] for shape, ps in params.items()}
        groups = [dict(kind="muon", params=ours[shape], lr=lr, weight_decay=0.2) for shape, _, lr in FP32_CASE]
        opt = MuonAdamW(groups, ortho_dtype=ortho_dtype, compile_step=compile_step)
        for step in range(3):
            for shape, ps in ours.items():
                for p, g in zip(ps, grads[shape][step], strict=True):
                    p.grad = g.clone()
            opt.step()
        return max((torch.stack([p.detach() for p in ps]) - expected[shape]).abs().max().item()
                   for shape, ps in ours.items())

    assert distance(orthogonalization_dtype("no")) <= 1e-6
    assert distance(None) <= 1e-6
    assert distance(orthogonalization_dtype("bf16")) > 1e-4


NANOCHAT_CHECKOUT = Path(os.environ.get("NANOCHAT_CHECKOUT", Path(__file__).resolve().parents[2] / "nanochat"))
# Steps nanochat's own MuonAdamW (argv: case file, result file) on the case's parameters and gradients.
NANOCHAT_STEPS = """
import sys, torch
from nanochat.common import COMPUTE_DTYPE
from nanochat.optim import MuonAdamW
assert COMPUTE_DTYPE == torch.float32, COMPUTE_DTYPE
case = torch.load(sys.argv[1])
params = [torch.nn.Parameter(p.clone()) for p in case["params"]]
groups = [dict(g, params=[params[i] for i in g["params"]]) for g in case["groups"]]
opt = MuonAdamW(groups)
for grads in case["grads"]:
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
torch.save([p.detach() for p in params], sys.argv[2])
"""


def test_steps_like_nanochats_own_optimizer(tmp_path):
    """nanochat's MuonAdamW itself, from a checkout (NANOCHAT_CHECKOUT, default ../nanochat), run by this interpreter
    as on CPU (COMPUTE_DTYPE fp32; eager: TORCHDYNAMO_DISABLE, the same maths as its compiled kernels) against ours
    as an fp32 run builds it: Muon groups wide, tall and square, AdamW groups, 3 steps. The tests above re-state
    nanochat's step; this one needs no re-statement, and is skipped without a checkout."""
    if not (NANOCHAT_CHECKOUT / "nanochat" / "optim.py").is_file():
        pytest.skip(f"no nanochat checkout at {NANOCHAT_CHECKOUT}: set NANOCHAT_CHECKOUT to one (karpathy/nanochat)")
    shapes = [(24, 64)] * 3 + [(64, 24)] * 2 + [(40, 40)] * 2 + [(10, 7), (5,)]
    muon = dict(kind="muon", momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.2)
    groups = [dict(muon, params=[0, 1, 2], lr=0.02), dict(muon, params=[3, 4], lr=0.03),
              dict(muon, params=[5, 6], lr=0.01),
              dict(kind="adamw", params=[7, 8], lr=3e-3, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.05)]
    params = _matrices(11, shapes)
    gen = torch.Generator().manual_seed(12)
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    torch.save({"params": [p.detach() for p in params], "groups": groups, "grads": grads}, tmp_path / "case.pt")
    env = {k: v for k, v in os.environ.items() if k != "NANOCHAT_DTYPE"}
    env.update(PYTHONPATH=str(NANOCHAT_CHECKOUT), TORCHDYNAMO_DISABLE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", NANOCHAT_STEPS, str(tmp_path / "case.pt"), str(tmp_path / "out.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    theirs = torch.load(tmp_path / "out.pt")

    opt = MuonAdamW([dict(g, params=[params[i] for i in g["params"]]) for g in groups],
                    ortho_dtype=orthogonalization_dtype("no"))
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
    for p, q, start in zip(params, theirs, torch.load(tmp_path / "case.pt")["params"], strict=True):
        assert (p.detach() - q).abs().max().item() <= 1e-6, tuple(p.shape)
        assert (q - start).abs().max().item() > 1e-3  # it moved


@pytest.mark.parametrize("bf16, accelerate, expected", [
    (False, None, torch.float32), (True, None, torch.bfloat16), (False, "bf16", torch.bfloat16),
    (False, "no", torch.float32), (False, "fp16", torch.float32)])
def test_the_runs_mixed_precision_picks_the_orthogonalisation_dtype(tmp_path, monkeypatch, bf16, accelerate,
                                                                    expected):
    """The stages pass `orthogonalization_dtype(training_args.mixed_precision)`: bf16 from --bf16 or from the
    accelerate config (ACCELERATE_MIXED_PRECISION), fp32 otherwise (fp16 too: nanochat keeps fp16 runs' iteration
    in fp32, fp16's range is too narrow for it)."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    if accelerate is not None:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", accelerate)
    args = TrainingArguments(output_dir=str(tmp_path), bf16=bf16, use_cpu=True, report_to="none")
    assert orthogonalization_dtype(args.mixed_precision) == expected
    with pytest.raises(ValueError, match="mixed precision 'fp8x'"):
        orthogonalization_dtype("fp8x")


def test_the_stages_factories_hand_the_dtype_to_muon():
    from nanochat_hf import NanoChatForCausalLM
    from nanochat_hf.training.pretrain import NanoChatOptimizerFactory
    from nanochat_hf.training.trl_support import FinetuneOptimizerFactory

    model = NanoChatForCausalLM(tiny_config("2026"))
    for factory in (NanoChatOptimizerFactory(), FinetuneOptimizerFactory()):
        for dtype in (torch.float32, torch.bfloat16):
            assert factory(model, ortho_dtype=dtype, weight_decay=0.1).ortho_dtype is dtype


def test_adamw_groups_equal_torch_adamw():
    ours_params = _matrices(1, [(10, 7), (5,)])
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in ours_params]
    ours = MuonAdamW([dict(kind="adamw", params=ours_params, lr=3e-3, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.05)])
    ref = torch.optim.AdamW(ref_params, lr=3e-3, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.05)
    for step in range(5):
        _set_grads(ours_params, 10 + step)
        _set_grads(ref_params, 10 + step)
        ours.step()
        ref.step()
    for a, b in zip(ours_params, ref_params, strict=True):
        assert (a - b).abs().max().item() <= 1e-6


def test_polar_express_orthogonalizes():
    g = torch.randn(3, 64, 160, generator=torch.Generator().manual_seed(2))
    u = orthogonalize(g, 5, "polar_express", torch.float32)
    s = torch.linalg.svdvals(u)
    assert s.max() < 1.3 and s.min() > 0.5  # close to a semi-orthogonal matrix, as nanochat's test expects
    tall = orthogonalize(g.mT, 5, "polar_express", torch.float32)
    assert torch.allclose(tall, u.mT, atol=1e-5)


def test_cautious_weight_decay_only_where_update_and_weight_share_a_sign():
    """nanochat: `mask = g * p >= 0; p -= lr * g + lr * wd * p * mask` with g the update (subtracted), p the weight
    before the step and lr the shape-adjusted LR. Two optimizers, with and without decay, take the same update."""
    shape, lr, wd = (48, 16), 0.01, 0.5  # tall: the decay is scaled by the adjusted LR, lr * sqrt(48 / 16)
    # fp64, so that rounding stays far below the smallest decay term
    plain, decayed = ([torch.nn.Parameter(p.detach().double()) for p in _matrices(3, [shape])] for _ in range(2))
    start = plain[0].detach().clone()
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for params, decay in ((plain, 0.0), (decayed, wd)):
        params[0].grad = grad.clone()
        MuonAdamW([dict(kind="muon", params=params, lr=lr, weight_decay=decay)]).step()
    update = start - plain[0].detach()  # lr * g
    decay_applied = plain[0].detach() - decayed[0].detach()  # lr * wd * p * mask
    same_sign = update * start >= 0
    assert 0.2 < same_sign.float().mean() < 0.8  # both kinds of entries are well represented
    expected = lr * math.sqrt(48 / 16) * wd * start * same_sign
    assert (decay_applied - expected).abs().max().item() <= 1e-15


def test_nanochat_groups_cover_every_parameter_with_scaled_lrs():
    from nanochat_hf import NanoChatForCausalLM

    model = NanoChatForCausalLM(tiny_config("2026"))  # hidden 64
    groups = nanochat_param_groups(model, batch_lr_scale=2.0)
    by_name = {g["name"]: g for g in groups}
    scale = (64 / 768) ** -0.5
    assert math.isclose(by_name["lm_head"]["lr"], 0.008 * scale * 2.0)
    assert math.isclose(by_name["wte"]["lr"], 0.3 * scale * 2.0)
    assert math.isclose(by_name["value_embeds"]["lr"], 0.3 * scale * 0.5 * 2.0)
    assert math.isclose(by_name["smear"]["lr"], 0.2)  # the smear group is not batch-scaled
    muon = [g for g in groups if g["kind"] == "muon"]
    assert all(len({tuple(p.shape) for p in g["params"]}) == 1 for g in muon)
    ve_gate = model.model.layers[1].self_attn.ve_gate.weight
    assert any(ve_gate is p for g in muon for p in g["params"])  # ve_gate matrices are Muon's, as in nanochat
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(model.parameters()))
    MuonAdamW(groups)  # constructs


def _train(model, groups_kwargs: dict, steps: int, seed: int = 0, **optimizer_kwargs):
    opt = MuonAdamW(nanochat_param_groups(model, **groups_kwargs), **optimizer_kwargs)
    sched = NanoChatSchedule(opt, total_steps=steps, warmup_steps=2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 300, (2, 16), generator=gen)
        model(ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return opt, sched


def test_state_dict_round_trip_resumes_exactly(tiny_model_factory):
    straight = tiny_model_factory("2026", seed=1).train()
    opt, sched = _train(straight, {}, steps=3)
    snapshot = (copy.deepcopy(straight.state_dict()), copy.deepcopy(opt.state_dict()),
                copy.deepcopy(sched.state_dict()))
    gen = torch.Generator().manual_seed(99)
    batches = [torch.randint(0, 300, (2, 16), generator=gen) for _ in range(3)]
    for ids in batches:
        straight(ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    resumed = tiny_model_factory("2026", seed=7).train()
    resumed.load_state_dict(snapshot[0])
    opt2 = MuonAdamW(nanochat_param_groups(resumed))
    opt2.load_state_dict(snapshot[1])
    sched2 = NanoChatSchedule(opt2, total_steps=3, warmup_steps=2)
    sched2.load_state_dict(snapshot[2])
    for ids in batches:
        resumed(ids, labels=ids).loss.backward()
        opt2.step()
        sched2.step()
        opt2.zero_grad(set_to_none=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_cpu_chunks_step_exactly_like_whole_stacks(tiny_model_factory, monkeypatch, param_dtype):
    """On CPU a Muon group is updated a few matrices at a time; the result must not depend on the chunk size.
    Bit for bit where the iteration rounds to bf16. (In fp32, batched and 2-D matmuls with a scale round apart by
    an ulp, which AdamW's 1/sqrt(v) then magnifies; the fp32 tests compare both paths with nanochat's step.)"""
    results = []
    for per_update in (1000, 1):  # the whole stack at once, then one matrix at a time
        monkeypatch.setattr(optim, "CPU_MATRICES_PER_UPDATE", per_update)
        model = tiny_model_factory("2026", seed=3).to(param_dtype).train()
        opt, _ = _train(model, {}, steps=3, ortho_dtype=torch.bfloat16)
        results.append((model.state_dict(), opt.state_dict()["state"]))
    (params_a, state_a), (params_b, state_b) = results
    for name, a in params_a.items():
        assert torch.equal(a, params_b[name]), name
    for key, a in state_a.items():
        for field, value in a.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state_b[key][field])), (key, field)


def test_buffers_kept_across_steps_change_nothing(tiny_model_factory, monkeypatch):
    """On CPU the Muon temporaries are kept from step to step and shared by groups of one shape; a step must come
    out exactly as with fresh temporaries every time (as on GPU)."""
    results = []
    for keep in (True, False):
        if not keep:
            monkeypatch.setattr(MuonAdamW, "_buffer", lambda self, name, shape, dtype, device: torch.full(
                shape, float("nan"), dtype=dtype, device=device))  # nan: a read before a write would show
        model = tiny_model_factory("2026", seed=4).train()
        opt, _ = _train(model, {}, steps=3)
        assert bool(opt._scratch) == keep
        results.append(model.state_dict())
    for name, a in results[0].items():
        assert torch.equal(a, results[1][name]), name


def test_step_accepts_a_closure():
    (p,) = _matrices(6, [(8, 8)])
    opt = MuonAdamW([dict(kind="muon", params=[p], lr=0.01)])

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and loss.item() > 0


def test_bad_groups_are_rejected():
    a, b = _matrices(7, [(4, 4), (4, 8)])
    with pytest.raises(ValueError, match="one shape"):
        MuonAdamW([dict(kind="muon", params=[a, b], lr=0.1)])
    with pytest.raises(ValueError, match="unknown group kind"):
        MuonAdamW([dict(kind="sgd", params=[a], lr=0.1)])


def test_schedules():
    total = 1000
    assert lr_multiplier(0, total) == 1 / 40 and lr_multiplier(39, total) == 1.0
    assert lr_multiplier(350, total) == 1.0  # constant until the last 65%
    assert math.isclose(lr_multiplier(total, total), 0.05)
    assert lr_multiplier(700, total) < lr_multiplier(500, total) < 1.0
    assert muon_momentum(0, total) == 0.85 and math.isclose(muon_momentum(400, 10_000), 0.97)
    assert math.isclose(muon_momentum(total, total), 0.90)
    assert weight_decay_multiplier(0, total) == 1.0 and weight_decay_multiplier(total, total) < 1e-12


# nanochat's get_muon_momentum (base_train.py, warmdown_ratio 0.65), worked out by hand: below step 400 the warmup
# (1 - s/400) * 0.85 + s/400 * 0.97 wins, even inside the warmdown; from 400 it is 0.97, and in the warmdown (from
# num_iterations - round(0.65 * num_iterations)) 0.97 -> 0.90.
NANOCHAT_MUON_MOMENTUM = {  # (num_iterations, step): momentum
    (100, 0): 0.85, (100, 35): 0.8605, (100, 50): 0.865, (100, 99): 0.8797, (100, 100): 0.88,
    (300, 105): 0.8815, (300, 250): 0.925, (300, 299): 0.9397,
    (399, 200): 0.91, (399, 398): 0.9694, (399, 399): 0.9697,
    (400, 140): 0.892, (400, 399): 0.9697, (400, 400): 0.90,
    (1000, 349): 0.9547, (1000, 399): 0.9697, (1000, 400): 0.97 - 0.07 * 50 / 650,
    (1000, 500): 0.97 - 0.07 * 150 / 650, (1000, 999): 0.97 - 0.07 * 649 / 650, (1000, 1000): 0.90,
}


def test_muon_momentum_is_nanochats_on_short_and_long_runs():
    for (total, step), expected in NANOCHAT_MUON_MOMENTUM.items():
        assert math.isclose(muon_momentum(step, total), expected, abs_tol=1e-12), (total, step)
    (p,) = _matrices(0, [(4, 4)])
    opt = MuonAdamW([dict(kind="muon", params=[p], lr=0.02)])
    schedule = NanoChatSchedule(opt, total_steps=300)
    for _ in range(250):
        schedule.step()
    assert math.isclose(opt.param_groups[0]["momentum"], 0.925, abs_tol=1e-12)  # the schedule uses it


# ---------------------------------------------------------------------------------------------------------------
# the compiled path (torch.compile, forced on CPU here; the default on CUDA)

CONFIGURATIONS = {
    "default": ({}, 0.9),  # orthogonalises in fp32 (CPU)
    "classic": (dict(orthogonalizer="newton_schulz", row_equilibration=False, renormalize=False,
                     cautious_weight_decay=False, ortho_dtype=torch.bfloat16), None),
}
# Muon groups of two shapes (wide, tall) and an AdamW group (a matrix and a vector)
COMPILED_CASE_SHAPES = [(24, 64)] * 3 + [(64, 24)] * 2 + [(10, 7), (5,)]
# In bf16 (classic) both paths orthogonalise an input that comes out bit for bit the same (the compiled graph rounds
# and fuses multiply-adds where eager does; see optim._compiled): what remains is fp32 rounding in the fused update
# and reductions, measured at <= 9e-8 after 3 steps (4 seeds). One flipped bf16 input would move a parameter by
# ~1e-4 and a mistake in the maths by more, both far above the tolerance. In fp32 (default) only rounding differs.
COMPILED_TOLERANCE = 1e-6


def _compiled_case(configuration: str, compile_step: bool, seed: int = 0):
    kwargs, beta2 = CONFIGURATIONS[configuration]
    params = _matrices(seed, COMPILED_CASE_SHAPES)
    groups = [dict(kind="muon", params=params[:3], lr=0.02, weight_decay=0.2, beta2=beta2),
              dict(kind="muon", params=params[3:5], lr=0.03, weight_decay=0.2, beta2=beta2),
              dict(kind="adamw", params=params[5:], lr=3e-3, weight_decay=0.05)]
    opt = MuonAdamW(groups, compile_step=compile_step, **kwargs)
    # the schedule changes every group's lr and the Muon groups' momentum and weight decay at every step
    return params, opt, NanoChatSchedule(opt, total_steps=6, warmup_steps=2)


def _run_steps(params, opt, sched, steps) -> None:
    for step in steps:
        _set_grads(params, 100 + step)
        opt.step()
        sched.step()


def _spy_compiled(monkeypatch) -> list[str]:
    """The names of the functions that go through torch.compile from now on."""
    calls, real = [], optim._compiled
    monkeypatch.setattr(optim, "_compiled", lambda fn, *a, **kw: calls.append(fn.__name__) or real(fn, *a, **kw))
    return calls


@pytest.mark.parametrize("configuration", ["default", "classic"])
def test_compiled_path_steps_like_the_eager_one(configuration, monkeypatch):
    calls = _spy_compiled(monkeypatch)
    results = []
    for compile_step in (False, True):
        params, opt, sched = _compiled_case(configuration, compile_step)
        start = [p.detach().clone() for p in params]
        _run_steps(params, opt, sched, range(3))
        results.append((params, opt.state_dict()["state"]))
        assert set(calls) == ({"adamw_update", "muon_prepare", "_iterate", "muon_finish"} if compile_step else set())
    (eager, eager_state), (compiled, compiled_state) = results
    for a, b, s in zip(eager, compiled, start, strict=True):
        assert (a - b).abs().max().item() <= COMPILED_TOLERANCE, tuple(a.shape)
        assert (b - s).abs().max().item() > 100 * COMPILED_TOLERANCE  # it moved, by far more than the tolerance
    for key, state in eager_state.items():
        for field, value in state.items():
            diff = (torch.as_tensor(value) - torch.as_tensor(compiled_state[key][field])).abs().max().item()
            assert diff <= COMPILED_TOLERANCE, (key, field)


def test_compiled_path_recompiles_nothing_when_the_schedule_moves():
    from torch._dynamo.utils import counters

    params, opt, sched = _compiled_case("default", compile_step=True)
    _run_steps(params, opt, sched, range(1))  # compiles (or finds what an earlier test compiled)
    graphs = counters["stats"]["unique_graphs"]
    seen = set()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(1, 4):
            seen.add(tuple((g["lr"], g.get("momentum"), g["weight_decay"]) for g in opt.param_groups))
            _run_steps(params, opt, sched, [step])
    assert len(seen) == 3  # lr, momentum and weight decay took new values at every step...
    assert counters["stats"]["unique_graphs"] == graphs  # ...and no graph was compiled for them


@pytest.mark.parametrize("first, then", [(False, True), (True, False)])
def test_checkpoints_resume_across_the_two_paths(first, then):
    straight, opt, sched = _compiled_case("default", compile_step=False)
    _run_steps(straight, opt, sched, range(4))

    params, opt, sched = _compiled_case("default", compile_step=first)
    _run_steps(params, opt, sched, range(2))
    snapshot = copy.deepcopy(([p.detach() for p in params], opt.state_dict(), sched.state_dict()))
    resumed, opt, sched = _compiled_case("default", compile_step=then, seed=1)
    with torch.no_grad():
        for p, saved in zip(resumed, snapshot[0], strict=True):
            p.copy_(saved)
    opt.load_state_dict(snapshot[1])
    sched.load_state_dict(snapshot[2])
    _run_steps(resumed, opt, sched, range(2, 4))
    for a, b in zip(straight, resumed, strict=True):
        assert (a - b).abs().max().item() <= COMPILED_TOLERANCE, tuple(a.shape)


# ---------------------------------------------------------------------------------------------------------------
# distributed


ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ddp(tmp_path, world: int, steps: int) -> dict:
    """Train `steps` steps with `world` ranks (tests/ddp_muon_worker.py); returns rank 0's params and optimizer state.

    Two ranks go through `accelerate launch` with the cpu_2proc config: the TCP rendezvous that torchrun sets up for
    every multi-process training run (a file:// store hung for good on CI's file system). A stuck run is killed
    with its whole process group and fails with the ranks' stacks instead of hanging the suite.
    """
    out = tmp_path / f"world{world}.pt"
    worker = ["-m", "tests.ddp_muon_worker", str(out), str(steps)]
    if world == 1:
        argv = [sys.executable, *worker]
    else:
        argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"), "--num_processes", str(world),
                "--main_process_port", str(_free_port()), *worker]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{world}-process DDP run did not finish in 300 s:\n{output[-6000:]}")
    assert proc.returncode == 0, output[-6000:]
    return torch.load(out)


def test_ddp_two_processes_equal_one(tmp_path):
    one = _run_ddp(tmp_path, 1, steps=4)
    two = _run_ddp(tmp_path, 2, steps=4)
    for name, a in one["params"].items():
        assert (a - two["params"][name]).abs().max().item() <= 1e-6, name
    # every rank keeps the full state: rank 0's checkpoint has momentum for every Muon stack
    muon_states = [s for s in two["optim"]["state"].values() if "momentum_buffer" in s]
    groups = [g for g in two["optim"]["param_groups"] if g["kind"] == "muon"]
    assert len(muon_states) == len(groups)


def _compiled_ddp_worker(rank: int, port: int, result_file: str) -> None:
    """One of two ranks stepping the compiled case (the same gradients on both, as DDP leaves them); records the
    stacks this rank orthogonalised."""
    faulthandler.dump_traceback_later(240, exit=True)  # a stuck rank prints its stack and exits instead of hanging
    keep_local_gloo_on_loopback()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    shares, real = [], optim._compiled
    optim._compiled = lambda fn, *a, **kw: (fn is optim._iterate and shares.append(tuple(a[0].shape))) or real(
        fn, *a, **kw)
    params, opt, sched = _compiled_case("default", compile_step=True)
    _run_steps(params, opt, sched, range(3))
    if rank == 0:
        torch.save({"params": [p.detach() for p in params], "shares": shares}, result_file)
    dist.barrier()
    dist.destroy_process_group()


def test_compiled_path_under_ddp_orthogonalises_a_share_per_rank(tmp_path):
    result = tmp_path / "rank0.pt"
    mp.start_processes(_compiled_ddp_worker, args=(_free_port(), str(result)), nprocs=2, join=True,
                       start_method="spawn")
    two = torch.load(result)
    # 3 and 2 matrices over 2 ranks: shares of 2 and 1, compiled on each rank; the all-gather in between is eager
    assert two["shares"] == [(2, 24, 64), (1, 64, 24)] * 3
    one, opt, sched = _compiled_case("default", compile_step=False)
    _run_steps(one, opt, sched, range(3))
    for a, b in zip(one, two["params"], strict=True):
        assert (a - b).abs().max().item() <= COMPILED_TOLERANCE, tuple(a.shape)


def _fsdp_worker(rank: int, port: int, result_file: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    keep_local_gloo_on_loopback()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=1,
                            timeout=datetime.timedelta(seconds=120))
    mesh = init_device_mesh("cpu", (1,))
    weight = torch.nn.Parameter(distribute_tensor(torch.randn(8, 8), mesh, [Shard(0)]))
    try:
        MuonAdamW([dict(kind="muon", params=[weight], lr=0.02)])
        message = "no error"
    except RuntimeError as err:
        message = str(err)
    with open(result_file, "w") as f:
        f.write(message)
    dist.destroy_process_group()


def test_fsdp_sharded_matrices_are_refused_with_a_fix(tmp_path):
    result = tmp_path / "result.txt"
    mp.start_processes(_fsdp_worker, args=(_free_port(), str(result)), nprocs=1, join=True,
                       start_method="spawn")
    assert result.read_text() == FSDP_ERROR
    assert "ddp_8gpu.yaml" in FSDP_ERROR
