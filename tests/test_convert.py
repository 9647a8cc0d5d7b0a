"""nanochat checkpoint interop: import, export back, export to transformers' built-in `nanochat`, bad input.

The nanochat files are written here from nanochat-spec.md §11 (key names, shapes, dtypes, meta fields) and a
tokenizer trained with rustbpe and pickled as a real `tiktoken.Encoding`, independently of the converter. Imported
models are checked against `nanochat_forward`, run on the *original* nanochat state dict.
"""

import argparse
import json
import math
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from nanochat_hf import NanoChatForCausalLM
from nanochat_hf.hub.convert import ConversionError, from_nanochat, to_nanochat, to_transformers
from nanochat_hf.hub.convert_cli import add_convert_parser
from nanochat_hf.tokenizer.bpe import CHAT_TEMPLATE, SPLIT_PATTERN, load_tokenizer, token_bytes, train_tokenizer

from .nanochat_reference import nanochat_forward

tiktoken = pytest.importorskip("tiktoken")
rustbpe = pytest.importorskip("rustbpe")

ATOL = 1e-5
L, H, KV, D, SEQ = 4, 4, 2, 64, 256  # head_dim 16; SEQ 256 -> nanochat's short window ceil(256/4/128)*128 = 128
SPECIALS = [
    "<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>",
]  # fmt: skip

VARIED_TEXT = (
    "Hello world! The quick brown fox jumps over the lazy dog; it's 2026, isn't it?\n\n"
    "def f(x):\n    return x ** 2  # squares\n\tif x != None: print(f'{x:>8}')\n"
    "Emoji: 🙂🚀👩‍💻 and CJK: 你好，世界。日本語のテキスト。한국어 문장.\n"
    "Numbers 1234567 3.14159 -42 1e-5 and   whitespace   runs\t\t\n\n\n   end  "
)


def _corpus() -> list[str]:
    words = "the of and to in is was for that with as on by at from nanochat model token merge byte".split()
    lines = [VARIED_TEXT] * 3
    for i in range(400):
        lines.append(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) + f" {i} {i * 37 % 1000}.")
    return lines


@pytest.fixture(scope="module")
def tiktoken_encodings():
    """Real tiktoken Encodings of nanochat's layout (rustbpe ranks, then the 9 specials), cached per vocab size."""
    cache = {}

    def make(vocab_size: int):
        if vocab_size not in cache:
            bpe = rustbpe.Tokenizer()
            bpe.train_from_iterator(iter(_corpus()), vocab_size - len(SPECIALS), pattern=SPLIT_PATTERN)
            ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
            assert len(ranks) == vocab_size - len(SPECIALS), "corpus too small for the requested vocab"
            specials = {name: len(ranks) + i for i, name in enumerate(SPECIALS)}
            cache[vocab_size] = tiktoken.Encoding(
                name="rustbpe", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials
            )
        return cache[vocab_size]

    return make


# ---------------------------------------------------------------------------------------------------------------
# nanochat's files, per nanochat-spec.md §11


def nanochat_state_dict(
    generation: str, vocab_size: int, seed: int = 0, pad64: bool | None = None
) -> dict[str, torch.Tensor]:
    """Random weights in nanochat's exact format: names, state_dict order, shapes, padding and dtypes.

    HEAD pads the per-token tables to a multiple of 64; so did the 2025 architecture from bc51da8 (2025-12-23) on.
    """
    gen = torch.Generator().manual_seed(seed)
    hd = D // H
    pad64 = generation == "2026" if pad64 is None else pad64
    rows = math.ceil(vocab_size / 64) * 64 if pad64 else vocab_size

    def mat(out_features: int, in_features: int) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=gen) / math.sqrt(in_features)

    def scalars(n: int) -> torch.Tensor:
        return 0.5 + 0.5 * torch.rand(n, generator=gen)

    sd = {}
    if generation == "2026":
        sd |= {"resid_lambdas": scalars(L), "x0_lambdas": scalars(L), "smear_lambda": scalars(1)}
        sd["backout_lambda"] = scalars(1)
    sd["transformer.wte.weight"] = torch.randn(rows, D, generator=gen).to(torch.bfloat16)
    ve_layers = [i for i in range(L) if i % 2 == (L - 1) % 2] if generation == "2026" else []
    for i in range(L):
        p = f"transformer.h.{i}."
        sd[p + "attn.c_q.weight"] = mat(H * hd, D)
        sd[p + "attn.c_k.weight"] = mat(KV * hd, D)
        sd[p + "attn.c_v.weight"] = mat(KV * hd, D)
        sd[p + "attn.c_proj.weight"] = mat(D, D)
        if i in ve_layers:
            sd[p + "attn.ve_gate.weight"] = mat(KV, 12)
        sd[p + "mlp.c_fc.weight"] = mat(4 * D, D)
        sd[p + "mlp.c_proj.weight"] = mat(D, 4 * D)
    sd["lm_head.weight"] = mat(rows, D)
    if generation == "2026":
        sd["smear_gate.weight"] = mat(1, 24)
        for i in ve_layers:
            sd[f"value_embeds.{i}.weight"] = torch.randn(rows, KV * hd, generator=gen).to(torch.bfloat16)
    return sd


def nanochat_meta(generation: str, vocab_size: int, step: int) -> dict:
    model_config = {"sequence_len": SEQ, "vocab_size": vocab_size, "n_layer": L, "n_head": H, "n_kv_head": KV}
    model_config["n_embd"] = D
    meta = {"step": step, "val_bpb": 0.8123, "model_config": model_config}
    meta |= {"user_config": {"depth": L, "max_seq_len": SEQ}, "device_batch_size": 4, "max_seq_len": SEQ}
    if generation == "2026":
        model_config["window_pattern"] = "SSSL"
        meta |= {"total_batch_size": 1024, "dataloader_state_dict": {"pq_idx": 0, "rg_idx": 3, "epoch": 1}}
        meta["loop_state"] = {"min_val_bpb": 0.81, "smooth_train_loss": 2.5, "total_training_time": 12.0}
    return meta


def oracle_config(generation: str, vocab_size: int) -> dict:
    """`nanochat_forward`'s cfg, from the spec's constants rather than from our config class."""
    modern = generation == "2026"
    return {
        "n_layer": L, "n_head": H, "n_kv_head": KV, "n_embd": D, "vocab_size": vocab_size,
        "rope_base": 100_000.0 if modern else 10_000.0, "qk_scale": 1.2 if modern else 1.0,
        "window_pattern": "SSSL" if modern else "L", "long_window": SEQ if modern else -1,
        "short_window": math.ceil(SEQ / 4 / 128) * 128 if modern else SEQ, "softcap": 15.0,
        "has_smear": modern, "has_lambdas": modern, "has_backout": modern,
    }  # fmt: skip


def write_tokenizer(folder: Path, encoding) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "tokenizer.pkl").open("wb") as f:
        pickle.dump(encoding, f)
    lengths = [len(encoding.decode_single_token_bytes(i)) for i in range(encoding.n_vocab)]
    for token_id in encoding._special_tokens.values():
        lengths[token_id] = 0
    torch.save(torch.tensor(lengths, dtype=torch.int32), folder / "token_bytes.pt")


def write_checkpoint(folder: Path, sd: dict, meta: dict, compiled: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if compiled:  # a torch.compile'd model's state_dict
        sd = {f"_orig_mod.{k}": v for k, v in sd.items()}
    torch.save(sd, folder / f"model_{meta['step']:06d}.pt")
    (folder / f"meta_{meta['step']:06d}.json").write_text(json.dumps(meta))


CASES = {
    # generation, vocab size, layout, `_orig_mod.` prefix
    "2025": ("2025", 300, "base_dir", False),
    "2026": ("2026", 320, "flat", True),
    "2026-padded": ("2026", 300, "base_dir", False),  # 300 -> 320 rows: 20 padding rows in every table
}


@pytest.fixture(scope="module")
def nanochat_run(tmp_path_factory, tiktoken_encodings):
    """A nanochat output folder per case, with an older step that must not be picked; cached per case."""
    cache = {}

    def make(case: str) -> dict:
        if case not in cache:
            generation, vocab, layout, compiled = CASES[case]
            root = tmp_path_factory.mktemp(f"nanochat-{case}")
            ckpt = root / "base_checkpoints" / "d4" if layout == "base_dir" else root
            encoding = tiktoken_encodings(vocab)
            write_tokenizer(root / "tokenizer" if layout == "base_dir" else root, encoding)
            write_checkpoint(
                ckpt, nanochat_state_dict(generation, vocab, seed=99), nanochat_meta(generation, vocab, 5)
            )
            sd = nanochat_state_dict(generation, vocab, seed=1)
            write_checkpoint(ckpt, sd, nanochat_meta(generation, vocab, 20), compiled=compiled)
            converted = tmp_path_factory.mktemp(f"hf-{case}") / "hf"  # outside the input folder, as required
            from_nanochat(ckpt, converted)
            cache[case] = {"ckpt": ckpt, "sd": sd, "encoding": encoding, "hf": converted, "root": root}
        return cache[case]

    return make


# ---------------------------------------------------------------------------------------------------------------
# from-nanochat


@pytest.mark.parametrize("case", list(CASES))
def test_from_nanochat_matches_nanochat_forward(nanochat_run, case):
    run = nanochat_run(case)
    generation, vocab, _, _ = CASES[case]
    model = NanoChatForCausalLM.from_pretrained(run["hf"]).eval()
    assert model.config.generation == generation and model.config.vocab_size == vocab
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = torch.randint(0, vocab, (2, 150), generator=torch.Generator().manual_seed(0))  # > the 128-token window
    with torch.no_grad():
        ours = model(ids).logits
        expected = nanochat_forward(run["sd"], oracle_config(generation, vocab), ids)
    assert (ours - expected).abs().max().item() <= ATOL

    bos, assistant_end = vocab - 9, vocab - 5
    assert (model.config.bos_token_id, model.config.eos_token_id) == (bos, assistant_end)
    assert model.generation_config.eos_token_id == [assistant_end, bos]
    saved = json.loads((run["hf"] / "config.json").read_text())
    assert saved["nanochat_meta"]["step"] == 20 and saved["nanochat_meta"]["val_bpb"] == 0.8123


@pytest.mark.parametrize("case", ["2025", "2026-padded"])
def test_from_nanochat_tokenizer_ids_match_tiktoken(nanochat_run, case):
    run = nanochat_run(case)
    encoding = run["encoding"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(run["hf"])
    for text in [VARIED_TEXT, *VARIED_TEXT.split("\n"), "   ", "a" * 50, "1234567890" * 3, ""]:
        expected = encoding.encode_ordinary(text)
        assert tokenizer.encode(text, add_special_tokens=False) == expected, text
        assert tokenizer.decode(expected) == text
    for name in SPECIALS:
        assert tokenizer.convert_tokens_to_ids(name) == encoding.encode_single_token(name)
    assert len(tokenizer) == encoding.n_vocab
    assert tokenizer.chat_template == CHAT_TEMPLATE
    tokenizer_dir = run["root"] / "tokenizer" if CASES[case][2] == "base_dir" else run["root"]
    assert torch.equal(token_bytes(tokenizer), torch.load(tokenizer_dir / "token_bytes.pt", weights_only=True))


def test_from_nanochat_2025_with_vocab_padding(nanochat_run, tmp_path):
    """A late-2025 checkpoint: 2025 architecture, tables padded 300 -> 320. The padding rows are dropped (our 2025
    config does not pad); logits are unchanged, and the export writes ORIG's unpadded layout."""
    run = nanochat_run("2025")
    sd = nanochat_state_dict("2025", 300, seed=5, pad64=True)
    assert sd["lm_head.weight"].shape[0] == 320
    write_checkpoint(tmp_path / "ckpt", sd, nanochat_meta("2025", 300, 1))
    from_nanochat(tmp_path / "ckpt", tmp_path / "hf", tokenizer_dir=run["root"] / "tokenizer")
    model = NanoChatForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert model.lm_head.weight.shape[0] == 300
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        diff = (model(ids).logits - nanochat_forward(sd, oracle_config("2025", 300), ids)).abs().max().item()
    assert diff <= ATOL
    to_nanochat(tmp_path / "hf", tmp_path / "nano")
    exported = torch.load(tmp_path / "nano" / "model_000001.pt", weights_only=True)
    assert torch.equal(exported["lm_head.weight"], sd["lm_head.weight"][:300])


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_tokenizer_conversion_at_full_vocab_size():
    """A 32,768-token rustbpe vocabulary (nanochat HEAD's size), trained on the Python standard library's sources:
    tiktoken -> tokenizer.json -> tiktoken keeps every rank, and both encode a large text identically."""
    import sysconfig

    from nanochat_hf.hub.tiktoken_format import TiktokenState, hf_to_tiktoken, tiktoken_to_hf

    texts = [p.read_text(errors="replace") for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))]
    texts.append(VARIED_TEXT * 20)
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(texts), 32768 - len(SPECIALS), pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIALS)}
    encoding = tiktoken.Encoding(name="rustbpe", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    tokenizer = tiktoken_to_hf(TiktokenState("rustbpe", SPLIT_PATTERN, ranks, specials), Path("tokenizer.pkl"))
    assert len(tokenizer) == 32768
    sample = "\n".join(texts[::40]) + VARIED_TEXT
    assert tokenizer.encode(sample, add_special_tokens=False) == encoding.encode_ordinary(sample)
    back = hf_to_tiktoken(tokenizer, Path("tokenizer.json"))
    assert back.mergeable_ranks == ranks and back.special_tokens == specials and back.pat_str == SPLIT_PATTERN


# ---------------------------------------------------------------------------------------------------------------
# round trips


def _tensors_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("case", ["2025", "2026-padded"])
def test_round_trip_from_to_from(nanochat_run, case, tmp_path):
    run = nanochat_run(case)
    to_nanochat(run["hf"], tmp_path / "nano")
    files = sorted(p.name for p in (tmp_path / "nano").iterdir())
    assert files == ["meta_000020.json", "model_000020.pt", "token_bytes.pt", "tokenizer.pkl"]
    exported = torch.load(tmp_path / "nano" / "model_000020.pt", weights_only=True)
    _tensors_equal(exported, run["sd"])  # same keys in nanochat's order, dtypes (bf16 tables), padding, values
    meta = json.loads((tmp_path / "nano" / "meta_000020.json").read_text())
    generation, vocab, _, _ = CASES[case]
    assert meta == nanochat_meta(generation, vocab, 20)
    tokenizer_dir = run["ckpt"].parents[1] / "tokenizer" if CASES[case][2] == "base_dir" else run["ckpt"]
    original_bytes = torch.load(tokenizer_dir / "token_bytes.pt", weights_only=True)
    assert torch.equal(torch.load(tmp_path / "nano" / "token_bytes.pt", weights_only=True), original_bytes)
    with (tmp_path / "nano" / "tokenizer.pkl").open("rb") as f:
        encoding = pickle.load(f)
    assert isinstance(encoding, tiktoken.Encoding)
    assert encoding._mergeable_ranks == run["encoding"]._mergeable_ranks
    assert encoding._special_tokens == run["encoding"]._special_tokens
    assert encoding._pat_str == run["encoding"]._pat_str
    assert encoding.encode_ordinary(VARIED_TEXT) == run["encoding"].encode_ordinary(VARIED_TEXT)

    from_nanochat(tmp_path / "nano", tmp_path / "hf2")
    _tensors_equal(load_file(tmp_path / "hf2" / "model.safetensors"), load_file(run["hf"] / "model.safetensors"))
    assert json.loads((tmp_path / "hf2" / "tokenizer.json").read_text()) == json.loads(
        (run["hf"] / "tokenizer.json").read_text()
    )


def _bf16_exact(model: NanoChatForCausalLM) -> NanoChatForCausalLM:
    with torch.no_grad():
        for table in [model.model.embed_tokens, *model.model.value_embeds.values()]:
            table.weight.copy_(table.weight.to(torch.bfloat16).float())
    return model


@pytest.fixture(scope="module")
def our_tokenizer():
    """A tokenizer trained by nanochat_hf itself (tokenizers' BpeTrainer), not converted from tiktoken."""
    return train_tokenizer(_corpus(), 300, show_progress=False)


@pytest.mark.parametrize("generation", ["2025", "2026"])
def test_round_trip_to_from(our_tokenizer, tiny_model_factory, generation, tmp_path, caplog):
    """Our model -> nanochat -> ours is bit-exact: bf16-representable tables, or fp32 ones kept with the flag."""
    tokenizer = our_tokenizer
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in ("<|bos|>", "<|assistant_end|>")}
    model = tiny_model_factory(
        generation, vocab_size=300, max_position_embeddings=SEQ, bos_token_id=ids["<|bos|>"],
        eos_token_id=ids["<|assistant_end|>"], pad_token_id=ids["<|assistant_end|>"],
        **({"short_window": 128} if generation == "2026" else {}),
    )  # fmt: skip
    for keep_fp32 in (False, True):
        if not keep_fp32:
            _bf16_exact(model)
        else:
            with torch.no_grad():
                model.model.embed_tokens.weight.add_(1e-4)  # no longer bf16-representable
        src, nano, back = (tmp_path / f"{name}{keep_fp32}" for name in ("src", "nano", "back"))
        model.save_pretrained(src)
        tokenizer.save_pretrained(src)
        caplog.clear()
        to_nanochat(src, nano, keep_fp32_embeddings=keep_fp32)
        assert "rounded to bfloat16" not in caplog.text
        exported = torch.load(nano / "model_000000.pt", weights_only=True)
        assert exported["transformer.wte.weight"].dtype == (torch.float32 if keep_fp32 else torch.bfloat16)
        from_nanochat(nano, back)
        _tensors_equal(load_file(back / "model.safetensors"), load_file(src / "model.safetensors"))
        assert load_tokenizer(str(back)).get_vocab() == tokenizer.get_vocab()

    # the pickled tiktoken Encoding encodes exactly like the tokenizer it was written from
    with (nano / "tokenizer.pkl").open("rb") as f:
        encoding = pickle.load(f)
    for text in [VARIED_TEXT, *VARIED_TEXT.split("\n")]:
        assert encoding.encode_ordinary(text) == tokenizer.encode(text, add_special_tokens=False)
    assert {name: encoding.encode_single_token(name) for name in SPECIALS} == {
        name: tokenizer.convert_tokens_to_ids(name) for name in SPECIALS
    }
    assert torch.equal(torch.load(nano / "token_bytes.pt", weights_only=True), token_bytes(tokenizer))


def test_to_nanochat_refuses_tokenizer_tiktoken_cannot_express(our_tokenizer, tiny_model_factory, tmp_path):
    model = tiny_model_factory("2025", vocab_size=300)
    model.save_pretrained(tmp_path / "src")
    our_tokenizer.save_pretrained(tmp_path / "src")
    spec = json.loads((tmp_path / "src" / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    (tmp_path / "src" / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ConversionError, match="tokenizer.json: pre-tokenizer .* is not Split"):
        to_nanochat(tmp_path / "src", tmp_path / "out")
    spec = json.loads(our_tokenizer.backend_tokenizer.to_str())
    spec["model"]["merges"][3], spec["model"]["merges"][4] = spec["model"]["merges"][4], spec["model"]["merges"][3]
    (tmp_path / "src" / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ConversionError, match="merges are not in token-id order"):
        to_nanochat(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_to_nanochat_warns_when_rounding_tables(nanochat_run, tmp_path, caplog):
    run = nanochat_run("2025")
    model = NanoChatForCausalLM.from_pretrained(run["hf"])
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1e-4)
    model.save_pretrained(tmp_path / "src")
    transformers.AutoTokenizer.from_pretrained(run["hf"]).save_pretrained(tmp_path / "src")
    to_nanochat(tmp_path / "src", tmp_path / "nano", step=7)
    assert "transformer.wte.weight: rounded to bfloat16" in caplog.text
    assert (tmp_path / "nano" / "model_000007.pt").is_file()


# ---------------------------------------------------------------------------------------------------------------
# to-transformers


def test_to_transformers_2025_loads_as_builtin(nanochat_run, tmp_path):
    run = nanochat_run("2025")
    to_transformers(run["hf"], tmp_path / "builtin")
    config = json.loads((tmp_path / "builtin" / "config.json").read_text())
    assert config["model_type"] == "nanochat" and "auto_map" not in config
    assert config["rms_norm_eps"] == torch.finfo(torch.float32).eps
    assert not list((tmp_path / "builtin").glob("*.py"))
    builtin = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "builtin").eval()
    assert type(builtin) is transformers.NanoChatForCausalLM
    ours = NanoChatForCausalLM.from_pretrained(run["hf"]).eval()
    ids = torch.randint(0, 300, (2, 60), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (builtin(ids).logits - ours(ids).logits).abs().max().item() <= ATOL
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "builtin")
    assert tokenizer.encode(VARIED_TEXT, add_special_tokens=False) == run["encoding"].encode_ordinary(VARIED_TEXT)
    assert builtin.generation_config.eos_token_id == [295, 291]


def test_to_transformers_refuses_2026(nanochat_run, tmp_path):
    with pytest.raises(ConversionError) as err:
        to_transformers(nanochat_run("2026-padded")["hf"], tmp_path / "builtin")
    message = str(err.value)
    for feature in ["value embeddings", "resid/x0 lambdas", "smear", "backout", "sliding windows (SSSL",
                    "q/k scale 1.2", "vocab padding (300 -> 320 rows)"]:  # fmt: skip
        assert feature in message
    assert not (tmp_path / "builtin").exists()


def test_to_transformers_checks_weights_against_config(nanochat_run, tmp_path):
    from safetensors.torch import save_file

    shutil.copytree(nanochat_run("2025")["hf"], tmp_path / "src")
    weights = load_file(tmp_path / "src" / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"model.safetensors: tensors do not match config.json: \['lm_head"):
        to_transformers(tmp_path / "src", tmp_path / "builtin")
    assert not (tmp_path / "builtin").exists()


# ---------------------------------------------------------------------------------------------------------------
# bad input: a ConversionError naming the file and the problem, and no output folder


@pytest.fixture
def broken_run(nanochat_run, tmp_path):
    """A fresh copy of the 2026-padded nanochat folder to damage, and a function expecting a clean failure."""
    root = tmp_path / "run"
    shutil.copytree(nanochat_run("2026-padded")["root"], root, ignore=shutil.ignore_patterns("hf"))
    ckpt = root / "base_checkpoints" / "d4"
    for old in ckpt.glob("*_000005.*"):
        old.unlink()

    def expect_failure(*fragments: str, **kwargs) -> str:
        out = tmp_path / "out"
        with pytest.raises(ConversionError) as err:
            from_nanochat(kwargs.pop("checkpoint_dir", ckpt), out, **kwargs)
        for fragment in fragments:
            assert fragment in str(err.value)
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging left behind
        return str(err.value)

    def rewrite(mutate) -> None:
        sd = torch.load(ckpt / "model_000020.pt", weights_only=True)
        mutate(sd)
        torch.save(sd, ckpt / "model_000020.pt")

    return {"root": root, "ckpt": ckpt, "fail": expect_failure, "rewrite": rewrite}


def test_missing_files(broken_run, tmp_path):
    fail, ckpt = broken_run["fail"], broken_run["ckpt"]
    fail(str(tmp_path / "nowhere"), "not found", checkpoint_dir=tmp_path / "nowhere")
    fail("no checkpoint for step 3", "[20]", step=3)
    (ckpt / "meta_000020.json").rename(ckpt / "meta.bak")
    fail("meta_000020.json", "missing")
    (ckpt / "meta.bak").rename(ckpt / "meta_000020.json")
    (broken_run["root"] / "tokenizer" / "tokenizer.pkl").unlink()
    fail("no tokenizer.pkl", "--tokenizer-dir")
    (ckpt / "model_000020.pt").unlink()
    fail("no model_<step>.pt")


def test_wrong_shapes(broken_run):
    def shrink(sd):
        sd["transformer.h.2.attn.c_k.weight"] = sd["transformer.h.2.attn.c_k.weight"][:16]

    broken_run["rewrite"](shrink)
    broken_run["fail"]("model_000020.pt", "transformer.h.2.attn.c_k.weight has shape (16, 64), expected (32, 64)")


def test_unknown_and_missing_keys(broken_run):
    broken_run["rewrite"](lambda sd: sd.update({"transformer.h.0.attn.rotary.inv_freq": torch.zeros(8)}))
    broken_run["fail"]("model_000020.pt", "unknown keys", "transformer.h.0.attn.rotary.inv_freq")
    broken_run["rewrite"](lambda sd: (sd.pop("transformer.h.0.attn.rotary.inv_freq"), sd.pop("lm_head.weight")))
    broken_run["fail"]("missing keys", "lm_head.weight")


def test_unknown_generation(broken_run):
    broken_run["rewrite"](lambda sd: (sd.pop("smear_lambda"), sd.pop("smear_gate.weight"), sd.pop("backout_lambda")))
    broken_run["fail"]("model_000020.pt", "unknown nanochat generation", "lacks smear", "backout")

    def drop_2026(sd):
        for key in [k for k in sd if "lambda" in k or "ve_gate" in k or k.startswith("value_embeds")]:
            del sd[key]

    broken_run["rewrite"](drop_2026)  # 2025 tensors, but the meta still says window_pattern SSSL
    broken_run["fail"]("meta_000020.json", "window_pattern='SSSL'", "matches no nanochat generation")


def test_truncated_checkpoint(broken_run):
    path = broken_run["ckpt"] / "model_000020.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    broken_run["fail"](str(path), "truncated")


def test_tokenizer_does_not_match_model(broken_run, tiktoken_encodings):
    write_tokenizer(broken_run["root"] / "tokenizer", tiktoken_encodings(280))
    broken_run["fail"]("tokenizer.pkl", "280 tokens", "vocab_size=300")


def test_embedding_rows_do_not_match_tokenizer(broken_run, tiktoken_encodings):
    broken_run["rewrite"](lambda sd: sd.update({"lm_head.weight": sd["lm_head.weight"][:290]}))
    broken_run["fail"]("lm_head.weight has shape (290, 64), expected (300 or 320, 64) for vocab_size=300")
    # tokenizer and meta agree on 280 tokens, but the tables have 300 rows: neither 280 nor 280 padded to 320
    write_tokenizer(broken_run["root"] / "tokenizer", tiktoken_encodings(280))
    meta_path = broken_run["ckpt"] / "meta_000020.json"
    meta = json.loads(meta_path.read_text())
    meta["model_config"]["vocab_size"] = 280
    meta_path.write_text(json.dumps(meta))

    def cut(sd):
        for key in [k for k in sd if k in ("transformer.wte.weight", "lm_head.weight") or k.startswith("value_")]:
            sd[key] = sd[key][:300]

    broken_run["rewrite"](cut)
    message = broken_run["fail"]("model_000020.pt", "expected (280 or 320, 64) for vocab_size=280", "tokenizer.pkl")
    assert "transformer.wte.weight has shape (300, 64)" in message and "value_embeds.3.weight" in message


def test_token_bytes_from_another_tokenizer(broken_run):
    torch.save(torch.ones(100, dtype=torch.int32), broken_run["root"] / "tokenizer" / "token_bytes.pt")
    broken_run["fail"]("token_bytes.pt", "(100,)", "(300,)")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_tokenizer_pickle_of_any_protocol(tiktoken_encodings, tmp_path, protocol):
    from nanochat_hf.hub.tiktoken_format import read_tiktoken_pickle

    encoding = tiktoken_encodings(300)
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(encoding, protocol=protocol))
    state = read_tiktoken_pickle(tmp_path / "tokenizer.pkl")
    assert (state.name, state.pat_str) == ("rustbpe", SPLIT_PATTERN)
    assert state.mergeable_ranks == encoding._mergeable_ranks and state.special_tokens == encoding._special_tokens


def test_malicious_pickle_is_not_run(broken_run):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (broken_run["root"] / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(Evil()))
    broken_run["fail"]("tokenizer.pkl", "refusing to load global builtins.print")


def test_existing_output_is_kept(nanochat_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not empty"):
        from_nanochat(nanochat_run("2025")["ckpt"], out)
    with pytest.raises(ConversionError, match="not written by nanochat-hf"):  # overwrite replaces only our folders
        from_nanochat(nanochat_run("2025")["ckpt"], out, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "config.json").write_text("{}")  # now one of ours (an older conversion): replaced whole
    from_nanochat(nanochat_run("2025")["ckpt"], out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_to_nanochat_bad_input(nanochat_run, tmp_path):
    with pytest.raises(ConversionError, match="model folder not found"):
        to_nanochat(tmp_path / "missing", tmp_path / "out")
    to_transformers(nanochat_run("2025")["hf"], tmp_path / "builtin")
    with pytest.raises(ConversionError, match="model_type 'nanochat'"):
        to_nanochat(tmp_path / "builtin", tmp_path / "out")
    # a model nanochat cannot express: 2025 weights with the 2026 q/k scale
    model = NanoChatForCausalLM.from_pretrained(nanochat_run("2025")["hf"])
    model.config.qk_scale = 1.2
    model.save_pretrained(tmp_path / "odd")
    transformers.AutoTokenizer.from_pretrained(nanochat_run("2025")["hf"]).save_pretrained(tmp_path / "odd")
    with pytest.raises(ConversionError, match=r"qk_scale=1.2 \(nanochat: 1.0\)"):
        to_nanochat(tmp_path / "odd", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_to_nanochat_without_tiktoken(nanochat_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # `import tiktoken` now raises ImportError
    with pytest.raises(ConversionError, match="pip install tiktoken"):
        to_nanochat(nanochat_run("2025")["hf"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# CLI


def test_cli(nanochat_run, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="nanochat-hf")
    add_convert_parser(parser.add_subparsers(dest="command", required=True))
    for argv in (
        ["convert"],
        ["convert", "from-nanochat"],
        ["convert", "to-nanochat"],
        ["convert", "to-transformers"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args([*argv, "--help"])
        assert "--out" in capsys.readouterr().out or argv == ["convert"]
    ckpt = nanochat_run("2025")["ckpt"]
    args = parser.parse_args(["convert", "from-nanochat", "--checkpoint-dir", str(ckpt), "--step", "5",
                              "--out", str(tmp_path / "hf")])  # fmt: skip
    args.func(args)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["nanochat_meta"]["step"] == 5
    args = parser.parse_args(["convert", "to-nanochat", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "n")])
    args.func(args)
    assert (tmp_path / "n" / "model_000005.pt").is_file()
    args = parser.parse_args(
        ["convert", "to-transformers", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "t")]
    )
    args.func(args)
    assert "without trust_remote_code" in capsys.readouterr().out
