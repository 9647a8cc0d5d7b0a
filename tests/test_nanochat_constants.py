"""nanochat's literal constants (tests/nanochat_constants.py) against the package: the config presets, the softcap
seen in a forward pass, the Polar Express coefficients, every hyper-parameter of nanochat's parameter groups, the
pretraining defaults. The model's QK scale and RoPE bases are also pinned by behaviour in test_modeling.py (the
equations oracle takes them from here), the split regex in test_tokenizer.py, the Muon maths in test_optim.py."""

import dataclasses

import pytest
import torch

from nanochat_hf import NanoChatConfig, NanoChatForCausalLM
from nanochat_hf.training.optim import POLAR_EXPRESS_COEFFS, MuonAdamW, nanochat_param_groups
from nanochat_hf.training.pretrain import PretrainArguments

from . import nanochat_constants as nc
from .conftest import tiny_config


@pytest.mark.parametrize("generation", ["2025", "2026"])
def test_config_presets_hold_nanochats_constants(generation):
    config = NanoChatConfig.from_depth(20, generation)
    assert config.final_logit_softcapping == nc.SOFTCAP
    assert config.qk_scale == nc.QK_SCALE[generation]
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": nc.ROPE_BASE[generation]}


def test_logits_are_softcapped_at_15(tiny_model_factory):
    model = tiny_model_factory("2026", seed=5)
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # raw logits far past the cap, so the cap's value shows
        ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(5))
        hidden = model.model(ids).last_hidden_state
        raw = model.lm_head(hidden)[..., : model.config.vocab_size].float()
        logits = model(ids).logits
    assert raw.abs().max() > 10 * nc.SOFTCAP
    assert (logits - nc.SOFTCAP * torch.tanh(raw / nc.SOFTCAP)).abs().max().item() <= 1e-5
    assert logits.abs().max() <= nc.SOFTCAP


def test_polar_express_coefficients_are_nanochats():
    assert POLAR_EXPRESS_COEFFS == nc.POLAR_EXPRESS


def _groups(model, **kwargs) -> dict[str, dict]:
    """nanochat_param_groups as the optimizer holds them (its defaults filled in), by name."""
    return {g["name"]: g for g in MuonAdamW(nanochat_param_groups(model, **kwargs)).param_groups}


def _assert_hyper_parameters(groups: dict[str, dict], adamw_lrs: dict[str, float], matrix_lr: float,
                             weight_decay: float) -> None:
    for name, lr in adamw_lrs.items():
        group = groups.pop(name)
        assert group["kind"] == "adamw", name
        assert group["lr"] == pytest.approx(lr, rel=1e-12), name
        for key, value in nc.ADAMW_GROUPS[name].items():
            assert group[key] == value, (name, key)
    assert groups, "no Muon groups"
    for name, group in groups.items():
        assert group["kind"] == "muon", name
        assert group["lr"] == pytest.approx(matrix_lr, rel=1e-12), name
        assert group["weight_decay"] == weight_decay, name
        for key, value in nc.MUON_GROUP.items():
            assert group[key] == value, (name, key)


def test_d20_param_groups_are_nanochats():
    """d20 at its batch of 2^20 tokens: LRs x sqrt(2^20 / 2^19), AdamW's also x (1280 / 768) ** -0.5."""
    with torch.device("meta"):
        model = NanoChatForCausalLM(NanoChatConfig.from_depth(20))
    groups = _groups(model, batch_lr_scale=2**0.5, weight_decay=0.1)
    dmodel, batch = (1280 / 768) ** -0.5, 2**0.5
    adamw_lrs = {
        "lm_head": nc.UNEMBEDDING_LR * dmodel * batch,
        "wte": nc.EMBEDDING_LR * dmodel * batch,
        "value_embeds": nc.EMBEDDING_LR * dmodel * 0.5 * batch,
        "resid_lambdas": nc.SCALAR_LR * 0.01 * batch,
        "x0_lambdas": nc.SCALAR_LR * batch,
        "smear": nc.SMEAR_LR,
    }
    assert list(groups)[:6] == list(adamw_lrs)  # nanochat's order: the AdamW groups, then Muon's by sorted shape
    shapes = {tuple(g["params"][0].shape): len(g["params"]) for g in groups.values() if g["kind"] == "muon"}
    assert list(shapes.items()) == [((10, 12), 10), ((1280, 1280), 80), ((1280, 5120), 20), ((5120, 1280), 20)]
    _assert_hyper_parameters(groups, adamw_lrs, nc.MATRIX_LR * batch, weight_decay=0.1)


@pytest.mark.parametrize("generation", ["2025", "2026"])
def test_default_param_groups_of_a_small_model_are_nanochats(generation):
    """The defaults (base_train's LRs and weight decay, batch scale 1) on a model of width 64."""
    model = NanoChatForCausalLM(tiny_config(generation))
    dmodel = (64 / 768) ** -0.5
    adamw_lrs = {"lm_head": nc.UNEMBEDDING_LR * dmodel, "wte": nc.EMBEDDING_LR * dmodel}
    if generation == "2026":
        adamw_lrs.update(value_embeds=nc.EMBEDDING_LR * dmodel * 0.5, resid_lambdas=nc.SCALAR_LR * 0.01,
                         x0_lambdas=nc.SCALAR_LR, smear=nc.SMEAR_LR)
    _assert_hyper_parameters(_groups(model), adamw_lrs, nc.MATRIX_LR, weight_decay=nc.WEIGHT_DECAY)


def test_pretraining_defaults_are_base_trains():
    defaults = dataclasses.asdict(PretrainArguments())  # the 2026 generation's, resolved from the unset fields
    assert {k: defaults[k] for k in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr", "weight_decay")} == {
        "embedding_lr": nc.EMBEDDING_LR, "unembedding_lr": nc.UNEMBEDDING_LR, "matrix_lr": nc.MATRIX_LR,
        "scalar_lr": nc.SCALAR_LR, "weight_decay": nc.WEIGHT_DECAY}
    assert (defaults["target_param_data_ratio"], defaults["warmup_steps"], defaults["warmdown_ratio"],
            defaults["final_lr_frac"], defaults["max_seq_len"]) == (12, 40, 0.65, 0.05, 2048)
