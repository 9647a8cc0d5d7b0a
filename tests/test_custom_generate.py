"""The calculator tool loop as a transformers `custom_generate` (nanochat_hf/custom_generate/), against the Engine."""

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanochat_hf.custom_generate import stage_custom_generate
from nanochat_hf.inference.engine import Engine
from nanochat_hf.training.init_model import build_model, save_atomically


def scripted_model(tokenizer, script: list[int]):
    """A 2025 model whose greedy next token depends on the current token alone: `script[i]` -> `script[i + 1]`.

    nanochat's init zeroes every layer's output projections, so the last hidden state is the normed embedding of
    the current token; the lm_head row of each scripted successor is that embedding, scaled."""
    torch.manual_seed(0)
    model = build_model(tokenizer, depth=1, generation="2025", aspect_ratio=128, max_position_embeddings=64)
    with torch.no_grad():
        embeddings = model.model.embed_tokens.weight
        embeddings.copy_(torch.randn_like(embeddings))
        model.lm_head.weight.zero_()
        for current, successor in zip(script, script[1:], strict=False):
            direction = torch.nn.functional.rms_norm(embeddings[current], (embeddings.shape[1],))
            model.lm_head.weight[successor] += 12 / embeddings.shape[1] * direction  # logit 12, under the softcap
    return model.eval()


@pytest.fixture(scope="module")
def tool_folder(tiny_checkpoint, tmp_path_factory):
    """A model folder as `push` stages it (custom_generate/ included) with a model that writes `12*34` in a python
    block after the prompt, then (after the tool's output) ends its turn."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    special = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>") for name in
               ("python_start", "python_end", "output_end", "assistant_end", "assistant_start")}
    expression = tokenizer.encode("12*34", add_special_tokens=False)
    assert len(set(expression)) == len(expression)  # each scripted token has one successor
    script = [special["assistant_start"], special["python_start"], *expression, special["python_end"]]
    model = scripted_model(tokenizer, script)
    with torch.no_grad():  # after the forced <|output_end|>, end the turn
        end = torch.nn.functional.rms_norm(model.model.embed_tokens.weight[special["output_end"]], (128,))
        model.lm_head.weight[special["assistant_end"]] += 12 / 128 * end
    folder = save_atomically(model, tokenizer, tmp_path_factory.mktemp("tool") / "model")
    stage_custom_generate(folder)
    return folder, special


def test_stage_writes_generate_and_vendored_calculator(tmp_path):
    target = stage_custom_generate(tmp_path)
    assert sorted(p.name for p in target.iterdir()) == ["generate.py", "tools.py"]
    assert "from .tools import calculate" in (target / "generate.py").read_text()


def test_custom_generate_answers_through_the_calculator_like_the_engine(tool_folder):
    folder, special = tool_folder
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12*34?"}],
                                           add_generation_prompt=True, return_dict=False)
    engine_tokens, masks = Engine(model, tokenizer).generate_batch(list(prompt), max_tokens=20, temperature=0.0)
    ids = torch.tensor([prompt])
    out = model.generate(ids, custom_generate=str(folder), trust_remote_code=True, max_new_tokens=20,
                         do_sample=False)
    generated = out[0, len(prompt):].tolist()
    assert generated[-1] == special["assistant_end"]
    assert generated[:-1] == engine_tokens[0]
    text = tokenizer.decode(generated)
    assert text == "<|python_start|>12*34<|python_end|><|output_start|>408<|output_end|><|assistant_end|>"
    assert 0 in masks[0]  # the engine forced the answer too
    # transformers' plain generate (GenerationMixin's) has no tool: after <|python_end|> it is on its own
    from transformers import GenerationMixin
    plain = GenerationMixin.generate(model, ids, max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    assert "408" not in tokenizer.decode(plain)


def test_custom_generate_batch_and_pipeline(tool_folder):
    from transformers import pipeline

    folder, _ = tool_folder
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)  # generate replaced on load
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12*34?"}],
                                           add_generation_prompt=True, return_dict=False)
    padded = torch.tensor([[tokenizer.pad_token_id] * 3 + list(prompt)])
    mask = torch.ones_like(padded)
    mask[0, :3] = 0
    out = model.generate(padded, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert "<|output_start|>408<|output_end|>" in tokenizer.decode(out[0, padded.shape[1]:])
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = tokenizer.decode(prompt)
    reply = generator(text, max_new_tokens=12, do_sample=False, return_full_text=False,
                      add_special_tokens=False)[0]["generated_text"]
    assert "408" in reply


def test_custom_generate_without_tool_tokens_is_plain_generate(tool_folder, tmp_path):
    folder, _ = tool_folder
    copy = shutil.copytree(folder, tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(copy, trust_remote_code=True)
    from transformers import GenerationMixin
    ids = torch.tensor([[5, 6, 7]])
    ours = model.generate(ids, max_new_tokens=6, do_sample=False)
    plain = GenerationMixin.generate(model, ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, plain)
