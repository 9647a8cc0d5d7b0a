"""nanochat HEAD's SFT (the 2026 pipeline) through TRL: the BOS best-fit packing rule against a re-statement of
HEAD's chat_sft.py written here from nanochat-spec.md §4.4, nanochat's loss normalisation against TRL's default on
a batch where the two differ, the warm-started optimizer, the inherited settings, the schedule, and real runs from
a real pretraining run's folder."""

import json
import random
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from nanochat_hf.data.conversations import collate_packed_rows, pack_conversations
from nanochat_hf.data.embedded import embedded_corpus
from nanochat_hf.tokenizer.bpe import load_tokenizer, train_tokenizer
from nanochat_hf.training.checkpoints import read_run_record, warm_start_optimizer
from nanochat_hf.training.optim import MuonAdamW
from nanochat_hf.training.pretrain import parse_args as parse_pretrain_args
from nanochat_hf.training.pretrain import train as pretrain
from nanochat_hf.training.sft import (
    NanoChatSFTTrainer,
    SFTArguments,
    inherit_from_base,
    parse_sft_args,
    sft_config,
    train,
)
from nanochat_hf.training.trl_support import FinetuneOptimizerFactory

from .chat_fixtures import conversations, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# HEAD's sft_data_generator_bos_bestfit, re-stated: rows of capacity T+1; fill each with the LONGEST buffered
# conversation that fits entirely (the first of equal length), refilling the buffer to `buffer_size` from the data
# in order; when none fits, pad the rest of the row with BOS, mask 0. Targets are row[1:], -1 where mask[1:] is 0,
# and every target from (content length - 1) on in a padded row.


def head_bestfit_rows(convs, capacity, bos, buffer_size):
    data, buffer, rows = iter(convs), [], []
    exhausted = False
    while True:
        row, mask, content_len = [], [], None
        while len(row) < capacity:
            while len(buffer) < buffer_size and not exhausted:
                try:
                    buffer.append(next(data))
                except StopIteration:
                    exhausted = True
            if not buffer:
                break
            remaining = capacity - len(row)
            best = -1
            for i, (ids, _) in enumerate(buffer):
                if len(ids) <= remaining and (best < 0 or len(ids) > len(buffer[best][0])):
                    best = i
            if best < 0:
                content_len = len(row)
                row += [bos] * remaining
                mask += [0] * remaining
                break
            ids, m = buffer.pop(best)
            row += ids
            mask += m
        if not row:
            return rows
        if len(row) < capacity:  # the data ran out: the last row is padded too
            content_len = len(row)
            mask += [0] * (capacity - len(row))
            row += [bos] * (capacity - len(row))
        targets = [t if m else -1 for t, m in zip(row[1:], mask[1:], strict=True)]
        if content_len is not None:
            targets[content_len - 1:] = [-1] * (capacity - content_len)
        rows.append((row, targets, content_len))


def random_conversations(n, capacity, seed):
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        length = rng.choice([2, 3, rng.randrange(2, capacity + 1), capacity])
        ids = [0] + [rng.randrange(1, 50) for _ in range(length - 1)]  # every conversation starts with BOS (0)
        convs.append((ids, [0] + [rng.randrange(2) for _ in range(length - 1)]))
    return convs


@pytest.mark.parametrize("capacity, buffer_size, seed", [(17, 5, 0), (33, 100, 1), (9, 1, 2), (65, 7, 3)])
def test_packing_follows_heads_bestfit_rule(capacity, buffer_size, seed):
    convs = random_conversations(300, capacity, seed)
    rendered = Dataset.from_dict({"input_ids": [c[0] for c in convs], "mask": [c[1] for c in convs]})
    packed = pack_conversations(rendered, seq_len=capacity - 1, bos_token_id=0, buffer_size=buffer_size)
    expected = head_bestfit_rows(convs, capacity, bos=0, buffer_size=buffer_size)
    assert len(packed) == len(expected)
    batch = collate_packed_rows([packed[i] for i in range(len(packed))])
    for i, (row, targets, _) in enumerate(expected):
        assert packed[i]["input_ids"] == row, i
        assert batch["input_ids"][i].tolist() == row[:-1]
        assert batch["shift_labels"][i].tolist() == [t if t >= 0 else -100 for t in targets], i
    # nothing cropped, nothing repeated: the rows' content is every conversation's tokens, once
    content = sum(capacity if c is None else c for c in (r[2] for r in expected))
    assert content == sum(len(ids) for ids, _ in convs)


def test_packed_rows_keep_positions_and_no_mask():
    rendered = Dataset.from_dict({"input_ids": [[0, 5, 6], [0, 7]], "mask": [[0, 1, 1], [0, 1]]})
    packed = pack_conversations(rendered, seq_len=7, bos_token_id=0)
    batch = collate_packed_rows([packed[0]])
    assert packed[0]["input_ids"] == [0, 5, 6, 0, 7, 0, 0, 0]
    assert batch["shift_labels"][0].tolist() == [5, 6, -100, 7, -100, -100, -100]
    assert batch["position_ids"][0].tolist() == list(range(7)) and "attention_mask" not in batch


# ---------------------------------------------------------------------------------------------------------------
# a real base run: pretraining's final folder keeps the optimizer state and the run's arguments


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("base")
    docs = list(embedded_corpus(max_chars=300_000))
    (root / "corpus").mkdir()
    with open(root / "corpus" / "shard_0.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    train_tokenizer(embedded_corpus(max_chars=200_000), vocab_size=1024, show_progress=False).save_pretrained(
        root / "tokenizer")
    argv = ["--output_dir", root / "pre", "--tokenizer", root / "tokenizer", "--dataset", root / "corpus",
            "--depth", 2, "--head_dim", 32, "--max_seq_len", 128, "--window_pattern", "L", "--device_batch_size", 4,
            "--total_batch_size", 1024, "--num_iterations", 4, "--eval_every", -1, "--num_workers", 0,
            "--warmup_steps", 1, "--weight_decay", 0.0, "--embedding_lr", 0.25, "--unembedding_lr", 0.006,
            "--matrix_lr", 0.03]
    return pretrain(parse_pretrain_args([str(a) for a in argv]))


def test_pretraining_keeps_what_heads_sft_reads(base_run):
    record = read_run_record(base_run)
    assert record["stage"] == "pretrain"
    assert record["arguments"]["device_batch_size"] == 4 and record["plan"]["total_batch_size"] == 1024
    assert (record["arguments"]["embedding_lr"], record["arguments"]["unembedding_lr"],
            record["arguments"]["matrix_lr"]) == (0.25, 0.006, 0.03)
    saved = torch.load(base_run / "optimizer.pt", weights_only=True)
    assert saved["state"] and any(g["kind"] == "muon" for g in saved["param_groups"])
    # push stages the weights, tokenizer, config and code only: optimizer.pt never leaves the machine
    from nanochat_hf.hub.push import stage_model_repo

    staged = stage_model_repo(base_run, base_run.parent / "staged", "me/base")
    assert not (staged / "optimizer.pt").exists() and not (staged / "run_args.json").exists()


def test_settings_are_inherited_from_the_base_run_unless_given(base_run):
    record = read_run_record(base_run)
    run = SFTArguments(pipeline="2026", init_from=str(base_run), matrix_lr=0.05)
    said = inherit_from_base(run, record)
    assert (run.device_batch_size, run.total_batch_size, run.embedding_lr, run.unembedding_lr, run.matrix_lr) == (
        4, 1024, 0.25, 0.006, 0.05)
    assert "matrix_lr=0.05 overrides the base run's 0.03" in said
    # a base model from elsewhere (no record): HEAD's fallbacks 32 / 524,288 / 0.3 / 0.004 / 0.02
    run = SFTArguments(pipeline="2026", init_from="elsewhere")
    inherit_from_base(run, None)
    assert (run.device_batch_size, run.total_batch_size, run.embedding_lr, run.unembedding_lr, run.matrix_lr) == (
        32, 524288, 0.3, 0.004, 0.02)
    # the pipelines' own defaults: ORIG x0.02 linear to 0 from the whole run, HEAD x0.8 with a 50% warmdown
    orig, head = SFTArguments(), SFTArguments(pipeline="2026")
    assert (orig.init_lr_frac, orig.warmdown_ratio, orig.device_batch_size, orig.load_optimizer) == (0.02, 1.0, 4,
                                                                                                     False)
    assert (head.init_lr_frac, head.warmdown_ratio, head.final_lr_frac, head.load_optimizer) == (0.8, 0.5, 0.0, True)
    assert (head.eval_every, head.chatcore_every, head.chatcore_max_cat, head.chatcore_max_sample) == (200, 200, -1,
                                                                                                      24)


def fresh_optimizer(checkpoint, init_lr_frac=0.8):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
    return model, FinetuneOptimizerFactory()(model, init_lr_frac=init_lr_frac, embedding_lr=0.25,
                                             unembedding_lr=0.006, matrix_lr=0.03, weight_decay=0.0)


def test_the_optimizer_is_warm_started_with_fresh_hyper_parameters(base_run, tmp_path):
    model, optimizer = fresh_optimizer(base_run)
    groups_before = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    warm_start_optimizer(optimizer, base_run)
    saved = torch.load(base_run / "optimizer.pt", weights_only=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for index, state in saved["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim():
                assert torch.equal(optimizer.state[params[index]][key], value), key
    assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == groups_before
    muon = next(g for g in optimizer.param_groups if g["kind"] == "muon")
    # pretraining ended in its warmdown; the warm start keeps this run's LR (0.03 x 0.8) and Muon weight decay 0
    assert muon["lr"] == pytest.approx(0.03 * 0.8) and muon["weight_decay"] == 0.0
    assert isinstance(optimizer, MuonAdamW)

    # refusals: no state file, a truncated one, a model of other shapes
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(FileNotFoundError, match="--load_optimizer false"):
        warm_start_optimizer(optimizer, bare)
    (bare / "optimizer.pt").write_bytes((base_run / "optimizer.pt").read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated"):
        warm_start_optimizer(optimizer, bare)
    other = AutoModelForCausalLM.from_config(model.config.__class__(**{**model.config.to_dict(), "vocab_size": 1088}),
                                             trust_remote_code=True)
    other_optimizer = FinetuneOptimizerFactory()(other, weight_decay=0.0)
    with pytest.raises(ValueError, match="other shapes"):
        warm_start_optimizer(other_optimizer, base_run)


def test_heads_schedule(base_run):
    """LR x0.8 constant, then linear to 0 over the last 50% (HEAD's get_lr_multiplier with progress = step / steps);
    Muon momentum 0.85 -> 0.95 over 300 steps (HEAD's get_muon_momentum); Muon weight decay stays 0."""
    run = SFTArguments(pipeline="2026", init_from=str(base_run), output_dir="unused", device_batch_size=1,
                       total_batch_size=128, embedding_lr=0.25, unembedding_lr=0.006, matrix_lr=0.03)
    model = AutoModelForCausalLM.from_pretrained(base_run, trust_remote_code=True)
    trainer = NanoChatSFTTrainer(
        model=model, args=sft_config(run, max_length=128, eval_set=None), run=run,
        train_dataset=Dataset.from_dict({"input_ids": [[0] * 129], "assistant_masks": [[1] * 129]}),
        data_collator=collate_packed_rows, processing_class=load_tokenizer(str(base_run)),
        optimizer_cls_and_kwargs=(FinetuneOptimizerFactory, {"init_lr_frac": 0.8, "matrix_lr": 0.03,
                                                             "weight_decay": 0.0}),
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=400)
    muon = next(g for g in trainer.optimizer.param_groups if g["kind"] == "muon")
    seen = {}
    for step in range(400):
        seen[step] = (muon["lr"], muon["momentum"], muon["weight_decay"])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    lr0 = 0.03 * 0.8
    for step, (lr, momentum, wd) in seen.items():
        progress = step / 400
        multiplier = 1.0 if progress <= 0.5 else 1 - (progress - 0.5) / 0.5
        assert lr == pytest.approx(lr0 * multiplier, abs=1e-12), step
        assert momentum == pytest.approx(0.85 + 0.10 * min(step / 300, 1.0), abs=1e-12), step
        assert wd == 0.0


# ---------------------------------------------------------------------------------------------------------------
# nanochat's loss normalisation: each micro-batch's mean over its supervised tokens, averaged over the micro-batches


def packed_trainer_and_batches(base_run):
    """Two packed micro-batches of one row each (HEAD's path: targets already shifted)."""
    run = SFTArguments(pipeline="2026", init_from=str(base_run), output_dir="unused", device_batch_size=1,
                       total_batch_size=256, embedding_lr=0.25, unembedding_lr=0.006, matrix_lr=0.03)
    rng = random.Random(0)
    rows = []
    for supervised in (3, 90):  # two micro-batches with very different numbers of supervised tokens
        ids = [0] + [rng.randrange(1, 1000) for _ in range(128)]
        rows.append({"input_ids": ids, "assistant_masks": [0] * (129 - supervised) + [1] * supervised})
    args = sft_config(run, max_length=128, eval_set=None)
    trainer = NanoChatSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(base_run, trust_remote_code=True), args=args, run=run,
        train_dataset=Dataset.from_list(rows), data_collator=collate_packed_rows,
        processing_class=load_tokenizer(str(base_run)),
        optimizer_cls_and_kwargs=(FinetuneOptimizerFactory, {"weight_decay": 0.0}),
    )
    return trainer, [collate_packed_rows([row]) for row in rows]


def conversation_trainer_and_batches(base_run):
    """The 2025 pipeline's path: TRL renders one conversation a row and its collator builds unshifted labels."""
    run = SFTArguments(init_from=str(base_run), output_dir="unused", device_batch_size=1, target_examples_per_step=2)
    short = {"messages": [{"role": "user", "content": "Tell me a long story about the sea " * 6},
                          {"role": "assistant", "content": "No."}]}
    long = {"messages": [{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "The sea is wide and deep and blue. " * 8}]}
    trainer = NanoChatSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(base_run, trust_remote_code=True),
        args=sft_config(run, max_length=128, eval_set=None), run=run, train_dataset=Dataset.from_list([short, long]),
        processing_class=load_tokenizer(str(base_run)),
        optimizer_cls_and_kwargs=(FinetuneOptimizerFactory, {"weight_decay": 0.0}),
    )
    batches = [trainer.data_collator([trainer.train_dataset[i]]) for i in range(2)]
    for batch in batches:  # in nanochat's terms: targets = labels[1:], inputs without the last token
        batch["shift_labels"] = batch["labels"][:, 1:]
    return trainer, batches


@pytest.mark.parametrize("make", [packed_trainer_and_batches, conversation_trainer_and_batches],
                         ids=["2026-packed", "2025-conversations"])
def test_loss_is_the_mean_of_micro_batch_means(base_run, make):
    trainer, batches = make(base_run)
    model = trainer.model
    assert trainer.args.gradient_accumulation_steps == 2
    feed = [{k: v for k, v in b.items() if k != "shift_labels" or "labels" not in b} for b in batches]
    samples, num_items = trainer.get_batch_samples(iter(feed), 2, torch.device("cpu"))
    trainer.current_gradient_accumulation_steps = len(samples)  # what the Trainer's loop sets before the steps
    step_loss = sum(trainer.training_step(trainer.model, dict(b), num_items).item() for b in samples)
    ours_grad = model.lm_head.weight.grad.clone()

    def ce(batch, reduction):
        logits = model(input_ids=batch["input_ids"]).logits.float()[:, : batch["shift_labels"].shape[1]]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 batch["shift_labels"].reshape(-1), ignore_index=-100,
                                                 reduction=reduction)

    model.zero_grad()
    nanochat = sum(ce(b, "mean") for b in batches) / 2  # chat_sft: loss / grad_accum_steps, per micro-batch mean
    nanochat.backward()
    trl_default = sum(ce(b, "sum") for b in batches) / sum((b["shift_labels"] != -100).sum() for b in batches)
    assert abs(nanochat.item() - trl_default.item()) > 1e-3  # the two definitions differ on this batch
    assert step_loss == pytest.approx(nanochat.item(), rel=1e-5)
    assert torch.allclose(ours_grad, model.lm_head.weight.grad, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# real runs


def test_cpu_recipe_runs_heads_sft_from_a_base_run(base_run, tmp_path, capsys):
    out = tmp_path / "sft"
    final = train(parse_sft_args([
        "--config", str(ROOT / "recipes/cpu/sft-2026.yaml"), "--init_from", str(base_run), "--output_dir", str(out),
        "--max_rows", "120", "--val_rows", "24", "--num_iterations", "4", "--eval_every", "2", "--eval_tokens",
        "2048", "--log_every", "1",
    ]))
    printed = capsys.readouterr().out
    assert "device_batch_size=4 inherited from the base run" in printed
    assert "total_batch_size=1024 inherited from the base run" in printed
    assert "optimizer state warm-started" in printed
    assert [json.loads(line)["step"] for line in (out / "losses.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    bpb = [json.loads(line) for line in (out / "bpb.jsonl").read_text().splitlines()]
    assert [r["step"] for r in bpb] == [2, 4] and all(0 < r["bpb"] < 20 for r in bpb)
    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True)
    base = AutoModelForCausalLM.from_pretrained(base_run, trust_remote_code=True)
    assert not torch.equal(model.model.layers[0].mlp.fc1.weight, base.model.layers[0].mlp.fc1.weight)


def test_bad_inputs_are_refused(base_run, tmp_path):
    with pytest.raises(ValueError, match="--load_optimizer true: the 2025 pipeline"):
        SFTArguments(load_optimizer=True)
    with pytest.raises(ValueError, match="--pipeline '2027'"):
        SFTArguments(pipeline="2027")
    with pytest.raises(ValueError, match="ChatCORE's tasks are Hub datasets"):
        train(SFTArguments(pipeline="2026", tier="cpu", init_from=str(base_run), output_dir=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="not a multiple of device_batch_size x max_seq_len"):
        train(SFTArguments(pipeline="2026", tier="cpu", init_from=str(base_run), output_dir=str(tmp_path / "o"),
                           chatcore_every=-1, eval_every=-1, total_batch_size=1000),
              dataset=Dataset.from_list(conversations(8)))
    bare = tmp_path / "bare"
    model = AutoModelForCausalLM.from_pretrained(base_run, trust_remote_code=True)
    model.save_pretrained(bare)
    load_tokenizer(str(base_run)).save_pretrained(bare)
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(8))
    with pytest.raises(FileNotFoundError, match="optimizer.pt not found"):
        train(parse_sft_args(["--config", str(ROOT / "recipes/cpu/sft-2026.yaml"), "--init_from", str(bare),
                              "--output_dir", str(tmp_path / "o2"), "--conversations", data, "--eval_every", "-1"]))
    assert not (tmp_path / "o2" / "final").exists()


def test_hub_tier_mixture_and_chatcore_during_training(base_run, tmp_path, capsys):
    """A Hub tier's HEAD SFT on local copies of its datasets (the project's fixtures, in the Hub's layout): the
    mixture is SmolTalk train + MMLU auxiliary_train x3 + GSM8K train x4, validation the tasks' test splits, and
    ChatCORE (with chatcore_cat and each task) is measured during training and logged beside val bpb."""
    import shutil

    from nanochat_hf.tasks import build_mixture, load_task

    from .task_fixtures import write_fixture

    data = tmp_path / "data"
    for name, repo in (("smoltalk", "HuggingFaceTB/smol-smoltalk"), ("arc", "allenai/ai2_arc"),
                       ("mmlu", "cais/mmlu"), ("gsm8k", "openai/gsm8k"), ("humaneval", "openai/openai_humaneval")):
        write_fixture(name, data / repo)
    shutil.move(write_fixture("words", data), data / "words_alpha.txt")
    smoltalk = len(load_task("smoltalk", "train", data / "HuggingFaceTB/smol-smoltalk"))
    mmlu = len(load_task("mmlu", "auxiliary_train", data / "cais/mmlu"))
    gsm8k = len(load_task("gsm8k", "train", data / "openai/gsm8k"))
    assert len(build_mixture("sft-2026", "d12", data_dir=data)) == smoltalk + 3 * mmlu + 4 * gsm8k
    out = tmp_path / "sft"
    train(parse_sft_args([
        "--config", str(ROOT / "recipes/d12/sft-2026.yaml"), "--init_from", str(base_run), "--output_dir", str(out),
        "--data_dir", str(data), "--num_iterations", "2", "--eval_every", "2", "--eval_tokens", "1024",
        "--chatcore_every", "2", "--chatcore_max_sample", "2", "--bf16", "false", "--torch_compile", "false",
        "--num_proc", "1",
    ]))
    printed = capsys.readouterr().out
    assert f"[sft] {smoltalk + 3 * mmlu + 4 * gsm8k:,} conversations packed" in printed
    (row,) = [json.loads(line) for line in (out / "bpb.jsonl").read_text().splitlines()]
    assert row["step"] == 2 and 0 < row["bpb"] < 20
    tasks = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval")
    assert all(0 <= row[f"chatcore/{t}"] <= 1 for t in tasks)
    centered = [(row[f"chatcore/{t}"] - b) / (1 - b) for t, b in zip(tasks, (0.25, 0.25, 0.25, 0, 0), strict=True)]
    assert row["chatcore"] == pytest.approx(sum(centered) / 5)
    assert row["chatcore_cat"] == pytest.approx(sum(centered[:3]) / 3)
