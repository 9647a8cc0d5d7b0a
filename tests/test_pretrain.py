"""Pretraining on the Trainer: recipes, launch configs, checkpoints, kill -9 resume, and parity with a plain loop."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from transformers import AutoModelForCausalLM

from nanochat_hf.data.embedded import embedded_corpus
from nanochat_hf.data.pretrain import PretrainStream
from nanochat_hf.tokenizer.bpe import load_tokenizer, train_tokenizer
from nanochat_hf.training.optim import FSDP_ERROR, MuonAdamW, NanoChatSchedule, nanochat_param_groups
from nanochat_hf.training.plan import plan_training
from nanochat_hf.training.pretrain import build_pretrain_model, check_parallelism, parse_args, train

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*/pretrain.yaml"))
LAUNCH_CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrain")
    docs = list(embedded_corpus(max_chars=600_000))
    (root / "corpus").mkdir()
    for i in range(3):
        with open(root / "corpus" / f"shard_{i}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs[i::3])
    train_tokenizer(embedded_corpus(max_chars=300_000), vocab_size=1024, show_progress=False).save_pretrained(
        root / "tokenizer"
    )
    return root


def tiny_argv(workdir: Path, out: Path, **overrides) -> list[str]:
    fields = dict(output_dir=out, tokenizer=workdir / "tokenizer", dataset=workdir / "corpus", depth=2, head_dim=32,
                  max_seq_len=128, window_pattern="L", device_batch_size=4, total_batch_size=1024,
                  num_iterations=12, eval_every=6, eval_tokens=2048, save_every=6, log_every=3, num_workers=1,
                  warmup_steps=2, keep_last=1, weight_decay=0.0)
    fields.update(overrides)
    return [arg for key, value in fields.items() for arg in (f"--{key}", str(value))]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "losses.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# recipes and launch configs


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.parent.name)
def test_every_recipe_parses_into_a_plan(recipe):
    args = parse_args(["--config", str(recipe)])
    assert args.depth >= 1 and args.output_dir.startswith("runs/")
    from nanochat_hf import NanoChatConfig

    config = NanoChatConfig.from_depth(args.depth, args.generation, max_position_embeddings=args.max_seq_len,
                                       **({"head_dim": args.head_dim} if args.head_dim else {}))
    world = 1 if recipe.parent.name == "cpu" else 8
    plan = plan_training(config, device_batch_size=args.device_batch_size, world_size=world,
                         target_param_data_ratio=args.target_param_data_ratio,
                         total_batch_size=args.total_batch_size, num_iterations=args.num_iterations)
    assert plan.num_iterations >= 1 and plan.gradient_accumulation_steps >= 1


def test_d20_recipe_gives_nanochat_numbers():
    from nanochat_hf import NanoChatConfig

    args = parse_args(["--config", str(ROOT / "recipes/d20/pretrain.yaml")])
    plan = plan_training(NanoChatConfig.from_depth(args.depth), device_batch_size=args.device_batch_size,
                         world_size=8, target_param_data_ratio=args.target_param_data_ratio)
    assert (plan.num_iterations, plan.total_batch_size) == (4980, 2**20)  # nanochat-spec §1.5, HEAD d20
    assert plan.gradient_accumulation_steps == 2**20 // (16 * 2048 * 8)
    assert abs(plan.weight_decay - 0.100) < 1e-3


def test_cli_overrides_win_over_the_recipe():
    args = parse_args(["--config", str(ROOT / "recipes/d20/pretrain.yaml"), "--depth", "12",
                       "--device_batch_size", "16", "--matrix-lr", "0.03"])
    assert (args.depth, args.device_batch_size, args.matrix_lr) == (12, 16, 0.03)


def test_bad_recipe_and_batch_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("depth: 4\nlearning_rat: 0.1\n")  # learning_rate is the Trainer's name of matrix_lr
    with pytest.raises(ValueError, match=r"unknown keys \['learning_rat'\]"):
        parse_args(["--config", str(bad)])
    from nanochat_hf import NanoChatConfig

    with pytest.raises(ValueError, match="not a multiple of device_batch_size x sequence length x world size"):
        plan_training(NanoChatConfig.from_depth(4), device_batch_size=3, world_size=1, total_batch_size=2**19)


# processes per config. No FSDP config: Muon orthogonalises whole matrices, so every stage trains with DDP.
LAUNCH_PROCESSES = {"cpu": 1, "cpu_2proc": 2, "single_gpu": 1, "ddp_8gpu": 8, "multi_node": 16}


def test_every_launch_config_is_listed():
    assert sorted(p.stem for p in LAUNCH_CONFIGS) == sorted(LAUNCH_PROCESSES)


@pytest.mark.parametrize("config", LAUNCH_CONFIGS, ids=lambda p: p.stem)
def test_launch_configs_load_with_accelerate(config):
    loaded = load_config_from_file(str(config))
    assert loaded.num_processes == LAUNCH_PROCESSES[config.stem]
    assert loaded.distributed_type != "FSDP" and not loaded.fsdp_config


def test_fsdp_is_refused_at_start_up(monkeypatch):
    with pytest.raises(ValueError) as err:
        check_parallelism(DistributedType.FSDP)
    assert str(err.value) == FSDP_ERROR and "ddp_8gpu.yaml" in FSDP_ERROR
    check_parallelism(DistributedType.MULTI_GPU)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config exports
    with pytest.raises(ValueError, match="ddp_8gpu.yaml"):
        check_parallelism(DistributedType.MULTI_GPU)


# ---------------------------------------------------------------------------------------------------------------
# a real run


def test_pretrain_writes_atomic_checkpoints_and_a_final_model(workdir, tmp_path):
    out = tmp_path / "run"
    final = train(parse_args(tiny_argv(workdir, out)))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-12"]
    assert not (out / ".staging").exists()
    checkpoint = out / "checkpoint-12"
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "data_state_rank0.json",
                 "trainer_state.json", "config.json"):
        assert (checkpoint / name).exists(), name
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "eval_bpb" in entry]
    assert [entry["step"] for entry in logged] == [6, 12] and all(0 < e["eval_bpb"] < 20 for e in logged)
    assert any("tokens_per_s" in entry for entry in state["log_history"])
    assert all("grad_norm" not in entry for entry in state["log_history"])  # nanochat measures none
    trajectory = losses(out)
    assert len(trajectory) == 12 and trajectory[-1] < trajectory[0]
    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True)
    assert model.config.num_hidden_layers == 2


def test_compiled_run_follows_the_eager_trajectory(workdir, tmp_path):
    """--torch_compile compiles the model in place: the same losses as eager (the short-window 2026 model, whose
    banded attention compiles too), and a final folder with the model's own parameter names."""
    common = dict(num_iterations=6, eval_every=3, save_every=-1, generation="2026", window_pattern="SL")
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    train(parse_args(tiny_argv(workdir, eager, **common)))
    torch._dynamo.reset()
    final = train(parse_args(tiny_argv(workdir, compiled, torch_compile=True, **common)))
    a, b = losses(eager), losses(compiled)
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-4
    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True)
    reference = AutoModelForCausalLM.from_pretrained(eager / "final", trust_remote_code=True)
    assert model.state_dict().keys() == reference.state_dict().keys()


@pytest.mark.parametrize("extra,message", [
    (dict(fp8=True, bf16=True), "CPU"),
    (dict(fp8=True, fp8_recipe="rowwise"), "CPU"),
])
def test_fp8_is_refused_at_start_up_where_it_cannot_run(workdir, tmp_path, extra, message):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match=f"--fp8 cannot run here.*{message}.*drop --fp8"):
        train(parse_args(tiny_argv(workdir, out, **extra)))
    assert not out.exists() or not any(out.iterdir())


def _spawn(argv: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nanochat_hf.training.pretrain", *argv], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"})


def test_resume_after_kill_9_follows_the_uninterrupted_trajectory(workdir, tmp_path):
    common = dict(num_iterations=16, save_every=4, keep_last=2, eval_every=-1)
    straight = tmp_path / "straight"
    proc = _spawn(tiny_argv(workdir, straight, **common), tmp_path)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]

    killed = tmp_path / "killed"
    proc = _spawn(tiny_argv(workdir, killed, **common), tmp_path)
    deadline = time.time() + 600
    while not (killed / "checkpoint-8").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists()
    proc = _spawn(tiny_argv(workdir, killed, resume=True, **common), tmp_path)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]

    a, b = losses(straight), losses(killed)
    assert len(a) == len(b) == 16
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-6


def test_trainer_matches_a_plain_pytorch_loop(workdir, tmp_path):
    steps = 20
    argv = tiny_argv(workdir, tmp_path / "trainer", depth=4, num_iterations=steps, eval_every=-1, save_every=-1,
                     num_workers=0)
    run = parse_args(argv)
    train(run)
    trainer_losses = losses(tmp_path / "trainer")

    # the same run written as nanochat writes it: no Trainer, no Accelerate
    tokenizer = load_tokenizer(run.tokenizer)
    model = build_pretrain_model(run, tokenizer).train()
    plan = plan_training(model.config, device_batch_size=run.device_batch_size, world_size=1,
                         total_batch_size=run.total_batch_size, num_iterations=run.num_iterations,
                         weight_decay=run.weight_decay)
    optimizer = MuonAdamW(nanochat_param_groups(model, weight_decay=plan.weight_decay,
                                                batch_lr_scale=plan.batch_lr_scale))
    schedule = NanoChatSchedule(optimizer, total_steps=steps, warmup_steps=run.warmup_steps)
    batches = iter(PretrainStream(run.dataset, tokenizer, run.device_batch_size, run.max_seq_len, num_workers=0))
    plain_losses = []
    for _ in range(steps):
        total = 0.0
        for _ in range(plan.gradient_accumulation_steps):
            batch = next(batches)
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"], shift_labels=batch["labels"]).loss
            (loss / plan.gradient_accumulation_steps).backward()
            total += loss.item() / plan.gradient_accumulation_steps
        optimizer.step()
        schedule.step()
        model.zero_grad(set_to_none=True)
        plain_losses.append(total)
    assert max(abs(a - b) for a, b in zip(trainer_losses, plain_losses, strict=True)) <= 1e-5


@pytest.mark.parametrize("config", ["cpu", "cpu_2proc"])
def test_accelerate_launch_runs_real_steps(workdir, tmp_path, config):
    out = tmp_path / config
    argv = tiny_argv(workdir, out, num_iterations=4, eval_every=4, save_every=4, log_every=1)
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(ROOT / "accelerate_configs" / f"{config}.yaml"), "-m", "nanochat_hf.training.pretrain", *argv],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / "final" / "model.safetensors").exists()
    assert len(losses(out)) == 4
    if config == "cpu_2proc":
        assert (out / "checkpoint-4" / "data_state_rank1.json").exists()
        assert "gradient_accumulation_steps\": 1" in result.stdout  # 1024 tokens = 2 ranks x 4 rows x 128


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 836e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA B200", 2.25e15), ("NVIDIA GeForce RTX 4090", None),
])
def test_mfu_uses_nanochats_peak_table(name, peak):
    from nanochat_hf.training.plan import gpu_peak_flops

    assert gpu_peak_flops(name) == peak


FAULTS_SCRIPT = """
import resource, sys, torch
if sys.argv[1] == "kept":
    from nanochat_hf.training.pretrain import keep_freed_memory_on_cpu
    keep_freed_memory_on_cpu()
def step():  # a step's largest temporaries: the CPU tier's (8, 512, 4096) fp32 logits and their gradient
    logits = torch.empty(8, 512, 4096).fill_(1.0)
    grad = torch.empty(8, 512, 4096).fill_(1.0)
    del logits, grad
for _ in range(10):  # glibc's heap settles into reusing its freed blocks after a few steps
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_cpu_training_keeps_freed_memory_instead_of_faulting_it_in_every_step():
    """glibc unmaps a freed 67 MB block and the next step faults its 16K pages in again; after
    keep_freed_memory_on_cpu the steps reuse (nearly all) the same pages."""
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        return int(out.stdout.strip().splitlines()[-1])

    assert faults("default") > 5 * 20_000  # the control: ~33K faults per step (measured 164K in 5 steps)
    assert faults("kept") < 5 * 4_000  # measured 0 once settled
