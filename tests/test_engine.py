"""The Engine on real NanoChat models: greedy decoding against transformers' `generate`, the replicated prompt cache
against separate prefills and full forwards, rows selected from a cache against their own sequences, seeded
sampling, the calculator tool forced into the stream (on a model whose weights spell out a tool call), UTF-8-safe
streaming, and loading by repo id with nanochat_hf absent."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from nanochat_hf.inference.engine import Engine, KVCache, Utf8Stream
from nanochat_hf.tokenizer.bpe import load_tokenizer
from nanochat_hf.training.init_model import build_model

from .conftest import CACHE_KW
from .hub_cache import populate_hub_cache

USER = [{"role": "user", "content": "What is 6 times 7?"}]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return Engine.from_pretrained(str(tiny_checkpoint))


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(str(tiny_checkpoint))


def chain_engine(tokenizer, chain: list[int], tail: dict[int, int] | None = None) -> Engine:
    """A real 2025-generation NanoChat whose greedy next token is chain[i + 1] after chain[i].

    nanochat's 2025 init zeroes every o_proj, fc2 and the LM head, so each layer adds nothing and the last hidden
    state is the normed embedding of the current token. Setting the LM-head row of token b to the embedding of
    token a then makes b the greedy successor of a, wherever a stands.
    """
    torch.manual_seed(0)
    model = build_model(tokenizer, depth=2, generation="2025", head_dim=32, max_position_embeddings=256).eval()
    successors = dict(zip(chain[:-1], chain[1:], strict=True)) | (tail or {})
    assert len(set(chain)) == len(chain), "a chain token needs a single successor"
    embed = model.model.embed_tokens.weight
    with torch.no_grad():
        for current, following in successors.items():
            model.lm_head.weight[following] += embed[current]
    return Engine(model, tokenizer)


def special(tokenizer, name: str) -> int:
    return tokenizer.convert_tokens_to_ids(f"<|{name}|>")


# ---------------------------------------------------------------------------------------------------------------
# Oracles: transformers' generate and full forwards


@pytest.mark.parametrize("generation", ["2026", "2025"])
def test_greedy_equals_transformers_generate(tiny_checkpoint, tokenizer, generation):
    if generation == "2026":  # the checkpoint: smear, value embeddings, sliding windows
        engine = Engine.from_pretrained(str(tiny_checkpoint))
    else:
        from .conftest import randomize

        torch.manual_seed(1)
        model = build_model(tokenizer, depth=2, generation="2025", head_dim=32, max_position_embeddings=256)
        engine = Engine(randomize(model, seed=1), tokenizer)
    prompt = engine.render_prompt(USER)
    tokens, masks = engine.generate_batch(prompt, max_tokens=40, temperature=0.0)
    with torch.no_grad():
        reference = engine.model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)
    reference = reference[0, len(prompt) :].tolist()
    stops = {special(tokenizer, "assistant_end"), special(tokenizer, "bos")}
    if reference[-1] in stops:  # generate keeps the stop token; the engine leaves it out
        reference = reference[:-1]
    assert tokens[0] == reference
    assert masks[0] == [1] * len(reference)  # no tool call happened in this run
    assert len(reference) >= 10


def test_replicated_prompt_cache_equals_separate_prefills_and_full_forwards(engine):
    model = engine.model
    # Longer than the checkpoint's short window (128), so sliding-window layers are exercised too.
    prompt = torch.randint(0, 500, (140,), generator=torch.Generator().manual_seed(0))
    steps = torch.randint(0, 500, (4, 3), generator=torch.Generator().manual_seed(1))  # (step, row)
    layers = model.config.num_hidden_layers

    def last_logits(ids, cache):
        return model(input_ids=ids, use_cache=True, logits_to_keep=1, **{CACHE_KW: cache}).logits[:, -1]

    with torch.no_grad():
        shared = KVCache(layers, 144)
        prefill_once = last_logits(prompt[None], shared)
        shared = shared.replicate(3)
        separate = KVCache(layers, 144)
        prefill_each = last_logits(prompt.repeat(3, 1), separate)
        torch.testing.assert_close(prefill_once.expand(3, -1), prefill_each, atol=1e-5, rtol=1e-5)
        for column in steps:
            replicated, independent = last_logits(column[:, None], shared), last_logits(column[:, None], separate)
            torch.testing.assert_close(replicated, independent, atol=1e-5, rtol=1e-5)
        for row in range(3):  # and the uncached model on each row's whole sequence
            full = model(torch.cat([prompt, steps[:, row]])[None], use_cache=False).logits[0, -1]
            torch.testing.assert_close(replicated[row], full, atol=1e-4, rtol=1e-4)


def test_selected_rows_of_a_cache_continue_as_their_own_sequences(tiny_model_factory):
    # what CORE scoring does: prefixes prefilled once, each copied to the rows of its options (smear's per-row
    # state included), then every row goes its own way; prompts cross the 8-token short window
    model = tiny_model_factory("2026", seed=11)
    gen = torch.Generator().manual_seed(11)
    prompts = torch.randint(0, 300, (2, 12), generator=gen)
    steps = torch.randint(0, 300, (3, 4), generator=gen)  # (step, row)
    owner = torch.tensor([1, 0, 1, 1])
    with torch.no_grad():
        cache = KVCache(model.config.num_hidden_layers, 16)
        model(input_ids=prompts, use_cache=True, **{CACHE_KW: cache})
        rows = cache.select_rows(owner)
        assert rows.get_seq_length() == 12 and cache.keys[0].shape[0] == 2  # the source is left as it was
        for column in steps:
            logits = model(input_ids=column[:, None], use_cache=True, **{CACHE_KW: rows}).logits[:, -1]
        for row in range(4):
            full = model(torch.cat([prompts[owner[row]], steps[:, row]])[None]).logits[0, -1]
            torch.testing.assert_close(logits[row], full, atol=1e-4, rtol=1e-4)


def test_greedy_samples_all_equal_the_single_sample(engine):
    prompt = engine.render_prompt(USER)
    single, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=20, temperature=0.0)
    many, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=20, temperature=0.0)
    assert many == single * 4


def test_sampling_is_seeded_independent_per_row_and_top_k_one_is_greedy(engine):
    prompt = engine.render_prompt(USER)
    a, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, seed=7)
    b, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, seed=7)
    c, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, seed=8)
    assert a == b and a != c
    # each row samples its own first token from the shared prefill (nanochat's fix 8f979a8), so rows differ
    assert len({tuple(row) for row in a}) > 1
    greedy, _ = engine.generate_batch(prompt, max_tokens=12, temperature=0.0)
    top1, _ = engine.generate_batch(prompt, max_tokens=12, temperature=1.0, top_k=1, seed=3)
    assert top1 == greedy


def test_top_k_samples_only_among_the_k_best(engine):
    prompt = engine.render_prompt(USER)
    with torch.no_grad():
        logits = engine.model(torch.tensor([prompt])).logits[0, -1]
    allowed = set(torch.topk(logits, 3).indices.tolist())
    firsts = {next(engine.generate(prompt, num_samples=8, max_tokens=1, top_k=3, seed=s))[0][i]
              for s in range(4) for i in range(8)}
    assert firsts <= allowed and len(firsts) > 1


def test_generate_stops_each_row_at_assistant_end(tokenizer):
    end = special(tokenizer, "assistant_end")
    hello = tokenizer.encode("Hello", add_special_tokens=False)
    chain = [special(tokenizer, "assistant_start"), *hello, end]
    engine = chain_engine(tokenizer, chain)
    prompt = engine.render_prompt(USER)
    steps = list(engine.generate(prompt, num_samples=2, max_tokens=50, temperature=0.0))
    assert len(steps) == len(hello) + 1  # the loop ends once every row has finished
    tokens, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=50, temperature=0.0)
    assert tokens == [hello, hello] and masks == [[1] * len(hello)] * 2


# ---------------------------------------------------------------------------------------------------------------
# Tool use on the real model path


def _tool_chain(tokenizer, expression: str) -> tuple[list[int], list[int]]:
    ids = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    expr = [t for ch in expression for t in ids(ch)]
    call = [special(tokenizer, "python_start"), *expr, special(tokenizer, "python_end")]
    return call, ids("!")


def test_python_block_runs_the_calculator_and_forces_its_output(tokenizer):
    call, bang = _tool_chain(tokenizer, "6*7")
    end = special(tokenizer, "assistant_end")
    # After <|python_end|> the model's own choice is overridden by the forced output; after <|output_end|> it
    # continues with "!" and ends.
    engine = chain_engine(tokenizer, [special(tokenizer, "assistant_start"), *call],
                          tail={special(tokenizer, "output_end"): bang[0], bang[0]: end})
    tokens, masks = engine.generate_batch(engine.render_prompt(USER), max_tokens=40, temperature=0.0)
    forced = [special(tokenizer, "output_start"), *tokenizer.encode("42", add_special_tokens=False),
              special(tokenizer, "output_end")]
    assert tokens[0] == call + forced + bang
    assert masks[0] == [1] * len(call) + [0] * len(forced) + [1]
    text = "".join(engine.stream_chat(USER, temperature=0.0))
    assert text == "\n```python\n6*7\n```\n```output\n42\n```\n!"
    # the reply re-renders through the chat template as one assistant turn with its tool call and output
    message = engine.reply_message(tokens[0])
    assert message["content"] == [
        {"type": "python", "text": "6*7"}, {"type": "python_output", "text": "42"}, {"type": "text", "text": "!"}
    ]
    again = tokenizer.apply_chat_template([*USER, message], tokenize=True, return_dict=False)
    assert tokenizer.decode(again) == tokenizer.decode(engine.render_prompt(USER) + tokens[0] + [end])


def test_failed_calculation_forces_nothing(tokenizer):
    call, bang = _tool_chain(tokenizer, "6/0")
    engine = chain_engine(tokenizer, [special(tokenizer, "assistant_start"), *call, *bang,
                                      special(tokenizer, "assistant_end")])
    tokens, masks = engine.generate_batch(engine.render_prompt(USER), max_tokens=40, temperature=0.0)
    assert tokens[0] == call + bang and masks[0] == [1] * len(tokens[0])


# ---------------------------------------------------------------------------------------------------------------
# Streaming text


def test_emoji_split_across_tokens_is_never_emitted_half_done(tokenizer):
    text = "Hi 👋 there 🎉!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # the emoji really are split into byte tokens
    stream = Utf8Stream(tokenizer)
    deltas = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert any("👋" in d for d in deltas) and any("🎉" in d for d in deltas)


def test_engine_streams_an_emoji_whole(tokenizer):
    ids = tokenizer.encode("Hi 👋", add_special_tokens=False)
    engine = chain_engine(tokenizer, [special(tokenizer, "assistant_start"), *ids,
                                      special(tokenizer, "assistant_end")])
    deltas = list(engine.stream_chat(USER, temperature=0.0))
    assert "".join(deltas) == "Hi 👋"
    assert all("\ufffd" not in d for d in deltas) and any("👋" in d for d in deltas)
    assert len(deltas) > 1  # streamed, not one block at the end


def test_stream_equals_decoding_the_generated_tokens(engine):
    prompt = engine.render_prompt(USER)
    tokens, _ = engine.generate_batch(prompt, max_tokens=30, temperature=0.8, seed=5)
    reply = []
    text = "".join(engine.stream(prompt, max_tokens=30, temperature=0.8, top_k=None, seed=5, reply_ids=reply))
    assert reply == tokens[0]
    assert text == engine.tokenizer.decode(tokens[0])


# ---------------------------------------------------------------------------------------------------------------
# Bad input and loading


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt_ids": []}, "prompt_ids"),
        ({"num_samples": 0}, "num_samples"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_k": 0}, "top_k"),
    ],
)
def test_bad_arguments_are_named(engine, kwargs, message):
    arguments = {"prompt_ids": engine.render_prompt(USER)} | kwargs
    with pytest.raises(ValueError, match=message):
        engine.generate_batch(**arguments)


def test_tokenizer_without_nanochat_tokens_is_refused(engine):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]")),
                                   unk_token="[UNK]")
    with pytest.raises(ValueError, match="<\\|bos\\|>.*nanochat-hf tokenizer train"):
        Engine(engine.model, bare)


def test_missing_model_folder_fails_clearly(tmp_path):
    with pytest.raises(OSError):
        Engine.from_pretrained(str(tmp_path / "nope"))


def test_vendored_engine_loads_a_repo_id_without_nanochat_hf(tiny_checkpoint, engine, tmp_path):
    """What the Space does: engine.py + tools.py copied into its own package, the model fetched by repo id (here
    from an offline Hub cache) with its remote code, and nanochat_hf not installed."""
    vendor = tmp_path / "vendor" / "space_engine"
    vendor.mkdir(parents=True)
    package = os.path.dirname(sys.modules["nanochat_hf.inference.engine"].__file__)
    for name in ("engine.py", "tools.py"):
        shutil.copy(os.path.join(package, name), vendor / name)
    (vendor / "__init__.py").write_text("")
    cache = tmp_path / "hf_cache"
    populate_hub_cache(tiny_checkpoint, "someone/nanochat-tiny", cache)
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["nanochat_hf"] = None  # importing it now fails
        sys.path.insert(0, {str(vendor.parent)!r})
        from space_engine.engine import Engine
        engine = Engine.from_pretrained("someone/nanochat-tiny")
        assert "nanochat_hf" not in type(engine.model).__module__
        tokens, _ = engine.generate_batch(engine.render_prompt({USER!r}), max_tokens=16, temperature=0.0)
        print(json.dumps(tokens[0]))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    expected, _ = engine.generate_batch(engine.render_prompt(USER), max_tokens=16, temperature=0.0)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected[0]


def test_engine_and_tools_import_only_torch_transformers_and_each_other():
    import ast

    package = os.path.dirname(sys.modules["nanochat_hf.inference.engine"].__file__)
    allowed = {"torch", "transformers"} | set(sys.stdlib_module_names)
    for name in ("engine.py", "tools.py"):
        tree = ast.parse(open(os.path.join(package, name)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: only the sibling
                    assert node.module == "tools", f"{name} imports .{node.module}"
                    continue
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert set(roots) <= allowed, f"{name} imports {roots}"
