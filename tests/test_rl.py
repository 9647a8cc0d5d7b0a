"""RL through TRL's GRPOTrainer: nanochat's GSM8K reward on fixtures, nanochat's settings in the GRPOConfig, the
calculator in rollouts through TRL's tool loop, and two real GRPO steps on CPU with the tiny checkpoint."""

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from nanochat_hf.rl import (
    NanoChatGRPOTrainer,
    RLArguments,
    completion_text,
    grpo_config,
    gsm8k_accuracy,
    parse_rl_args,
    prompts_for_completion,
    train,
)
from nanochat_hf.tokenizer import encode, load_tokenizer
from nanochat_hf.trl_support import NANOCHAT_RESPONSE_TEMPLATE, python

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
    assert (args.num_generations, args.beta, args.scale_rewards, args.loss_type) == (16, 0.0, "none", "dapo")
    assert (args.temperature, args.top_k, args.max_completion_length, args.num_iterations) == (1.0, 50, 256, 1)
    assert args.generation_batch_size == 16 * 16 and args.max_grad_norm == 0.0
    with pytest.raises(ValueError, match="must be a multiple of"):
        grpo_config(RLArguments(output_dir="/tmp/x", examples_per_step=3, num_samples=3, device_batch_size=4))


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
    <|assistant_start|>, and only there, so what follows the tool output is sampled freely."""
    tokenizer = load_tokenizer(str(tiny_checkpoint))
    sp = tokenizer.convert_tokens_to_ids
    call = [sp("<|python_start|>"), *encode(tokenizer, "6*7"), sp("<|python_end|>")]
    output = [sp("<|output_start|>"), *encode(tokenizer, "42"), sp("<|output_end|>")]
    context, sequence_bias = [sp("<|assistant_start|>")], []
    for token in call:
        sequence_bias.append([context + [token], 100.0])
        context = context + [token]

    batches, completions_seen = [], []
    generate_and_score = NanoChatGRPOTrainer._generate_and_score_completions

    def recording(self, inputs):
        batches.append(generate_and_score(self, inputs))
        return batches[-1]

    monkeypatch.setattr(NanoChatGRPOTrainer, "_generate_and_score_completions", recording)

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
    forced = call + output
    for batch in batches:
        loss_mask = batch["completion_mask"] * batch["tool_mask"]
        for ids, attend, trained in zip(batch["completion_ids"].tolist(), batch["completion_mask"].tolist(),
                                        loss_mask.tolist(), strict=True):
            n = sum(attend)
            assert ids[: len(forced)] == forced and n > len(forced)  # the model went on after the tool output
            # nanochat's mask: the call is trained, the inserted output is not, the model's own tokens after it are
            assert trained[:n] == [1] * len(call) + [0] * len(output) + [1] * (n - len(forced))
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
