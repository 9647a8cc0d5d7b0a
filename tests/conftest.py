import math

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from nanochat_hf import NanoChatConfig, NanoChatForCausalLM

# transformers 5.24 renamed `past_key_values` to `cache` (forward kwarg and output field); the tests run on both.
CACHE_KW = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def tiny_config(generation: str = "2026", **overrides) -> NanoChatConfig:
    """A 4-layer model small enough for CPU tests; windows short enough to be crossed in a few tokens."""
    fields = {
        "vocab_size": 300,
        "max_position_embeddings": 96,
        "head_dim": 16,
        "aspect_ratio": 16,
        "num_key_value_heads": 2,
    }
    if generation == "2026":
        fields["short_window"] = 8
    fields.update(overrides)
    depth = fields.pop("depth", 4)
    return NanoChatConfig.from_depth(depth, generation, **fields)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every tensor a non-degenerate value: nanochat's init zeroes the output projections."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p.shape[1] if "embed" not in name else 1
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            else:
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=gen))
    return model


@pytest.fixture
def tiny_model_factory():
    def make(generation: str = "2026", seed: int = 0, **overrides) -> NanoChatForCausalLM:
        torch.manual_seed(seed)
        model = NanoChatForCausalLM(tiny_config(generation, **overrides))
        return randomize(model, seed).eval()

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A real `save_pretrained` folder: a 512-token BPE trained on the embedded corpus and a 2-layer model.

    Shared by the tests of every stage that reads a checkpoint folder (engine, SFT, RL, eval, hub). Treat it as
    read-only: copy it before changing anything in it.
    """
    from nanochat_hf.data.embedded import embedded_corpus
    from nanochat_hf.tokenizer.bpe import train_tokenizer
    from nanochat_hf.training.init_model import build_model, save_atomically

    tokenizer = train_tokenizer(embedded_corpus(max_chars=200_000), vocab_size=512, show_progress=False)
    torch.manual_seed(0)
    model = build_model(tokenizer, depth=2, generation="2026", head_dim=32, max_position_embeddings=256)
    return save_atomically(randomize(model, seed=0), tokenizer, tmp_path_factory.mktemp("tiny") / "checkpoint")
