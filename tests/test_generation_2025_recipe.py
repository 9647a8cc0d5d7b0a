"""A 2025-generation model trains with nanochat ORIG's (3a5e0bc) own recipe, in every stage; a 2026 one with HEAD's.

ORIG (nanochat-spec.md §2.1, §8.1): AdamW for lm_head (0.004) and wte (0.2), both x (d/768)^-0.5, betas (0.8, 0.95),
eps 1e-10, no weight decay; Muon (Keller Jordan's Newton-Schulz, Nesterov, momentum 0.95, lr 0.02 x
max(1, rows/cols)^0.5, nothing else) with its momentum 0.85 -> 0.95 over 300 steps; LR constant, then linear to 0
over the last 20%, no warmup; ratio 20 over every parameter at a fixed batch of 524,288 tokens. The plan's numbers
for d20/d32 are in test_training_plan.py.
"""

import contextlib
import io
import json
import math

import pytest
import torch
from transformers import HfArgumentParser

from nanochat_hf import NanoChatForCausalLM
from nanochat_hf.data.embedded import embedded_corpus
from nanochat_hf.errors import UsageError
from nanochat_hf.tokenizer.bpe import train_tokenizer
from nanochat_hf.training.midtrain import parse_midtrain_args
from nanochat_hf.training.optim import MuonAdamW, NanoChatSchedule, nanochat_2025_param_groups
from nanochat_hf.training.pretrain import (
    NanoChatOptimizerFactory,
    PretrainArguments,
    PretrainTrainer,
    parse_args,
    train,
)
from nanochat_hf.training.trl_support import FinetuneOptimizerFactory

from .conftest import tiny_config
from .test_optim import _set_grads

ORIG_SWITCHES = dict(orthogonalizer="newton_schulz", row_equilibration=False, renormalize=False,
                     cautious_weight_decay=False)


def _switches(optimizer: MuonAdamW) -> dict:
    return {key: getattr(optimizer, key) for key in ORIG_SWITCHES}


def _by_name(optimizer: MuonAdamW) -> dict[str, dict]:
    return {g["name"]: g for g in optimizer.param_groups}


def _assert_orig_groups(optimizer: MuonAdamW, width: int, lr_frac: float = 1.0) -> None:
    groups = _by_name(optimizer)
    dmodel = (width / 768) ** -0.5
    assert [name for name, g in groups.items() if g["kind"] == "adamw"] == ["lm_head", "wte"]
    for name, lr in (("lm_head", 0.004 * dmodel * lr_frac), ("wte", 0.2 * dmodel * lr_frac)):
        group = groups[name]
        assert group["lr"] == pytest.approx(lr, rel=1e-12) and group["initial_lr"] == group["lr"], name
        assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.8, 0.95), 1e-10, 0.0), name
    muon = [g for g in groups.values() if g["kind"] == "muon"]
    assert muon
    for group in muon:
        assert group["lr"] == pytest.approx(0.02 * lr_frac, rel=1e-12)
        assert (group["momentum"], group["nesterov"], group["ns_steps"], group["beta2"], group["weight_decay"]) == (
            0.95, True, 5, None, 0.0)
    assert _switches(optimizer) == ORIG_SWITCHES


# ---------------------------------------------------------------------------------------------------------------
# the optimizer every stage builds


def test_a_2025_model_gets_origs_optimizer_from_the_stages_factory():
    model = NanoChatForCausalLM(tiny_config("2025"))  # width 64, no scalars, value embeddings or smear
    # pretraining hands over HEAD's keyword arguments too: those a 2025 model has no use for are ignored
    optimizer = NanoChatOptimizerFactory()(model, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02,
                                           scalar_lr=0.5, weight_decay=0.0, batch_lr_scale=1.0)
    _assert_orig_groups(optimizer, width=64)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    _assert_orig_groups(NanoChatOptimizerFactory()(model), width=64)  # ORIG's LRs are the defaults


def test_finetuning_a_2025_model_scales_origs_groups():
    """SFT and RL (FinetuneOptimizerFactory, the kwargs of their recipes) get ORIG's optimizer, LRs x init_lr_frac."""
    model = NanoChatForCausalLM(tiny_config("2025"))
    optimizer = FinetuneOptimizerFactory()(model, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02,
                                           scalar_lr=0.5, weight_decay=0.0, init_lr_frac=0.02)
    _assert_orig_groups(optimizer, width=64, lr_frac=0.02)


def test_a_2025_model_refuses_weight_decay_and_parameters_orig_has_no_group_for():
    model = NanoChatForCausalLM(tiny_config("2025"))
    with pytest.raises(ValueError, match="ORIG's Muon, which has no weight decay"):
        NanoChatOptimizerFactory()(model, weight_decay=0.1)
    with_value_embeds = NanoChatForCausalLM(tiny_config("2025", value_embeds=True))
    with pytest.raises(ValueError, match="no group for .*value_embeds"):
        nanochat_2025_param_groups(with_value_embeds)


def test_a_2026_model_still_gets_heads_optimizer():
    model = NanoChatForCausalLM(tiny_config("2026"))
    optimizer = NanoChatOptimizerFactory()(model, weight_decay=0.1)
    groups = _by_name(optimizer)
    assert {"value_embeds", "resid_lambdas", "x0_lambdas", "smear"} <= set(groups)
    assert groups["lm_head"]["betas"] == (0.8, 0.96) and groups["wte"]["betas"] == (0.8, 0.995)
    assert groups["lm_head"]["lr"] == pytest.approx(0.008 * (64 / 768) ** -0.5, rel=1e-12)
    assert all(g["beta2"] == 0.9 and g["weight_decay"] == 0.1 for g in groups.values() if g["kind"] == "muon")
    assert _switches(optimizer) == dict(orthogonalizer="polar_express", row_equilibration=True, renormalize=True,
                                        cautious_weight_decay=True)


def test_origs_muon_steps_like_torch_optim_muon(tiny_model_factory):
    """The 2025 optimizer's Muon groups, three steps, against torch.optim.Muon (Keller Jordan's default Newton-Schulz
    coefficients, 5 steps, bf16), as test_optim's oracle does for MuonAdamW's classic configuration."""
    model = tiny_model_factory("2025")
    optimizer = NanoChatOptimizerFactory()(model, ortho_dtype=torch.bfloat16)  # torch.optim.Muon's dtype
    ours = [p for g in optimizer.param_groups if g["kind"] == "muon" for p in g["params"]]
    assert {tuple(p.shape) for p in ours} == {(64, 64), (32, 64), (256, 64), (64, 256)}  # wide, tall and square
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    reference = torch.optim.Muon(theirs, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0,
                                 adjust_lr_fn="original")
    for step in range(3):
        _set_grads(ours, step)
        _set_grads(theirs, step)
        optimizer.step()
        reference.step()
        for a, b in zip(ours, theirs, strict=True):
            assert (a - b).abs().max().item() <= 1e-6, f"step {step}"


# ---------------------------------------------------------------------------------------------------------------
# the pretraining arguments: each generation's base_train defaults


def test_unset_pretraining_arguments_take_the_generations_defaults():
    fields = ("target_param_data_ratio", "total_batch_size", "embedding_lr", "unembedding_lr", "matrix_lr",
              "weight_decay", "warmup_steps", "warmdown_ratio", "final_lr_frac")

    def resolved(*argv: str) -> tuple:
        args = parse_args(list(argv))
        return tuple(getattr(args, name) for name in fields)

    assert resolved() == (12, -1, 0.3, 0.008, 0.02, 0.28, 40, 0.65, 0.05)  # HEAD's base_train
    assert resolved("--generation", "2025") == (20, 524_288, 0.2, 0.004, 0.02, 0.0, 0, 0.2, 0.0)  # ORIG's
    explicit = resolved("--generation", "2025", "--warmup_steps", "5", "--total_batch_size", "-1")
    assert explicit[1] == -1 and explicit[6] == 5
    with pytest.raises(UsageError, match="--weight_decay 0.1: generation 2025"):
        parse_args(["--generation", "2025", "--weight_decay", "0.1"])
    text = " ".join(HfArgumentParser(PretrainArguments).format_help().split())
    assert "unset: 0.2 for generation 2025 (nanochat ORIG's), 0.3 for 2026 (HEAD's)" in text
    assert "unset: 0.2 for generation 2025 (nanochat ORIG's), 0.65 for 2026 (HEAD's)" in text


def test_midtraining_defaults_are_unchanged():
    args = parse_midtrain_args([])
    assert (args.total_batch_size, args.embedding_lr, args.unembedding_lr, args.matrix_lr, args.weight_decay,
            args.warmup_steps, args.warmdown_ratio, args.final_lr_frac, args.target_param_data_ratio) == (
        524_288, 0.2, 0.004, 0.02, 0.0, 0, 0.2, 0.0, 12)


# ---------------------------------------------------------------------------------------------------------------
# a real run


@pytest.fixture(scope="module")
def orig_run(tmp_path_factory):
    """Pretrain a d2 2025 model (vocab 512, width 128: 524,288 parameters, 458,752 of them HEAD's scaling ones) with
    the generation's defaults but a 1,024-token batch and a ratio of 0.006: ORIG's count gives
    int(0.006 x 524,288) // 1,024 = 3 steps, HEAD's would give 2. Returns the trainer, the printed plan, the log."""
    root = tmp_path_factory.mktemp("orig")
    docs = list(embedded_corpus(max_chars=150_000))
    (root / "corpus").mkdir()
    for i in range(2):
        with open(root / "corpus" / f"shard_{i}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs[i::2])
    train_tokenizer(embedded_corpus(max_chars=100_000), vocab_size=512, show_progress=False).save_pretrained(
        root / "tokenizer")
    argv = ["--generation", "2025", "--output_dir", str(root / "run"), "--tokenizer", str(root / "tokenizer"),
            "--dataset", str(root / "corpus"), "--depth", "2", "--head_dim", "32", "--max_seq_len", "128",
            "--device_batch_size", "4", "--total_batch_size", "1024", "--target_param_data_ratio", "0.006",
            "--eval_every", "-1", "--log_every", "1", "--num_workers", "0"]
    seen = {}
    original = PretrainTrainer.train

    def keep(self, *args, **kwargs):
        seen["trainer"] = self
        return original(self, *args, **kwargs)

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(PretrainTrainer, "train", keep)
        train(parse_args(argv))
    line = next(line for line in printed.getvalue().splitlines() if line.startswith("[pretrain]"))
    plan = json.loads(line.split(" plan ", 1)[1])
    return seen["trainer"], plan, root / "run"


def test_a_2025_pretraining_run_follows_origs_plan_and_optimizer(orig_run):
    trainer, plan, out = orig_run
    assert trainer.model.config.generation == "2025" and trainer.model.num_parameters() == 524_288
    assert plan["recipe"] == "nanochat ORIG (3a5e0bc)"
    assert (plan["scaling_params"], plan["num_iterations"], plan["total_batch_size"]) == (524_288, 3, 1024)
    assert (plan["batch_lr_scale"], plan["weight_decay"]) == (1.0, 0.0)
    assert trainer.state.global_step == 3
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # under Accelerate's wrapper
    _assert_orig_groups_after_run(optimizer)
    schedule = trainer.lr_scheduler
    assert (type(schedule), schedule.momentum_schedule, schedule.weight_decay_schedule) == (NanoChatSchedule,
                                                                                            "warmup", False)
    assert (schedule.warmup_steps, schedule.warmdown_ratio, schedule.final_lr_frac) == (0, 0.2, 0.0)
    # the LR each step ran at (lm_head's): no warmup (HEAD's would start at 1/40 of it), and the one warmdown step,
    # round(0.2 x 3), takes the LR to 0 only after the last one
    lm_head = 0.004 * (128 / 768) ** -0.5
    logged = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    assert logged == pytest.approx([lm_head] * 3, rel=1e-12)
    assert schedule.get_last_lr()[0] == 0.0
    assert len((out / "losses.jsonl").read_text().splitlines()) == 3


def _assert_orig_groups_after_run(optimizer: MuonAdamW) -> None:
    assert _switches(optimizer) == ORIG_SWITCHES
    groups = _by_name(optimizer)
    dmodel = (128 / 768) ** -0.5
    assert groups["lm_head"]["initial_lr"] == pytest.approx(0.004 * dmodel, rel=1e-12)
    assert groups["wte"]["initial_lr"] == pytest.approx(0.2 * dmodel, rel=1e-12)
    assert all(g["betas"] == (0.8, 0.95) and g["weight_decay"] == 0.0 for g in groups.values() if g["kind"] == "adamw")
    muon = [g for g in groups.values() if g["kind"] == "muon"]
    assert all(g["initial_lr"] == 0.02 and g["beta2"] is None and g["weight_decay"] == 0.0 for g in muon)
    assert all(math.isclose(g["momentum"], 0.851, abs_tol=1e-12) for g in muon)  # 0.85 + 0.10 x 3 / 300


def test_the_2025_pretraining_schedule_is_origs(orig_run):
    """The trainer's own schedule over 1,000 steps: LR 1 at step 0 and at the 80% boundary, then linear to 0;
    Muon momentum 0.85 -> 0.95 over 300 steps, then held; the weight decay stays 0."""
    trainer, _, _ = orig_run
    optimizer = NanoChatOptimizerFactory()(NanoChatForCausalLM(tiny_config("2025")))
    trainer.lr_scheduler = None
    schedule = trainer.create_scheduler(1000, optimizer)
    lr_mult, momentum = {}, {}
    for step in range(1001):
        group = next(g for g in optimizer.param_groups if g["kind"] == "muon")
        lr_mult[step] = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["initial_lr"]
        momentum[step] = group["momentum"]
        assert group["weight_decay"] == 0.0
        optimizer.step()
        schedule.step()
    assert [lr_mult[s] for s in (0, 400, 800)] == [1.0, 1.0, 1.0]
    assert lr_mult[801] == pytest.approx(199 / 200, rel=1e-12) and lr_mult[900] == pytest.approx(0.5, rel=1e-12)
    assert lr_mult[1000] == 0.0
    assert [round(momentum[s], 12) for s in (0, 150, 300, 1000)] == [0.85, 0.90, 0.95, 0.95]


def test_pretraining_from_a_folder_of_another_generation_is_refused(orig_run, tmp_path):
    _, _, out = orig_run
    with pytest.raises(UsageError, match="generation-2025 model: add --generation 2025"):
        train(parse_args(["--init_from", str(out / "checkpoint-3"), "--output_dir", str(tmp_path / "again"),
                          "--tokenizer", str(out.parent / "tokenizer"), "--dataset", str(out.parent / "corpus"),
                          "--max_seq_len", "128", "--device_batch_size", "4", "--total_batch_size", "1024",
                          "--num_iterations", "1", "--weight_decay", "0.0"]))
