"""Midtraining: rendering conversations, best-fit packing with padding, exact stream resume, and real runs of the
pretraining Trainer on conversations (the cpu recipe included)."""

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from nanochat_hf.data.conversations import (
    IGNORE_INDEX,
    ConversationRenderError,
    ConversationStream,
    render_conversation,
    render_dataset,
)
from nanochat_hf.tokenizer.bpe import load_tokenizer
from nanochat_hf.training.midtrain import MidtrainSchedule, parse_midtrain_args, train
from nanochat_hf.training.pretrain import NanoChatOptimizerFactory

from .chat_fixtures import conversations, tool_conversation, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*/midtrain.yaml"))


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(str(tiny_checkpoint))


@pytest.fixture(scope="module")
def rendered(tokenizer):
    return render_dataset(Dataset.from_list(conversations(24)), tokenizer, max_tokens=129)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.parent.name)
def test_every_recipe_parses(recipe):
    args = parse_midtrain_args(["--config", str(recipe)])
    assert args.output_dir.startswith("runs/") and args.init_from.endswith("/base")
    assert args.weight_decay == 0.0 and args.final_lr_frac == 0.0 and args.tier == recipe.parent.name


def test_rendering_is_the_chat_template_with_its_generation_mask(tokenizer):
    ids, mask = render_conversation(tokenizer, tool_conversation(1))
    assert ids == tokenizer.apply_chat_template(tool_conversation(1), tokenize=True, return_dict=False)
    assert ids[0] == tokenizer.bos_token_id and mask[0] == 0
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant_end|>") and mask[-1] == 1
    out_start, out_end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|output_start|>", "<|output_end|>"))
    assert mask[ids.index(out_start) : ids.index(out_end) + 1] == [0] * (ids.index(out_end) - ids.index(out_start) + 1)
    assert render_conversation(tokenizer, tool_conversation(1), max_tokens=10)[0] == ids[:10]


def test_bad_conversation_names_the_row(tokenizer):
    bad = Dataset.from_list([{"messages": tool_conversation(1)}, {"messages": [{"role": "assistant", "content": "hi"}]}])
    with pytest.raises(ConversationRenderError, match="row 1: .*must start with a user message"):
        render_dataset(bad, tokenizer)
    with pytest.raises(ConversationRenderError, match="no 'messages' column"):
        render_dataset(Dataset.from_list([{"text": "hi"}]), tokenizer)


def test_packing_is_best_fit_bos_aligned_and_never_splits_a_conversation(rendered, tokenizer):
    bos = tokenizer.bos_token_id
    convs = [tuple(ids) for ids in rendered["input_ids"]]
    stream = ConversationStream(rendered, seq_len=128, batch_size=2, bos_token_id=bos, loop=False)
    seen = []
    for batch in stream:
        for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
            row = ids + [labels[-1] if labels[-1] != IGNORE_INDEX else bos]
            assert row[0] == bos
            # The row is whole conversations followed by BOS padding whose targets are masked.
            pos = 0
            while pos < len(row):
                match = next((c for c in convs if tuple(row[pos : pos + len(c)]) == c), None)
                if match is None:
                    assert set(row[pos:]) == {bos} and set(labels[pos:]) <= {IGNORE_INDEX}
                    break
                seen.append(match)
                assert all(t != IGNORE_INDEX for t in labels[pos : pos + len(match) - 1])  # every token trained
                pos += len(match)
    assert sorted(seen) == sorted(convs)  # one epoch: each conversation exactly once


def test_assistant_only_masks_like_nanochat(rendered, tokenizer):
    stream = ConversationStream(rendered.select([1]), seq_len=128, batch_size=1,
                                bos_token_id=tokenizer.bos_token_id, assistant_only=True, loop=False)
    labels = next(iter(stream))["labels"][0].tolist()
    ids, mask = rendered[1]["input_ids"], rendered[1]["mask"]
    expected = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:], strict=True)]
    assert labels[: len(expected)] == expected and set(labels[len(expected) :]) <= {IGNORE_INDEX}


def test_stream_resumes_exactly_and_shards_by_rank(rendered, tokenizer):
    def make(**kw):
        return ConversationStream(rendered, seq_len=64, batch_size=2, bos_token_id=tokenizer.bos_token_id, **kw)

    reference = [b["input_ids"] for _, b in zip(range(8), make(), strict=False)]
    first = make()
    it = iter(first)
    [next(it) for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    rest = [b["input_ids"] for _, b in zip(range(5), resumed, strict=False)]
    assert all(torch.equal(a, b) for a, b in zip(reference[3:], rest, strict=True))
    assert reference[-1].shape == (2, 64)  # the shard wrapped into a second epoch
    assert make(rank=0, world_size=2).shard == list(range(0, len(rendered), 2))
    assert make(rank=1, world_size=2).shard == list(range(1, len(rendered), 2))


def test_muon_momentum_is_midtrainings_ramp_then_held(tiny_model_factory):
    # ORIG mid_train.py: 0.85 -> 0.95 linearly over 300 steps, then 0.95 (not pretraining's 0.85 -> 0.97 / 400 steps
    # and its warmdown dip), read back from the optimizer's Muon groups after the scheduler stepped.
    optimizer = NanoChatOptimizerFactory()(tiny_model_factory(), weight_decay=0.0)
    schedule = MidtrainSchedule(optimizer, total_steps=1000, warmup_steps=0, warmdown_ratio=0.2, final_lr_frac=0.0)
    seen = {0: None, 150: None, 300: None, 1000: None}
    for step in range(1001):
        if step in seen:
            seen[step] = {g["momentum"] for g in optimizer.param_groups if g["kind"] == "muon"}
        optimizer.step()
        schedule.step()
    assert {k: [round(m, 12) for m in v] for k, v in seen.items()} == {0: [0.85], 150: [0.9], 300: [0.95],
                                                                      1000: [0.95]}


def test_cpu_recipe_midtrains_one_pass_validating_on_other_conversations(tiny_checkpoint, tmp_path, capsys):
    # num_iterations -1: the fewest steps whose packed micro-batches hold every training conversation once; all 40
    # train (validation reads its own file, nothing is held out of the training set)
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(40))
    val = write_jsonl(tmp_path / "val.jsonl", conversations(48)[40:])
    out = tmp_path / "mid"
    final = train(parse_midtrain_args([
        "--config", str(ROOT / "recipes/cpu/midtrain.yaml"), "--init_from", str(tiny_checkpoint),
        "--conversations", data, "--val_conversations", val, "--output_dir", str(out), "--num_iterations", "-1",
        "--device_batch_size", "1", "--total_batch_size", "256", "--val_rows", "0", "--eval_every", "2",
        "--eval_tokens", "512", "--save_every", "2", "--log_every", "1",
    ]))
    printed = capsys.readouterr().out
    assert "[midtrain] 40 conversations (8 for validation)" in printed
    plan = json.loads(printed.split("plan ")[1].splitlines()[0])
    tokenizer = load_tokenizer(str(tiny_checkpoint))
    rendered = render_dataset(Dataset.from_list(conversations(40)), tokenizer, 257)
    # one pass by hand: one row of 256 (+1) tokens a step; best-fit packing pads rows, so the token count alone
    # (3,213 tokens: 13 rows) would stop short of the last conversations
    one_pass = ConversationStream(rendered, seq_len=256, batch_size=1, bos_token_id=tokenizer.bos_token_id, loop=False)
    steps = plan["num_iterations"]
    assert steps == sum(1 for _ in one_pass) > -(-sum(len(ids) for ids in rendered["input_ids"]) // 256)
    # midtraining's momentum reached the optimizer: 0.85 + 0.10 * step / 300 after the last step
    groups = torch.load(out / f"checkpoint-{steps}" / "optimizer.pt", weights_only=False)["param_groups"]
    assert {round(g["momentum"], 12) for g in groups if g["kind"] == "muon"} == {round(0.85 + 0.1 * steps / 300, 12)}
    logged = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, steps + 1))
    bpb_steps = [json.loads(line)["step"] for line in (out / "bpb.jsonl").read_text().splitlines()]
    assert bpb_steps[0] == 2  # eval_every 2: validation bits per byte on the held-out conversations
    # saved at step 2 and at the end; keep_last 1 rotated checkpoint-2 away
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{steps}"]
    assert (out / f"checkpoint-{steps}" / "data_state_rank0.json").exists()
    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)
    assert not any(p.name.startswith(".final") for p in out.iterdir())  # the atomic save left no staging folder


def test_bad_inputs_are_refused(tmp_path, tiny_checkpoint):
    with pytest.raises(ValueError, match="not a save_pretrained model folder"):
        train(parse_midtrain_args(["--init_from", str(tmp_path), "--output_dir", str(tmp_path / "o")]))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(ValueError, match="no 'messages' column"):
        train(parse_midtrain_args(["--init_from", str(tiny_checkpoint), "--conversations",
                                   str(tmp_path / "bad.jsonl"), "--output_dir", str(tmp_path / "o")]))
    data = write_jsonl(tmp_path / "few.jsonl", conversations(5))
    with pytest.raises(ValueError, match="needs --val_conversations FILE for validation"):
        train(parse_midtrain_args(["--init_from", str(tiny_checkpoint), "--conversations", data,
                                   "--output_dir", str(tmp_path / "o")]))
    assert not (tmp_path / "o" / "final").exists()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("depht: 3\n")
    with pytest.raises(ValueError, match=r"unknown keys \['depht'\]; see `nanochat-hf midtrain --help`"):
        parse_midtrain_args(["--config", str(recipe)])


def test_validation_is_the_tasks_test_splits_never_the_training_conversations(tmp_path):
    from nanochat_hf.tasks import build_mixture
    from nanochat_hf.training.midtrain import validation_mixture

    # the tier's mixture: its tasks' test splits (cpu: arithmetic 100 + simple spelling 100 + spelling bee 50)
    run = parse_midtrain_args(["--tier", "cpu", "--seed", "3", "--val_rows", "0"])
    assert validation_mixture(run)["messages"] == build_mixture("midtrain", "cpu", seed=3, split="val")["messages"]
    assert len(validation_mixture(parse_midtrain_args(["--tier", "cpu", "--val_rows", "20"]))) == 20
    # a local training file needs its own validation file
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(5))
    with pytest.raises(ValueError, match="--val_conversations FILE"):
        validation_mixture(parse_midtrain_args(["--conversations", data]))


def test_cpu_recipe_runs_on_the_tiers_own_mixture(tiny_checkpoint, tmp_path):
    # nanochat_hf.tasks.build_mixture("midtrain", "cpu"): offline generators only, with calculator tool calls
    out = tmp_path / "mid"
    train(parse_midtrain_args([
        "--config", str(ROOT / "recipes/cpu/midtrain.yaml"), "--init_from", str(tiny_checkpoint),
        "--output_dir", str(out), "--max_rows", "120", "--num_iterations", "2", "--device_batch_size", "2",
        "--total_batch_size", "512", "--val_rows", "8", "--eval_every", "-1", "--log_every", "1",
    ]))
    assert len((out / "losses.jsonl").read_text().splitlines()) == 2
    assert (out / "final" / "config.json").exists()
