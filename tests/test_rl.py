"""RL through TRL's GRPOTrainer: nanochat's GSM8K reward on fixtures, nanochat's settings in the GRPOConfig, and two
real GRPO steps on CPU with the tiny checkpoint."""

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from nanochat_hf.rl import RLArguments, grpo_config, gsm8k_accuracy, parse_rl_args, prompts_for_completion, train
from nanochat_hf.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*/rl.yaml"))


def gsm8k_rows(n: int = 8) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Tom has {a} apples and buys {a} more. How many now?"},
                          {"role": "assistant", "content": f"{a}+{a}={2 * a}\n#### {2 * a}"}],
             "answer": str(2 * a)} for a in range(1, n + 1)]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.parent.name)
def test_every_recipe_parses(recipe):
    args = parse_rl_args(["--config", str(recipe)])
    assert args.output_dir.startswith("runs/") and args.init_from.endswith("sft/final")
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


def test_two_real_grpo_steps(tiny_checkpoint, tmp_path):
    def short_answers(completions, **kwargs):
        # a second reward with spread, so the advantages (and the update) are not all zero for a random model
        return [-float(len(c[0]["content"])) for c in completions]

    out = tmp_path / "rl"
    final = train(RLArguments(output_dir=str(out), init_from=str(tiny_checkpoint), examples_per_step=2,
                              num_samples=4, device_batch_size=4, max_new_tokens=12, num_iterations=2, save_every=-1),
                  dataset=Dataset.from_list(gsm8k_rows()), reward_funcs=[gsm8k_accuracy, short_answers])
    steps = [json.loads(line)["step"] for line in (out / "losses.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    assert not torch.equal(model.model.layers[0].mlp.fc1.weight, base.model.layers[0].mlp.fc1.weight)


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a save_pretrained model folder"):
        train(RLArguments(init_from=str(tmp_path), output_dir=str(tmp_path / "o")))


def test_cpu_recipe_runs_on_the_arithmetic_task(tiny_checkpoint, tmp_path):
    out = tmp_path / "rl"
    train(parse_rl_args(["--config", str(ROOT / "recipes/cpu/rl.yaml"), "--init_from", str(tiny_checkpoint),
                         "--output_dir", str(out), "--num_iterations", "1", "--max_examples", "16",
                         "--examples_per_step", "2", "--max_new_tokens", "8"]))
    assert (out / "final" / "model.safetensors").exists()
