"""The model with a real tokenizer: pipeline("text-generation"), TextIteratorStreamer, chat-template prompts, and
loading the tokenizer next to the model as a Hub user would."""

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer, pipeline

from nanochat_hf.data.embedded import embedded_corpus
from nanochat_hf.tokenizer.bpe import train_tokenizer
from nanochat_hf.training.init_model import build_model, save_atomically

from .conftest import randomize


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = train_tokenizer(embedded_corpus(max_chars=300_000), vocab_size=1024, show_progress=False)
    torch.manual_seed(0)
    model = build_model(tokenizer, 2, head_dim=32, aspect_ratio=32, max_position_embeddings=128, short_window=16)
    randomize(model, seed=0)
    out = tmp_path_factory.mktemp("gen") / "model"
    save_atomically(model, tokenizer, out)
    return out


def test_folder_holds_model_and_tokenizer(model_dir):
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "configuration_nanochat.py", "modeling_nanochat.py"):
        assert (model_dir / name).exists(), name
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.bos_token_id == tokenizer.convert_tokens_to_ids("<|bos|>")
    assert model.generation_config.eos_token_id == [
        tokenizer.convert_tokens_to_ids("<|assistant_end|>"),
        tokenizer.convert_tokens_to_ids("<|bos|>"),
    ]


def test_text_generation_pipeline(model_dir):
    generator = pipeline("text-generation", model=str(model_dir), trust_remote_code=True, device="cpu")
    out = generator("The Python language", max_new_tokens=12, do_sample=False)
    text = out[0]["generated_text"]
    assert text.startswith("The Python language") and len(text) > len("The Python language")
    # the pipeline's greedy continuation is the model's own greedy continuation
    tokenizer = generator.tokenizer
    ids = tokenizer("The Python language", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.convert_tokens_to_ids("<|bos|>")
    direct = generator.model.generate(ids, max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(direct[0], skip_special_tokens=True) == text


def test_chat_pipeline_and_left_padded_batch(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    chats = [[{"role": "user", "content": "What is 2+2?"}], [{"role": "user", "content": "Hi"}]]
    tokenizer.padding_side = "left"
    batch = tokenizer.apply_chat_template(
        chats, add_generation_prompt=True, return_dict=True, return_tensors="pt", padding=True
    )
    assert batch["input_ids"][1, 0] == tokenizer.pad_token_id  # the short prompt is left-padded
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=10, do_sample=False)
        for i, chat in enumerate(chats):
            single = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True,
                                                   return_tensors="pt")
            alone = model.generate(**single, max_new_tokens=10, do_sample=False)
            n = single["input_ids"].shape[1]
            width = batch["input_ids"].shape[1]
            new_alone = alone[0, n:]
            assert torch.equal(out[i, width : width + len(new_alone)], new_alone)


def test_text_iterator_streamer(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    inputs = tokenizer("Streams of text", return_tensors="pt")
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = {}

    def run():
        result["ids"] = model.generate(**inputs, streamer=streamer, max_new_tokens=16, do_sample=False)

    thread = threading.Thread(target=run)
    thread.start()
    pieces = list(streamer)
    thread.join()
    new_tokens = result["ids"][0, inputs["input_ids"].shape[1] :]
    assert "".join(pieces) == tokenizer.decode(new_tokens, skip_special_tokens=True)
    assert len(pieces) >= 1
