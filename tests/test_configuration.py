import pytest

from nanochat_hf import NanoChatConfig
from nanochat_hf.configuration_nanochat import GENERATION_PRESETS


@pytest.mark.parametrize(
    ("depth", "generation", "width", "heads", "vocab"),
    [
        (12, "2025", 768, 6, 65536),
        (20, "2025", 1280, 10, 65536),
        (26, "2025", 1664, 13, 65536),
        (32, "2025", 2048, 16, 65536),
        (12, "2026", 768, 6, 32768),
        (20, "2026", 1280, 10, 32768),
        (24, "2026", 1536, 12, 32768),
        (25, "2026", 1664, 13, 32768),  # odd depths round the width up to a multiple of head_dim
        (26, "2026", 1664, 13, 32768),
        (32, "2026", 2048, 16, 32768),
    ],
)
def test_depth_dial(depth, generation, width, heads, vocab):
    c = NanoChatConfig.from_depth(depth, generation)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == (depth, width, heads)
    assert c.num_key_value_heads == heads and c.head_dim == 128 and c.intermediate_size == 4 * width
    assert c.vocab_size == vocab and c.max_position_embeddings == 2048


def test_cpu_dial_with_head_dim_64():
    c = NanoChatConfig.from_depth(6, head_dim=64)
    assert (c.hidden_size, c.num_attention_heads, c.head_dim) == (384, 6, 64)


def test_generation_presets_fill_every_feature():
    old, new = NanoChatConfig(generation="2025"), NanoChatConfig(generation="2026")
    for name in GENERATION_PRESETS["2025"]:
        if name not in ("rope_theta", "long_window"):
            assert getattr(old, name) == GENERATION_PRESETS["2025"][name]
            assert getattr(new, name) == GENERATION_PRESETS["2026"][name]
    assert old.rope_parameters["rope_theta"] == 10_000 and new.rope_parameters["rope_theta"] == 100_000
    assert new.short_window == 512 and new.long_window == 2048
    assert old.layer_windows == [-1] * 12 and old.long_window == -1  # 2025: full causal attention at any length


def test_2026_windows_and_value_embed_layers():
    c = NanoChatConfig.from_depth(20)
    long_layers = [i for i, w in enumerate(c.layer_windows) if w == 2048]
    assert long_layers == [3, 7, 11, 15, 19]
    c26 = NanoChatConfig.from_depth(26)
    assert [i for i, w in enumerate(c26.layer_windows) if w == 2048] == [3, 7, 11, 15, 19, 23, 25]
    assert c.value_embed_layers == list(range(1, 20, 2))  # even depth: odd layers
    assert NanoChatConfig.from_depth(5).value_embed_layers == [0, 2, 4]  # odd depth: the last one included


def test_overrides_win_over_presets_and_survive_save(tmp_path):
    c = NanoChatConfig(generation="2025", value_embeds=True, window_pattern="SL", rope_theta=5e5, qk_scale=1.0)
    assert c.value_embeds and c.window_pattern == "SL" and c.rope_parameters["rope_theta"] == 5e5
    c.save_pretrained(tmp_path)
    back = NanoChatConfig.from_pretrained(tmp_path)
    for name in ("generation", "value_embeds", "window_pattern", "smear", "qk_scale", "pad_vocab_size_to"):
        assert getattr(back, name) == getattr(c, name), name
    assert back.rope_parameters["rope_theta"] == 5e5


def test_features_switched_to_default_generation_values_survive_save(tmp_path):
    # a 2026 config with every feature set to its 2025 value must not come back as a 2026 default
    c = NanoChatConfig(generation="2026", **{k: v for k, v in GENERATION_PRESETS["2025"].items() if k != "rope_theta"})
    c.save_pretrained(tmp_path)
    back = NanoChatConfig.from_pretrained(tmp_path)
    assert not back.value_embeds and not back.smear and back.window_pattern == "L" and back.pad_vocab_size_to == 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"hidden_size": 100, "num_attention_heads": 3}, "num_attention_heads"),
        ({"num_attention_heads": 6, "num_key_value_heads": 4}, "num_key_value_heads"),
        ({"window_pattern": "SSXL"}, "window_pattern"),
        ({"window_pattern": ""}, "window_pattern"),
        ({"final_logit_softcapping": -15.0}, "final_logit_softcapping"),
        ({"generation": "2024"}, "generation"),
        ({"short_window": 0}, "short_window"),
        ({"head_dim": 100}, "head_dim"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_invalid_values_name_the_field_and_allowed_values(kwargs, field):
    with pytest.raises(ValueError, match=rf"`{field}`.*allowed"):
        NanoChatConfig(**kwargs)


def test_invalid_depth():
    with pytest.raises(ValueError, match=r"`depth`=0.*allowed: an integer >= 1"):
        NanoChatConfig.from_depth(0)
    with pytest.raises(ValueError, match=r"`generation`"):
        NanoChatConfig.from_depth(4, "1999")


def test_softcap_can_be_disabled():
    assert NanoChatConfig(final_logit_softcapping=None).final_logit_softcapping is None
