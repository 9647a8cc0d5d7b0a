"""RL through TRL's GRPOTrainer: nanochat's GSM8K reward on fixtures, nanochat's settings in the GRPOConfig, the
calculator in rollouts through TRL's tool loop, and two real GRPO steps on CPU with the tiny checkpoint."""

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from nanochat_hf.tokenizer.bpe import encode, load_tokenizer
from nanochat_hf.training.rl import (
    NanoChatGRPOTrainer,
    RLArguments,
    completion_text,
    exclude_stop_token,
    grpo_config,
    gsm8k_accuracy,
    parse_rl_args,
    prompts_for_completion,
    train,
)
from nanochat_hf.training.trl_support import NANOCHAT_RESPONSE_TEMPLATE, finetune_optimizer_kwargs, python

from .chat_fixtures import tool_conversation

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*/rl.yaml"))


def gsm8k_rows(n: int = 8) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Tom has {a} apples and buys {a} more. How many now?"},
                          {"role": "assistant", "content": f"{a}+{a}={2 * a}\n#### {2 * a}"}],
             "answer": str(2 * a)} for a in range(1, n + 1)]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.parent.name)
def test_every_recipe_parses(recipe):
    args = parse_rl_args(["--config", str(recipe)])
    assert args.output_dir.startswith("runs/") and args.init_from.endswith("/sft")
    assert args.temperature == 1.0 and args.init_lr_frac == 0.05


def test_reward_is_nanochat_exact_numeric_match():
    completions = [
        [{"role": "assistant", "content": "5 + 7 = 12\n#### 12"}],
        [{"role": "assistant", "content": "#### 1,234"}],
        [{"role": "assistant", "content": "I think 12."}],
        [{"role": "assistant", "content": "#### 12.0"}],
        # a tool-using completion: the answer comes after the tool result
        [{"role": "assistant", "content": "Compute.", "tool_calls": []}, {"role": "tool", "content": "12"},
         {"role": "assistant", "content": "#### 12"}],
        "plain text #### -3",
    ]
    answers = ["12", "1234", "12", "12", "12", "-3"]
    assert gsm8k_accuracy(completions, answers) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]


def test_prompts_are_rendered_for_completion(tiny_checkpoint):
    prompts = prompts_for_completion(Dataset.from_list(gsm8k_rows(2)))
    assert sorted(prompts.column_names) == ["answer", "prompt"]
    assert [m["role"] for m in prompts[0]["prompt"]] == ["user"]
    tokenizer = load_tokenizer(str(tiny_checkpoint))
    ids = tokenizer.apply_chat_template(prompts[0]["prompt"], add_generation_prompt=True, return_dict=False)
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant_start|>")
    with pytest.raises(ValueError, match=r"missing \['answer'\]"):
        prompts_for_completion(Dataset.from_list([{"messages": gsm8k_rows(1)[0]["messages"]}]))


def test_grpo_config_holds_nanochat_settings():
    args = grpo_config(parse_rl_args(["--config", str(ROOT / "recipes/d20/rl.yaml"), "--output_dir", "/tmp/x"]))
    assert (args.num_generations, args.beta, args.scale_rewards, args.loss_type) == (16, 0.0, "none", "bnpo")
    assert (args.temperature, args.top_k, args.max_completion_length, args.num_iterations) == (1.0, 50, 256, 1)
    assert args.generation_batch_size == 16 * 16 and args.max_grad_norm == 0.0
    with pytest.raises(ValueError, match="must be a multiple of"):
        grpo_config(RLArguments(output_dir="/tmp/x", examples_per_step=3, num_samples=3, device_batch_size=4))


def test_stop_token_is_out_of_the_loss_mask():
    # nanochat's engine drops the <|assistant_end|> that ends a sample (then pads with it, masked): it is never
    # trained. TRL keeps the stop token in completion_mask; the python_end that pauses for a tool stays trained.
    end, py_end, pad = 7, 5, 0
    batch = {"completion_ids": torch.tensor([[3, 4, end, pad], [3, py_end, 4, 4], [3, 4, 4, end]]),
             "completion_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]]),
             "tool_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 1], [1, 1, 1, 1]])}
    out = exclude_stop_token(dict(batch), end)
    assert (out["completion_mask"] * out["tool_mask"]).tolist() == [[1, 1, 0, 0], [1, 1, 0, 1], [1, 1, 1, 0]]
    assert torch.equal(out["completion_mask"], batch["completion_mask"])  # attention unchanged
    without_tools = exclude_stop_token({k: batch[k] for k in ("completion_ids", "completion_mask")}, end)
    assert without_tools["tool_mask"].tolist() == [[1, 1, 0, 1], [1, 1, 1, 1], [1, 1, 1, 0]]


def test_policy_gradient_is_normalised_per_pass_as_nanochat(tiny_checkpoint, tmp_path):
    # nanochat chat_rl.py: each pass (device_batch_size samples of one question) adds
    #   -sum(logp * adv over its valid tokens) / (valid tokens of the pass * passes * examples per rank)
    # to the gradient. Two passes with different token counts (TRL's "dapo" divides both by the step's total)
    # and one step's gradient is compared with that formula written out here.
    tokenizer = load_tokenizer(str(tiny_checkpoint))
    run = RLArguments(output_dir=str(tmp_path / "rl"), init_from=str(tiny_checkpoint), examples_per_step=1,
                      num_samples=4, device_batch_size=2, max_new_tokens=4, use_tools=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, trust_remote_code=True).float()
    trainer = NanoChatGRPOTrainer(model=model, reward_funcs=gsm8k_accuracy, args=grpo_config(run),
                                  train_dataset=prompts_for_completion(Dataset.from_list(gsm8k_rows(2))),
                                  processing_class=tokenizer, optimizer_kwargs=finetune_optimizer_kwargs(run))
    passes, examples_per_rank = 2, 1
    trainer.current_gradient_accumulation_steps = passes * examples_per_rank  # as the training loop sets it
    torch.manual_seed(0)
    prompt = torch.randint(10, 200, (2, 3))
    completions = torch.randint(10, 200, (4, 4))
    masks = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]])  # 8 and 3 valid tokens
    advantages = torch.tensor([0.75, -0.25, -0.5, 0.5])
    trainer.model.train()
    for p in range(passes):
        rows = slice(2 * p, 2 * p + 2)
        inputs = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt),
                  "completion_ids": completions[rows], "completion_mask": masks[rows],
                  "advantages": advantages[rows], "num_items_in_batch": masks.sum()}
        trainer._compute_loss(trainer.model, inputs).backward()
    ours = {n: q.grad.clone() for n, q in trainer.model.named_parameters() if q.grad is not None}

    reference = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, trust_remote_code=True).float().train()
    for p in range(passes):
        rows = slice(2 * p, 2 * p + 2)
        ids = torch.cat([prompt, completions[rows]], dim=1)
        logits = reference(input_ids=ids).logits[:, prompt.size(1) - 1 : -1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, completions[rows].unsqueeze(-1)).squeeze(-1)
        valid = masks[rows]
        objective = (logp * advantages[rows].unsqueeze(-1) * valid).sum()
        (-objective / (valid.sum() * passes * examples_per_rank)).backward()
    expected = {n: q.grad for n, q in reference.named_parameters() if q.grad is not None}
    assert ours.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_response_template_parses_what_the_chat_template_renders(tiny_checkpoint):
    # transformers' own parser, driven by our template, must give back the assistant turns of a tool conversation
    tokenizer = load_tokenizer(str(tiny_checkpoint))
    tokenizer.response_template = NANOCHAT_RESPONSE_TEMPLATE
    messages = tool_conversation(2)[:5]  # system, user, assistant with a call, tool result, final answer
    ids = tokenizer.apply_chat_template(messages, return_dict=False)
    prompt = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True, return_dict=False)
    with_call = tokenizer.apply_chat_template(messages[:3], return_dict=False)
    with_output = tokenizer.apply_chat_template(messages[:4], add_generation_prompt=True, return_dict=False)
    assert with_call[: len(prompt)] == prompt and with_output[: len(with_call)] == with_call
    first = tokenizer.parse_response(with_call[len(prompt) :], prefix=prompt)
    assert first == {"role": "assistant", **{k: messages[2][k] for k in ("content", "tool_calls")}}
    second = tokenizer.parse_response(ids[len(with_output) :], prefix=with_output)
    assert second == {"role": "assistant", "content": messages[4]["content"]}
    assert python("6*7") == "42" and python("__import__('os')") == ""


def test_rollouts_call_the_calculator_and_its_output_is_out_of_the_loss(tiny_checkpoint, tmp_path, monkeypatch):
    """Two real GRPO steps. The tiny random model is made to open every answer with the python block `6*7`:
    transformers' SequenceBiasLogitsProcessor (``sequence_bias``) adds +100 to each next token of the block after
    <|assistant_start|>; after the tool output one token is favoured, and <|assistant_end|> follows it."""
    tokenizer = load_tokenizer(str(tiny_checkpoint))
    sp = tokenizer.convert_tokens_to_ids
    call = [sp("<|python_start|>"), *encode(tokenizer, "6*7"), sp("<|python_end|>")]
    output = [sp("<|output_start|>"), *encode(tokenizer, "42"), sp("<|output_end|>")]
    context, sequence_bias = [sp("<|assistant_start|>")], []
    for token in call:
        sequence_bias.append([context + [token], 100.0])
        context = context + [token]
    # after the tool output, some samples pick `answer` (+9) and then stop with <|assistant_end|> (+100); the
    # others go on freely (the samples differ, so the rewards and the update are not all zero)
    answer = encode(tokenizer, "42")[0]
    sequence_bias += [[[sp("<|output_end|>"), answer], 9.0],
                      [[sp("<|output_end|>"), answer, sp("<|assistant_end|>")], 100.0]]

    batches, completions_seen = [], []
    generate_and_score = NanoChatGRPOTrainer._generate_and_score_completions

    def recording(self, inputs):
        batches.append(generate_and_score(self, inputs))
        return batches[-1]

    monkeypatch.setattr(NanoChatGRPOTrainer, "_generate_and_score_completions", recording)
    passes = []
    compute_loss = NanoChatGRPOTrainer._compute_loss

    def recording_passes(self, model, inputs):
        passes.append(inputs)
        return compute_loss(self, model, inputs)

    monkeypatch.setattr(NanoChatGRPOTrainer, "_compute_loss", recording_passes)

    def short_answers(completions, **kwargs):
        # a second reward with spread, so the advantages (and the update) are not all zero for a random model
        completions_seen.extend(completions)
        return [-float(len(completion_text(c))) for c in completions]

    out = tmp_path / "rl"
    final = train(RLArguments(output_dir=str(out), init_from=str(tiny_checkpoint), examples_per_step=2,
                              num_samples=4, device_batch_size=4, max_new_tokens=14, num_iterations=2, save_every=-1),
                  dataset=Dataset.from_list(gsm8k_rows()), reward_funcs=[gsm8k_accuracy, short_answers],
                  generation_kwargs={"sequence_bias": sequence_bias})

    steps = [json.loads(line)["step"] for line in (out / "losses.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and len(batches) == 2
    # nanochat's passes: device_batch_size consecutive samples of one question, in the sampler's order (TRL shuffles)
    assert len(passes) == 4
    for i, micro in enumerate(passes):
        rows = slice((i % 2) * 4, (i % 2 + 1) * 4)
        assert torch.equal(micro["completion_ids"], batches[i // 2]["completion_ids"][rows])
        assert (micro["prompt_ids"] == micro["prompt_ids"][0]).all()
    forced = call + output
    stops = 0
    for batch in batches:
        loss_mask = batch["completion_mask"] * batch["tool_mask"]
        for ids, attend, trained in zip(batch["completion_ids"].tolist(), batch["completion_mask"].tolist(),
                                        loss_mask.tolist(), strict=True):
            n = sum(attend)
            assert ids[: len(forced)] == forced and n > len(forced)  # the model went on after the tool output
            # nanochat's mask: the call is trained, the inserted output is not, the model's own tokens after it are
            stopped = ids[len(forced)] == answer
            stops += stopped
            if stopped:
                assert ids[len(forced) : n] == [answer, sp("<|assistant_end|>")]
            # the model's own tokens after the output are trained, the stop token is not (nanochat never trains it)
            own = [1, 0] if stopped else [1] * (n - len(forced))
            assert trained[:n] == [1] * len(call) + [0] * len(output) + own
    assert 0 < stops < 16
    for completion in completions_seen:  # TRL's messages: the parsed call, then our tool's result
        assert completion[0]["tool_calls"] == [{"type": "function",
                                                "function": {"name": "python", "arguments": {"code": "6*7"}}}]
        assert completion[1] == {"role": "tool", "name": "python", "content": "42"}
    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    assert not torch.equal(model.model.layers[0].mlp.fc1.weight, base.model.layers[0].mlp.fc1.weight)
    # <|python_end|> stops generation only inside the tool loop: the saved model still generates whole turns
    assert model.generation_config.eos_token_id == base.generation_config.eos_token_id


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a save_pretrained model folder"):
        train(RLArguments(init_from=str(tmp_path), output_dir=str(tmp_path / "o")))


def test_cpu_recipe_runs_on_the_arithmetic_task(tiny_checkpoint, tmp_path):
    out = tmp_path / "rl"
    train(parse_rl_args(["--config", str(ROOT / "recipes/cpu/rl.yaml"), "--init_from", str(tiny_checkpoint),
                         "--output_dir", str(out), "--num_iterations", "1", "--max_examples", "16",
                         "--examples_per_step", "2", "--max_new_tokens", "8"]))
    assert (out / "final" / "model.safetensors").exists()
