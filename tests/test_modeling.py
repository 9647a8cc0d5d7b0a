"""NanoChatForCausalLM against oracles nobody here wrote (transformers' built-in NanoChat) and against nanochat's
equations re-stated in tests/nanochat_reference.py."""

import pytest
import torch
import transformers
from transformers import DynamicCache

from nanochat_hf import NanoChatConfig, NanoChatForCausalLM
from nanochat_hf.hub.convert import builtin_config

from . import nanochat_constants as nc
from .conftest import CACHE_KW, tiny_config
from .nanochat_reference import nanochat_forward, reference_config, to_nanochat_state_dict

ATOL = 1e-5


def builtin_twin(ours: NanoChatForCausalLM) -> transformers.NanoChatForCausalLM:
    """transformers' own NanoChat class with our 2025 weights loaded under the same names."""
    config = builtin_config(ours.config)
    twin = transformers.NanoChatForCausalLM(config)
    twin.load_state_dict(ours.state_dict(), strict=True)
    return twin.eval()


# ---------------------------------------------------------------------------------------------------------------
# 2025 generation == transformers' built-in NanoChatForCausalLM


def test_2025_full_forward_matches_builtin(tiny_model_factory):
    ours = tiny_model_factory("2025")
    twin = builtin_twin(ours)
    ids = torch.randint(0, 300, (3, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(ids).logits - twin(ids).logits).abs().max().item()
    assert diff <= ATOL


def test_2025_cached_decoding_matches_builtin(tiny_model_factory):
    ours = tiny_model_factory("2025", seed=2)
    twin = builtin_twin(ours)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours_out = ours(ids[:, :10], use_cache=True)
        twin_out = twin(ids[:, :10], use_cache=True)
        ours_cache, twin_cache = getattr(ours_out, CACHE_KW), getattr(twin_out, CACHE_KW)
        assert (ours_out.logits - twin_out.logits).abs().max() <= ATOL
        for t in range(10, 40):
            ours_out = ours(ids[:, t : t + 1], **{CACHE_KW: ours_cache}, use_cache=True)
            twin_out = twin(ids[:, t : t + 1], **{CACHE_KW: twin_cache}, use_cache=True)
            assert (ours_out.logits - twin_out.logits).abs().max() <= ATOL, f"step {t}"


def test_2025_left_padded_batch_matches_builtin(tiny_model_factory):
    ours = tiny_model_factory("2025", seed=3)
    twin = builtin_twin(ours)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 300, (3, 24), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    ids = ids.masked_fill(mask == 0, 1)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        b = twin(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (a[real] - b[real]).abs().max() <= ATOL
    # generate() derives position ids from the mask: same tokens from both, greedy.
    with torch.no_grad():
        ga = ours.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=1)
        gb = twin.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=1)
    assert torch.equal(ga, gb)


# ---------------------------------------------------------------------------------------------------------------
# 2026 generation: cache == no cache, and == nanochat's equations


@pytest.mark.parametrize("generation", ["2025", "2026"])
def test_matches_nanochat_equations(tiny_model_factory, generation):
    model = tiny_model_factory(generation, seed=4)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(4))
    sd = to_nanochat_state_dict(model.state_dict())
    # nanochat's own constants, not the config's: a wrong preset must not become the oracle's value too
    cfg = {**reference_config(model.config), "softcap": nc.SOFTCAP, "qk_scale": nc.QK_SCALE[generation],
           "rope_base": nc.ROPE_BASE[generation]}
    with torch.no_grad():
        expected = nanochat_forward(sd, cfg, ids)
        got = model(ids).logits
    assert (got - expected).abs().max().item() <= ATOL


def test_2026_cached_decoding_equals_full_forward_past_the_window(tiny_model_factory):
    model = tiny_model_factory("2026", seed=5)
    assert model.config.short_window == 8
    ids = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=40, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(ids, max_new_tokens=40, do_sample=False, use_cache=False, pad_token_id=0)
        assert torch.equal(cached, uncached)
        # step-by-step: the last-token logits with the cache equal a full forward at every step
        out = model(cached[:, :6], use_cache=True)
        cache = getattr(out, CACHE_KW)
        for t in range(6, cached.shape[1]):
            out = model(cached[:, t : t + 1], **{CACHE_KW: cache}, use_cache=True)
            full = model(cached[:, : t + 1]).logits[:, -1]
            assert (out.logits[:, -1] - full).abs().max() <= ATOL, f"position {t}"


def test_2026_chunked_prefill_equals_full_forward(tiny_model_factory):
    model = tiny_model_factory("2026", seed=6)
    ids = torch.randint(0, 300, (1, 45), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        parts = [model(ids[:, a:b], **{CACHE_KW: cache}, use_cache=True).logits for a, b in ((0, 13), (13, 30), (30, 45))]
    assert (torch.cat(parts, dim=1) - full).abs().max() <= ATOL


def test_2026_left_padding_matches_unpadded_rows(tiny_model_factory):
    model = tiny_model_factory("2026", seed=7)
    gen = torch.Generator().manual_seed(7)
    rows = [torch.randint(2, 300, (n,), generator=gen) for n in (20, 13, 7)]
    width = max(len(r) for r in rows)
    ids = torch.full((3, width), 1)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=15, do_sample=False, pad_token_id=1)
        for i, r in enumerate(rows):
            single = model.generate(r[None], max_new_tokens=15, do_sample=False, pad_token_id=1)
            assert torch.equal(batch[i, width:], single[0, len(r) :]), f"row {i}"


@pytest.mark.parametrize("length", [1, 2, 9])
def test_2026_a_mask_of_ones_changes_nothing(tiny_model_factory, length):
    # a one-token prompt with its attention mask once broke smear (an empty slice of the mask)
    model = tiny_model_factory("2026", seed=9)
    ids = torch.randint(0, 300, (2, length), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        plain = model(ids).logits
        masked = model(ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(masked, plain, atol=1e-6, rtol=1e-6)


def test_windows_limit_attention(tiny_model_factory):
    """A token further back than the window (plus smear's one step) cannot influence a later position."""
    model = tiny_model_factory("2026", seed=8, depth=1, aspect_ratio=64, window_pattern="S", long_window=8)
    ids = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(8))
    changed = ids.clone()
    changed[0, 2] = (ids[0, 2] + 1) % 300
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    # one layer with an 8-token window, plus smear reaching one token: position 2 influences positions 2..11
    assert not torch.allclose(a[0, 11], b[0, 11])
    assert torch.allclose(a[0, 12:], b[0, 12:], atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# training-side features


def test_loss_ignores_minus_100(tiny_model_factory):
    model = tiny_model_factory("2026")
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(9))
    labels = ids.clone()
    labels[:, :8] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 300)
    targets = labels[:, 1:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_logits_to_keep(tiny_model_factory):
    model = tiny_model_factory("2026")
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
        picked = model(ids, logits_to_keep=torch.tensor([0, 5])).logits
    assert last.shape == (2, 1, 300) and torch.allclose(last, full[:, -1:], atol=1e-6)
    assert torch.allclose(picked, full[:, [0, 5]], atol=1e-6)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("generation", ["2025", "2026"])
@pytest.mark.parametrize("enable", ["gradient_checkpointing_enable", "activation_checkpointing_enable"])
def test_gradient_checkpointing_gives_same_gradients(tiny_model_factory, generation, enable):
    grads = []
    for checkpointing in (False, True):
        model = tiny_model_factory(generation, seed=11).train()
        assert model.supports_gradient_checkpointing
        if checkpointing:
            getattr(model, enable)()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(11))
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# transformers conformance: output switches, tuples, the static cache, resizing


@pytest.mark.parametrize("generation", ["2025", "2026"])
def test_output_hidden_states_has_every_layer(tiny_model_factory, generation):
    model = tiny_model_factory(generation, seed=20)
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(20))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        base = model.model(ids)
    # what enters each of the 4 layers, then the final normed output
    assert len(out.hidden_states) == 5
    assert all(h.shape == (2, 10, 64) for h in out.hidden_states)
    assert torch.equal(out.hidden_states[-1], base.last_hidden_state)
    assert base.hidden_states is None and model(ids).hidden_states is None
    # the first entry is the normed embedding (2025: nothing else touches it)
    if generation == "2025":
        embedded = model.model.embed_tokens(ids)
        assert torch.allclose(out.hidden_states[0], torch.nn.functional.rms_norm(embedded, (64,)), atol=1e-6)


@pytest.mark.parametrize("generation", ["2025", "2026"])
def test_output_attentions_with_eager(tiny_model_factory, generation):
    model = tiny_model_factory(generation, seed=21)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(21))
    with torch.no_grad():  # sdpa forms no weights: none are returned (and a warning says why)
        assert model(ids, output_attentions=True).attentions is None
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    assert len(attentions) == 4 and all(a.shape == (1, 4, 12, 12) for a in attentions)
    assert all(torch.allclose(a.sum(-1), torch.ones(1, 4, 12)) for a in attentions)
    assert all(torch.all(a.triu(1) == 0) for a in attentions)  # causal
    if generation == "2026":  # layer 0 is a short-window layer (8 tokens to the left): key 0 is out of reach
        assert torch.all(attentions[0][..., 9:, 0] == 0) and torch.all(attentions[3][..., 9:, 0] > 0)


@pytest.mark.parametrize("generation", ["2025", "2026"])
def test_return_dict_false_gives_tuples(tiny_model_factory, generation):
    model = tiny_model_factory(generation, seed=22)
    ids = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(22))
    with torch.no_grad():
        as_dict = model(ids, labels=ids)
        as_tuple = model(ids, labels=ids, return_dict=False)
        base_tuple = model.model(ids, return_dict=False, output_hidden_states=True)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 3  # loss, logits, cache
    assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)
    assert isinstance(base_tuple, tuple) and len(base_tuple[2]) == 5


def test_past_key_values_still_works_and_warns(tiny_model_factory):
    model = tiny_model_factory("2026", seed=23)
    ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(23))
    with torch.no_grad():
        expected = model(ids, **{CACHE_KW: DynamicCache(config=model.config)}, use_cache=True).logits
        if CACHE_KW == "cache":
            with pytest.warns(FutureWarning, match="`past_key_values` is deprecated"):
                got = model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True).logits
        else:
            got = model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True).logits
    assert torch.equal(got, expected)


def test_2026_inputs_embeds_alone_refused(tiny_model_factory):
    model = tiny_model_factory("2026")
    with pytest.raises(ValueError, match="value embeddings or smear .* pass `input_ids`"):
        model(inputs_embeds=torch.randn(1, 4, 64))


def test_2025_inputs_embeds_equal_ids(tiny_model_factory):
    model = tiny_model_factory("2025", seed=24)
    ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(24))
    with torch.no_grad():
        assert torch.allclose(model(inputs_embeds=model.model.embed_tokens(ids)).logits, model(ids).logits)


@pytest.mark.parametrize("generation", ["2025", "2026"])
def test_static_cache_generates_like_dynamic(tiny_model_factory, generation):
    model = tiny_model_factory(generation, seed=25)
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(25))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    dynamic = model.generate(ids, **kwargs)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert static.shape == (2, 15) and torch.equal(static, dynamic)  # 15 tokens cross the 8-token window


@pytest.mark.parametrize("generation", ["2025", "2026"])
def test_resize_token_embeddings_resizes_every_table(tiny_model_factory, generation):
    model = tiny_model_factory(generation, seed=26)
    ids = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(26))
    with torch.no_grad():
        before = model(ids).logits
    model(ids, labels=ids).loss.backward()  # the old tables were in an autograd graph
    model.zero_grad()
    model.resize_token_embeddings(310)
    rows = 310 if generation == "2025" else 320  # 2026 pads the tables to a multiple of 64
    assert model.config.vocab_size == 310
    assert model.model.embed_tokens.weight.shape == (rows, 64) and model.lm_head.weight.shape == (rows, 64)
    assert [t.weight.shape for t in model.model.value_embeds.values()] == [(rows, 32)] * (2 if generation == "2026" else 0)
    with torch.no_grad():
        after = model(ids).logits
    assert after.shape == (1, 5, 310) and torch.allclose(after[..., :300], before, atol=1e-5)
    # it trains (new ids included) and generates
    new_ids = torch.tensor([[305, 1, 2, 309, 3]])
    model.train()
    model(new_ids, labels=new_ids).loss.backward()
    assert model.model.embed_tokens.weight.grad[309].abs().sum() > 0
    if generation == "2026":
        assert model.model.value_embeds["3"].weight.grad[309].abs().sum() > 0
    assert model.eval().generate(new_ids, max_new_tokens=3, do_sample=False).shape == (1, 8)


def test_bf16_forward_close_to_fp32(tiny_model_factory):
    model = tiny_model_factory("2026", seed=12)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        ref = model(ids).logits
        low = model.to(torch.bfloat16)(ids).logits
    assert low.dtype == torch.float32  # logits are softcapped in fp32, as nanochat does
    assert (low - ref).abs().max() < 0.5
    assert (low.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


def test_vocab_padding_rows_and_slicing():
    config = tiny_config("2026", vocab_size=300)
    assert config.padded_vocab_size == 320
    model = NanoChatForCausalLM(config)
    assert model.lm_head.weight.shape[0] == 320 and model.model.embed_tokens.weight.shape[0] == 320
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == 300


# ---------------------------------------------------------------------------------------------------------------
# initialisation, parameter counts, FLOPs


def test_nanochat_init_2026():
    config = tiny_config("2026")
    torch.manual_seed(0)
    model = NanoChatForCausalLM(config)
    d = config.hidden_size
    s = 3**0.5 / d**0.5
    layer = model.model.layers[0]
    assert layer.self_attn.o_proj.weight.abs().max() == 0 and layer.mlp.fc2.weight.abs().max() == 0
    assert layer.self_attn.q_proj.weight.abs().max() <= s
    assert layer.mlp.fc1.weight.abs().max() <= 0.4 * s
    assert abs(model.model.embed_tokens.weight.std().item() - 0.8) < 0.05
    assert abs(model.lm_head.weight.std().item() - 0.001) < 2e-4
    lambdas = model.model.resid_lambdas.detach()
    assert torch.allclose(lambdas[[0, -1]], torch.tensor([1.15, 1.05]))
    assert torch.allclose(model.model.x0_lambdas.detach()[[0, -1]], torch.tensor([0.20, 0.05]))
    assert model.model.smear_lambda.item() == 0 and abs(model.model.backout_lambda.item() - 0.2) < 1e-7
    assert 0 <= model.model.smear_gate.weight.min() and model.model.smear_gate.weight.max() <= 0.02


def test_nanochat_init_2025():
    config = tiny_config("2025")
    torch.manual_seed(0)
    model = NanoChatForCausalLM(config)
    d = config.hidden_size
    assert model.lm_head.weight.abs().max() == 0
    assert abs(model.model.embed_tokens.weight.std().item() - 1.0) < 0.05
    q = model.model.layers[0].self_attn.q_proj.weight
    assert abs(q.std().item() - d**-0.5) < 0.1 * d**-0.5
    k = model.model.layers[0].self_attn.k_proj.weight  # fan_out < fan_in: std shrinks by sqrt(fan_out/fan_in)
    assert abs(k.std().item() - d**-0.5 * (k.shape[0] / d) ** 0.5) < 0.1 * d**-0.5


ORIG_TABLE = {  # nanochat 3a5e0bc, vocab 65,536 (nanochat-spec §1.5)
    12: (185_597_952, 1.0381e9),
    20: (560_988_160, 3.491758e9),
    26: (1_081_999_360, 6.9009e9),
    32: (1_879_048_192, 1.207960e10),
}
HEAD_TABLE = {  # nanochat 92d63d4, vocab 32,768: total params, transformer_matrices, FLOPs/token with SSSL
    12: (286_261_730, 84_935_088, 7.597e8),
    20: (896_533_746, 393_217_200, 2.886e9),
    26: (1_681_786_938, 863_897_580, 5.991e9),
    32: (2_818_575_450, 1_610_615_808, 1.077e10),
}


@pytest.mark.parametrize("depth", sorted(ORIG_TABLE))
def test_params_and_flops_2025(depth):
    with torch.device("meta"):
        model = NanoChatForCausalLM(NanoChatConfig.from_depth(depth, "2025"))
    params, flops = ORIG_TABLE[depth]
    assert model.num_parameters() == params
    assert abs(model.estimate_flops_per_token() / flops - 1) < 1e-4
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("depth", sorted(HEAD_TABLE))
def test_params_and_flops_2026(depth):
    with torch.device("meta"):
        model = NanoChatForCausalLM(NanoChatConfig.from_depth(depth, "2026"))
    total, matrices, flops = HEAD_TABLE[depth]
    counts = model.num_scaling_params()
    assert model.num_parameters() == total == counts["total"]
    assert counts["transformer_matrices"] == matrices
    assert counts["scalars"] == 2 * depth + 26
    assert abs(model.estimate_flops_per_token() / flops - 1) < 1e-3
    assert all(p.device.type == "meta" for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# generate()


def test_generate_sampling_modes(tiny_model_factory):
    model = tiny_model_factory("2026", seed=13)
    ids = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert torch.equal(greedy[:, 5:6], model(ids).logits[:, -1].argmax(-1, keepdim=True))
        torch.manual_seed(0)
        a = model.generate(ids, max_new_tokens=10, do_sample=True, temperature=0.7, top_k=20, pad_token_id=0)
        torch.manual_seed(0)
        b = model.generate(ids, max_new_tokens=10, do_sample=True, temperature=0.7, top_k=20, pad_token_id=0)
        assert torch.equal(a, b)
        top1 = model.generate(ids, max_new_tokens=10, do_sample=True, top_k=1, pad_token_id=0)
        assert torch.equal(top1, greedy)  # top-k of 1 is greedy
        nucleus = model.generate(ids, max_new_tokens=10, do_sample=True, top_p=1e-6, pad_token_id=0)
        assert torch.equal(nucleus, greedy)  # a vanishing nucleus keeps only the argmax


def test_rope_tables_survive_from_pretrained_and_match_explicit_positions(tiny_model_factory, tmp_path):
    """The RoPE tables are not saved (persistent=False); loading must rebuild them, not leave empty memory, and the
    table path must give what the same positions passed explicitly give."""
    from nanochat_hf.modeling_nanochat import rotary_cos_sin

    model = tiny_model_factory("2026", seed=11)
    model.save_pretrained(tmp_path)
    loaded = NanoChatForCausalLM.from_pretrained(tmp_path).eval()
    config = loaded.config
    positions = torch.arange(config.max_position_embeddings)[None]
    cos, sin = rotary_cos_sin(positions, config.head_dim, config.rope_theta, torch.float32)
    assert torch.equal(loaded.model.rope_cos, cos) and torch.equal(loaded.model.rope_sin, sin)
    ids = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        table = loaded(ids).logits
        explicit = loaded(ids, position_ids=torch.arange(30)[None]).logits
        past_the_table = loaded(ids, position_ids=torch.arange(30)[None] + config.max_position_embeddings).logits
    torch.testing.assert_close(table, explicit, atol=0, rtol=0)
    assert torch.equal(table, model(ids).logits)
    assert not torch.allclose(table, past_the_table)  # positions beyond the table are computed, not clipped
