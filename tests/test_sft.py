"""SFT through TRL's SFTTrainer: TRL's labels equal nanochat's mask (re-stated here from nanochat-spec.md §3.1), the
fused loss is the model's own on a padded vocabulary, real steps with Muon, and real `accelerate launch` runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from nanochat_hf.tokenizer.bpe import load_tokenizer
from nanochat_hf.training.init_model import build_model, save_atomically
from nanochat_hf.training.optim import MuonAdamW
from nanochat_hf.training.sft import NanoChatSFTTrainer, SFTArguments, parse_sft_args, sft_config, train
from nanochat_hf.training.trl_support import FinetuneOptimizerFactory

from .chat_fixtures import conversations, write_jsonl
from .conftest import randomize
from .nanochat_reference import render_conversation

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*/sft.yaml"))


# nanochat's render_conversation, re-stated from the spec (not from the chat template): HF messages are first turned
# into nanochat's conversation (system merged into the first user turn; tool calls and tool results become python /
# python_output parts of ONE assistant turn), then rendered token by token with nanochat's mask.
def nanochat_conversation(messages: list[dict]) -> list[tuple[str, object]]:
    turns, system = [], None
    for m in messages:
        role, content = m["role"], m.get("content")
        if role == "system":
            system = content
        elif role == "user":
            turns.append(("user", f"{system}\n\n{content}" if system is not None else content))
            system = None
        elif role == "assistant":
            if not (turns and turns[-1][0] == "assistant"):
                turns.append(("assistant", []))
            parts = turns[-1][1]
            if content:
                parts.append(("text", content))
            for call in m.get("tool_calls") or []:
                arguments = call["function"]["arguments"]
                arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
                parts.append(("python", arguments["code"]))
        elif role == "tool":
            turns[-1][1].append(("python_output", content))
    return turns


def nanochat_render(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    turns = [{"role": role, "content": content if role == "user" else [{"type": k, "text": t} for k, t in content]}
             for role, content in nanochat_conversation(messages)]
    return render_conversation(tokenizer, turns)


def make_trainer(checkpoint, tmp_path, dataset, **overrides) -> NanoChatSFTTrainer:
    run = SFTArguments(output_dir=str(tmp_path / "sft"), init_from=str(checkpoint), device_batch_size=2,
                       target_examples_per_step=4, num_iterations=2, **overrides)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
    return NanoChatSFTTrainer(
        model=model, args=sft_config(run, max_length=model.config.max_position_embeddings, eval_set=None),
        train_dataset=dataset, processing_class=load_tokenizer(str(checkpoint)),
        optimizer_cls_and_kwargs=(FinetuneOptimizerFactory, {"init_lr_frac": run.init_lr_frac}),
    )


@pytest.fixture(scope="module")
def padded_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint's tokenizer (512 tokens) with a model whose lm_head is padded to 576 rows."""
    tokenizer = load_tokenizer(str(tiny_checkpoint))
    torch.manual_seed(0)
    model = build_model(tokenizer, depth=2, generation="2026", head_dim=32, max_position_embeddings=256,
                        pad_vocab_size_to=96)
    assert (model.config.vocab_size, model.config.padded_vocab_size) == (512, 576)
    return save_atomically(randomize(model, seed=1), tokenizer, tmp_path_factory.mktemp("padded") / "checkpoint")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.parent.name)
def test_every_recipe_parses(recipe):
    args = parse_sft_args(["--config", str(recipe)])
    assert args.output_dir.startswith("runs/") and args.init_from.endswith("/mid")
    assert args.init_lr_frac == 0.02 and args.weight_decay == 0.0


@pytest.mark.parametrize("json_arguments", [False, True], ids=["mapping-arguments", "json-arguments"])
def test_trl_labels_equal_nanochat_mask(tiny_checkpoint, tmp_path, json_arguments):
    rows = conversations(6, json_arguments=json_arguments)
    trainer = make_trainer(tiny_checkpoint, tmp_path, Dataset.from_list(rows))
    tokenizer = trainer.processing_class
    for row, example in zip(rows, trainer.train_dataset, strict=True):
        ids, mask = nanochat_render(tokenizer, row["messages"])
        batch = trainer.data_collator([example])
        assert batch["input_ids"][0].tolist() == ids
        # TRL's labels are unshifted (the loss shifts them): nanochat's targets are ids[1:] where mask[1:] is 1.
        expected = [t if m else -100 for t, m in zip(ids[1:], mask[1:], strict=True)]
        assert batch["labels"][0, 1:].tolist() == expected
    assert any(m.get("tool_calls") for row in rows for m in row["messages"])


def test_the_fused_loss_is_the_models_own_on_a_padded_vocabulary(padded_checkpoint, tmp_path):
    trainer = make_trainer(padded_checkpoint, tmp_path, Dataset.from_list(conversations(4)))
    model = trainer.model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    fused = model(**batch, fused_lm_head=True).loss
    own = model(**batch).loss  # the model's forward: padded logits sliced away, softcap in fp32
    assert torch.allclose(fused, own, rtol=1e-5, atol=1e-5)
    fused.backward()
    grad = model.lm_head.weight.grad
    assert grad[512:].abs().sum() == 0 and grad[:512].abs().sum() > 0  # padded rows never learn
    # The same fused path over all 576 rows would be a different loss: the padded rows enter the softmax.
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = model.lm_head(hidden).float()
        cap = model.config.final_logit_softcapping
        logits = cap * torch.tanh(logits / cap)
        all_rows = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 576), batch["labels"][:, 1:].reshape(-1))
    assert not torch.allclose(all_rows, own, rtol=1e-3)


def test_cpu_recipe_trains_on_the_tiers_own_mixture_and_saves_atomically(tiny_checkpoint, tmp_path, capsys):
    # nanochat_hf.tasks.build_mixture("sft", "cpu"): offline generators only, with calculator tool calls
    out = tmp_path / "sft"
    final = train(parse_sft_args([
        "--config", str(ROOT / "recipes/cpu/sft.yaml"), "--init_from", str(tiny_checkpoint), "--output_dir", str(out),
        "--max_rows", "20", "--num_iterations", "2", "--device_batch_size", "2", "--target_examples_per_step", "4",
        "--val_rows", "4", "--eval_every", "2", "--log_every", "1",
    ]))
    logged = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2]
    assert "'eval_loss'" in capsys.readouterr().out  # the Trainer's log line of the validation loss at step 2
    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    assert not torch.equal(model.model.layers[0].mlp.fc1.weight, base.model.layers[0].mlp.fc1.weight)
    assert load_tokenizer(str(final)).chat_template == load_tokenizer(str(tiny_checkpoint)).chat_template
    assert not any(p.name.startswith(".final") for p in out.iterdir())


def test_optimizer_is_muon_with_nanochat_sft_lrs(tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint, tmp_path, Dataset.from_list(conversations(8)))
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    assert isinstance(trainer.optimizer, MuonAdamW)
    muon = next(g for g in trainer.optimizer.param_groups if g["kind"] == "muon")
    assert muon["lr"] == pytest.approx(0.02 * 0.02)
    lrs = []
    for _ in range(10):
        lrs.append(muon["lr"])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert lrs == pytest.approx([0.0004 * (1 - s / 10) for s in range(10)])  # nanochat: lrm = 1 - it / num_iterations


def test_bad_inputs_are_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="not a save_pretrained model folder"):
        train(SFTArguments(init_from=str(tmp_path), output_dir=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="no 'messages' column"):
        train(SFTArguments(init_from=str(tiny_checkpoint), output_dir=str(tmp_path / "o")),
              dataset=Dataset.from_list([{"text": "hi"}]))
    with pytest.raises(ValueError, match="not a multiple of device_batch_size"):
        train(SFTArguments(init_from=str(tiny_checkpoint), output_dir=str(tmp_path / "o"), device_batch_size=3),
              dataset=Dataset.from_list(conversations(8)))
    assert not (tmp_path / "o" / "final").exists()


# The one-process launch is the same code path as train(); the 2-process gloo launch is the one that can differ.
@pytest.mark.parametrize("config", [pytest.param("cpu", marks=pytest.mark.slow), "cpu_2proc"])
def test_accelerate_launch_runs_real_steps(tiny_checkpoint, tmp_path, config):
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(24))
    out = tmp_path / config
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(ROOT / "accelerate_configs" / f"{config}.yaml"), "-m", "nanochat_hf.training.sft",
         "--config", str(ROOT / "recipes/cpu/sft.yaml"), "--init_from", str(tiny_checkpoint), "--conversations", data,
         "--output_dir", str(out), "--num_iterations", "2", "--device_batch_size", "2",
         "--target_examples_per_step", "4", "--eval_every", "-1", "--log_every", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / "final" / "model.safetensors").exists()
    assert len((out / "losses.jsonl").read_text().splitlines()) == 2
