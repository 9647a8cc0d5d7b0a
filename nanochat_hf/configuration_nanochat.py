# This file ships to the Hub next to the weights: it imports only transformers and the standard library.
"""NanoChat configuration: one config, two architecture generations of Karpathy's nanochat."""

import math

from transformers import PreTrainedConfig

# Every feature that separates the two nanochat generations is its own field; a generation is only a preset
# that fills the fields a user left unset. "2025" is the October-2025 release (what transformers' built-in
# `nanochat` model implements), "2026" is nanochat HEAD (value embeddings, lambdas, smear, backout, windows).
GENERATION_PRESETS: dict[str, dict] = {
    "2025": {
        "pad_vocab_size_to": 1,
        "value_embeds": False,
        "residual_lambdas": False,
        "smear": False,
        "backout": False,
        "window_pattern": "L",
        "long_window": -1,  # full causal attention at any length, as the 2025 model (and transformers') has
        "qk_scale": 1.0,
        "rope_theta": 10_000.0,
    },
    "2026": {
        "pad_vocab_size_to": 64,
        "value_embeds": True,
        "residual_lambdas": True,
        "smear": True,
        "backout": True,
        "window_pattern": "SSSL",
        "long_window": None,  # nanochat HEAD: "L" is the sequence length, so past it every layer is windowed
        "qk_scale": 1.2,
        "rope_theta": 100_000.0,
    },
}

# Fields always written to config.json: they may coincide with the class defaults of another generation, and a
# diff-only save would then silently reload them from the wrong preset.
_ALWAYS_SAVED = (
    "generation",
    "pad_vocab_size_to",
    "value_embeds",
    "residual_lambdas",
    "smear",
    "backout",
    "window_pattern",
    "short_window",
    "long_window",
    "qk_scale",
    "rope_parameters",
    "rms_norm_eps",
    "final_logit_softcapping",
    "head_dim",
    "num_key_value_heads",
    "intermediate_size",
)


def _fail(field: str, value, allowed: str) -> None:
    raise ValueError(f"NanoChatConfig: invalid `{field}`={value!r}; allowed: {allowed}.")


class NanoChatConfig(PreTrainedConfig):
    r"""
    Configuration of a nanochat GPT.

    Field names follow transformers conventions (`hidden_size`, `num_hidden_layers`, `num_key_value_heads`,
    `rope_parameters`, `final_logit_softcapping`, ...). Fields left as `None` are filled from the preset of
    `generation`. Build a config the way nanochat does, from the depth alone, with [`NanoChatConfig.from_depth`].

    Args:
        generation (`str`): "2025" or "2026"; selects the preset for every unset architecture field.
        pad_vocab_size_to (`int`): embedding and lm_head rows are padded to a multiple of this; logits are sliced
            back to `vocab_size`.
        value_embeds (`bool`): ResFormer-style value embeddings on alternating layers (the last layer included),
            mixed into V through a gate reading the first `value_embed_gate_channels` channels.
        residual_lambdas (`bool`): learnable per-layer `x = resid_lambdas[i] * x + x0_lambdas[i] * x0` before
            every block.
        smear (`bool`): mixes the previous token's normed embedding into the current one through a gate.
        backout (`bool`): subtracts `backout_lambda` times the residual after layer `num_hidden_layers // 2`
            before the final norm.
        window_pattern (`str`): "S"/"L" per layer, tiled over the depth; the last layer is always "L".
        short_window / long_window (`int`): left context (in tokens, the current token excluded) of the "S" and
            "L" layers; -1 means unlimited. Defaults: nanochat's `ceil(seq/4/128)*128`, and for "L" the sequence
            length (2026) or unlimited (2025).
        qk_scale (`float`): q and k are multiplied by this after QK-norm.
        rms_norm_eps (`float`, *optional*): `None` uses the dtype's machine epsilon, as nanochat's
            `F.rms_norm(x, eps=None)` does.
    """

    model_type = "nanochat_hf"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 32768
    hidden_size: int = 768
    intermediate_size: int | None = None
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    hidden_act: str = "relu2"
    rope_parameters: dict | None = None
    rms_norm_eps: float | None = None
    final_logit_softcapping: float | None = 15.0
    attention_dropout: float = 0.0
    generation: str = "2026"
    pad_vocab_size_to: int | None = None
    value_embeds: bool | None = None
    value_embed_gate_channels: int = 12
    value_embed_gate_range: float = 3.0
    residual_lambdas: bool | None = None
    smear: bool | None = None
    smear_gate_channels: int = 24
    backout: bool | None = None
    window_pattern: str | None = None
    short_window: int | None = None
    long_window: int | None = None
    qk_scale: float | None = None
    initializer_range: float = 0.02
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.generation not in GENERATION_PRESETS:
            _fail("generation", self.generation, " or ".join(repr(g) for g in GENERATION_PRESETS))
        preset = GENERATION_PRESETS[self.generation]
        for name, value in preset.items():
            if name != "rope_theta" and getattr(self, name) is None:
                setattr(self, name, value)
        rope_theta = kwargs.pop("rope_theta", None)
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": float(rope_theta or preset["rope_theta"])}
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.short_window is None:
            self.short_window = nanochat_short_window(self.max_position_embeddings)
        if self.long_window is None:
            self.long_window = self.max_position_embeddings
        self._validate()
        self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)

    def _validate(self) -> None:
        positive = "an integer >= 1"
        if self.num_hidden_layers < 1:
            _fail("num_hidden_layers", self.num_hidden_layers, f"{positive} (the depth)")
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "max_position_embeddings", "pad_vocab_size_to"):
            if getattr(self, name) < 1:
                _fail(name, getattr(self, name), positive)
        if self.hidden_size % self.num_attention_heads:
            divisors = [h for h in range(1, self.hidden_size + 1) if self.hidden_size % h == 0 and h <= 64]
            _fail("num_attention_heads", self.num_attention_heads,
                  f"a divisor of hidden_size={self.hidden_size}, e.g. {divisors}")
        if self.head_dim is not None and self.head_dim * self.num_attention_heads != self.hidden_size:
            _fail("head_dim", self.head_dim,
                  f"hidden_size // num_attention_heads = {self.hidden_size // self.num_attention_heads}")
        if (self.hidden_size // self.num_attention_heads) % 2:
            _fail("num_attention_heads", self.num_attention_heads, "a value giving an even head_dim (RoPE halves)")
        if self.num_attention_heads % self.num_key_value_heads:
            _fail("num_key_value_heads", self.num_key_value_heads,
                  f"a divisor of num_attention_heads={self.num_attention_heads}")
        if not self.window_pattern or set(self.window_pattern.upper()) - {"S", "L"}:
            _fail("window_pattern", self.window_pattern, "a non-empty string of 'S' (short) and 'L' (long)")
        for name in ("short_window", "long_window"):
            if getattr(self, name) < 1 and getattr(self, name) != -1:
                _fail(name, getattr(self, name), f"{positive}, or -1 for unlimited")
        if self.final_logit_softcapping is not None and self.final_logit_softcapping <= 0:
            _fail("final_logit_softcapping", self.final_logit_softcapping, "a positive float, or None to disable")
        if self.rms_norm_eps is not None and self.rms_norm_eps < 0:
            _fail("rms_norm_eps", self.rms_norm_eps, "a non-negative float, or None for the dtype's epsilon")
        if self.qk_scale <= 0:
            _fail("qk_scale", self.qk_scale, "a positive float")
        if self.hidden_act != "relu2":
            _fail("hidden_act", self.hidden_act, "'relu2'")
        if self.value_embeds and not 1 <= self.value_embed_gate_channels <= self.hidden_size:
            _fail("value_embed_gate_channels", self.value_embed_gate_channels, f"1..hidden_size={self.hidden_size}")
        if self.smear and not 1 <= self.smear_gate_channels <= self.hidden_size:
            _fail("smear_gate_channels", self.smear_gate_channels, f"1..hidden_size={self.hidden_size}")
        if self.rope_parameters.get("rope_type", "default") != "default":
            _fail("rope_parameters", self.rope_parameters, "{'rope_type': 'default', 'rope_theta': <float>}")

    # ----------------------------------------------------------------------------------------------------------
    # derived quantities

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.pad_vocab_size_to) * self.pad_vocab_size_to

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters["rope_theta"])

    @property
    def layer_windows(self) -> list[int]:
        """Left context of every layer, in tokens (nanochat's FA3 `window_size[0]`, -1 = unlimited); the last
        layer is long."""
        pattern = self.window_pattern.upper()
        chars = [pattern[i % len(pattern)] for i in range(self.num_hidden_layers)]
        chars[-1] = "L"
        return [self.long_window if c == "L" else self.short_window for c in chars]

    @property
    def value_embed_layers(self) -> list[int]:
        """Layers with a value embedding: alternating, always including the last one."""
        if not self.value_embeds:
            return []
        last = self.num_hidden_layers - 1
        return [i for i in range(self.num_hidden_layers) if i % 2 == last % 2]

    @property
    def backout_layer(self) -> int:
        return self.num_hidden_layers // 2

    def to_diff_dict(self) -> dict:
        diff = super().to_diff_dict()
        for name in _ALWAYS_SAVED:
            diff[name] = getattr(self, name)
        return diff

    # ----------------------------------------------------------------------------------------------------------
    # the depth dial

    @classmethod
    def from_depth(
        cls,
        depth: int,
        generation: str = "2026",
        *,
        aspect_ratio: int = 64,
        head_dim: int | None = None,
        **overrides,
    ) -> "NanoChatConfig":
        """nanochat's depth dial: the number of layers sets the width, the heads and the sequence length.

        2025 (nanochat 3a5e0bc): `width = depth * 64`, `heads = ceil(width / 128)`, vocab 65,536.
        2026 (nanochat HEAD): `width = ceil(depth * aspect_ratio / head_dim) * head_dim` with `head_dim = 128`,
        `heads = width / head_dim`, vocab 32,768. Both use kv heads = heads and a 2048-token context.
        Any config field can be overridden (e.g. `vocab_size`, `max_position_embeddings`, `window_pattern`).
        """
        if not isinstance(depth, int) or depth < 1:
            _fail("depth", depth, "an integer >= 1")
        if generation not in GENERATION_PRESETS:
            _fail("generation", generation, " or ".join(repr(g) for g in GENERATION_PRESETS))
        if aspect_ratio < 1:
            _fail("aspect_ratio", aspect_ratio, "an integer >= 1")
        if head_dim is not None and (head_dim < 2 or head_dim % 2):
            _fail("head_dim", head_dim, "an even integer >= 2")
        if generation == "2025" and head_dim is None:
            width = depth * aspect_ratio
            heads = max(1, math.ceil(width / 128))
            vocab = 65536
        else:
            head_dim = head_dim or 128
            width = math.ceil(depth * aspect_ratio / head_dim) * head_dim
            heads = width // head_dim
            vocab = 32768 if generation == "2026" else 65536
        fields = {
            "generation": generation,
            "vocab_size": vocab,
            "hidden_size": width,
            "intermediate_size": 4 * width,
            "num_hidden_layers": depth,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "max_position_embeddings": 2048,
        }
        fields.update(overrides)
        return cls(**fields)


def nanochat_short_window(sequence_len: int) -> int:
    """nanochat HEAD's short window: a quarter of the context, rounded up to a multiple of 128 (512 at 2048)."""
    return max(1, math.ceil(sequence_len / 4 / 128) * 128)


__all__ = ["NanoChatConfig", "GENERATION_PRESETS", "nanochat_short_window"]
