"""A saved model is self-contained: it loads with `trust_remote_code=True` where `nanochat_hf` cannot be imported,
from a folder and by repo id from an offline HF cache."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from nanochat_hf import NanoChatForCausalLM

from .hub_cache import populate_hub_cache

# The start of every script below: run in a fresh interpreter, `nanochat_hf` is made unimportable before
# transformers is touched.
BLOCK_PACKAGE = textwrap.dedent(
    """
    import sys, json
    class BlockNanochatHF:
        def find_spec(self, name, path=None, target=None):
            if name == "nanochat_hf" or name.startswith("nanochat_hf."):
                raise ImportError("nanochat_hf is blocked in this test")
    sys.meta_path.insert(0, BlockNanochatHF())
    """
)
LOADER = BLOCK_PACKAGE + textwrap.dedent(
    """
    import torch
    from transformers import AutoModelForCausalLM
    source, ids_path, out_path = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True).eval()
    assert "nanochat_hf" not in sys.modules
    ids = torch.load(ids_path)
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    torch.save({"logits": logits, "generated": generated, "cls": type(model).__module__}, out_path)
    """
)


def _save(tmp_path: Path, model: NanoChatForCausalLM) -> Path:
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    return folder


def _load_elsewhere(tmp_path: Path, source: str, ids: torch.Tensor, env: dict | None = None) -> dict:
    ids_path, out_path = tmp_path / "ids.pt", tmp_path / "out.pt"
    torch.save(ids, ids_path)
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    full_env = {**os.environ, **(env or {})}
    result = subprocess.run(
        [sys.executable, str(script), source, str(ids_path), str(out_path)],
        cwd=tmp_path,  # not the repo root, so the source tree is not on sys.path either
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out_path)


def test_save_pretrained_writes_auto_map_and_code(tmp_path, tiny_model_factory):
    folder = _save(tmp_path, tiny_model_factory("2026"))
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "nanochat_hf"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_nanochat.NanoChatConfig",
        "AutoModelForCausalLM": "modeling_nanochat.NanoChatForCausalLM",
    }
    assert (folder / "configuration_nanochat.py").exists() and (folder / "modeling_nanochat.py").exists()
    assert (folder / "model.safetensors").exists()
    # the shipped code imports nothing but the standard library, torch, transformers and its sibling
    for name in ("configuration_nanochat.py", "modeling_nanochat.py"):
        for line in (folder / name).read_text().splitlines():
            if line.startswith(("import ", "from ")):
                module = line.split()[1]
                root = module.split(".")[0]
                assert root in {"torch", "transformers", "", "configuration_nanochat"} or root in sys.stdlib_module_names, line


def test_from_pretrained_in_process_keeps_weights(tmp_path, tiny_model_factory):
    model = tiny_model_factory("2026", seed=3)
    folder = _save(tmp_path, model)
    loaded = NanoChatForCausalLM.from_pretrained(folder).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_remote_code_from_folder_without_package(tmp_path, tiny_model_factory):
    model = tiny_model_factory("2026", seed=4)
    folder = _save(tmp_path, model)
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(4))
    out = _load_elsewhere(tmp_path, str(folder), ids)
    with torch.no_grad():
        expected = model(ids).logits
    assert "nanochat_hf" not in out["cls"]
    assert (out["logits"] - expected).abs().max() <= 1e-6


def test_remote_code_by_repo_id_from_offline_hub_cache(tmp_path, tiny_model_factory):
    model = tiny_model_factory("2025", seed=5)
    folder = _save(tmp_path, model)
    cache = tmp_path / "hf_cache"
    populate_hub_cache(folder, "someone/nanochat-tiny", cache)
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(5))
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf_home")}
    out = _load_elsewhere(tmp_path, "someone/nanochat-tiny", ids, env)
    with torch.no_grad():
        expected = model(ids).logits
        generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert (out["logits"] - expected).abs().max() <= 1e-6
    assert torch.equal(out["generated"], generated)


TOKENIZER_LOADER = BLOCK_PACKAGE + textwrap.dedent(
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    source, out_path = sys.argv[1:3]
    text = "Hello world! 12+34 = 46 <|bos|>"
    trusted = AutoTokenizer.from_pretrained(source, trust_remote_code=True)
    fast = PreTrainedTokenizerFast.from_pretrained(source)
    print("=== bare call ===", flush=True)
    bare = AutoTokenizer.from_pretrained(source)
    chat = trusted.apply_chat_template([{"role": "user", "content": "hi <|bos|>"}], add_generation_prompt=True, tokenize=True)
    chat = list(chat["input_ids"] if hasattr(chat, "keys") else chat)
    json.dump({
        "trusted": trusted(text)["input_ids"], "bare": bare(text)["input_ids"], "fast": fast(text)["input_ids"],
        "fast_max_length": fast.model_max_length,
        "max_length": trusted.model_max_length, "chat": chat, "blocked": "nanochat_hf" not in sys.modules,
    }, open(out_path, "w"))
    """
)


def test_auto_tokenizer_loads_without_a_prompt_and_with_the_context_length(tmp_path, tiny_checkpoint):
    """The documented calls (`trust_remote_code=True` as for the model, or PreTrainedTokenizerFast) ask nothing,
    stdin closed; a bare call, whose config.json transformers reads first and asks about, still ends and gives the
    same tokens (README: why the bare call cannot be silent under transformers 5.24)."""
    import tokenizers

    script, out_path = tmp_path / "tok.py", tmp_path / "tok.json"
    script.write_text(TOKENIZER_LOADER)
    result = subprocess.run(
        [sys.executable, str(script), str(tiny_checkpoint), str(out_path)],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trusted_output = (result.stdout + result.stderr).split("=== bare call ===")[0]
    assert "Do you wish to run the custom code" not in trusted_output and "trust_remote_code" not in trusted_output
    out = json.loads(out_path.read_text())
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    reference = tokenizers.Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    text = "Hello world! 12+34 = 46 <|bos|>"
    assert out["blocked"]
    assert out["trusted"] == out["bare"] == out["fast"] == reference.encode(text).ids
    assert out["max_length"] == out["fast_max_length"] == config["max_position_embeddings"] == 256
    # the chat template is the tokenizer's: a message's literal "<|bos|>" is text, not a second bos
    assert out["chat"][0] == config["bos_token_id"] and config["bos_token_id"] not in out["chat"][1:]


def test_with_the_package_imported_bare_auto_calls_ask_nothing(tiny_checkpoint, monkeypatch):
    """`import nanochat_hf` registers the model type, so AutoConfig/AutoTokenizer/AutoModelForCausalLM need no
    trust_remote_code and never reach transformers' question (answering it here would fail the test)."""
    import builtins

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from nanochat_hf import NanoChatConfig

    def no_prompt(*_):
        raise AssertionError("transformers asked about remote code")

    monkeypatch.setattr(builtins, "input", no_prompt)
    config = AutoConfig.from_pretrained(tiny_checkpoint)  # the prompt's failure would raise ValueError here
    assert type(config) is NanoChatConfig
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    assert tokenizer.model_max_length == config.max_position_embeddings
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    assert type(model) is NanoChatForCausalLM
