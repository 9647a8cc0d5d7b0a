"""Every attention backend gives the model the same function, with nanochat's per-layer windows in its own terms.

eager (dense scores, the reference) against sdpa (banded for short windows) and flex_attention (a BlockMask), for
both generations, with windows shorter than the sequence, left padding and cached decoding. The flash path is
exercised on CPU through a re-statement of flash-attn's documented semantics registered as an attention function:
it receives what flash_attention_2 and the Hub's flash-attn3 kernel receive (a 2-D padding mask and transformers'
`sliding_window`), so the translation of nanochat's windows is checked here and the kernels on the GPU check.
"""

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AttentionInterface, DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from nanochat_hf import NanoChatForCausalLM
from nanochat_hf.inference.engine import KVCache
from nanochat_hf.modeling_nanochat import banded_sdpa, flex_block_mask_for_window

from .conftest import CACHE_KW, randomize, tiny_config

ATOL = 1e-5
GENERATIONS = ["2025", "2026"]
BACKENDS = ["sdpa", "flex_attention", "flash_semantics_reference"]


def flash_semantics_reference(module, query, key, value, attention_mask, scaling=None, sliding_window=None,
                              **kwargs):
    """flash-attn's causal attention as documented, on CPU: queries aligned to the end of the keys (bottom-right),
    `window_size=(sliding_window - 1, ...)` as transformers passes it when the keys outnumber the window, padded
    keys (a 2-D mask) removed and padded query rows returned as zeros. Returns (B, Tq, H, D) like flash."""
    B, H, Tq, D = query.shape
    Tk = key.shape[2]
    key = key.repeat_interleave(H // key.shape[1], dim=1)
    value = value.repeat_interleave(H // value.shape[1], dim=1)
    q_pos = torch.arange(Tk - Tq, Tk)[:, None]
    k_pos = torch.arange(Tk)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None and Tk > sliding_window:
        allowed = allowed & (q_pos - k_pos <= sliding_window - 1)
    allowed = allowed[None, None].expand(B, 1, Tq, Tk)
    real_rows = torch.ones(B, Tq, dtype=torch.bool)
    if attention_mask is not None:
        assert attention_mask.shape == (B, Tk), "flash takes a 2-D padding mask over the keys"
        allowed = allowed & attention_mask.bool()[:, None, None, :]
        real_rows = attention_mask.bool()[:, Tk - Tq :]
    scores = (query @ key.transpose(-1, -2)) * scaling
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    out = (weights @ value).transpose(1, 2)
    return out * real_rows[:, :, None, None], None


AttentionInterface.register("flash_semantics_reference", flash_semantics_reference)


def make_model(generation: str, seed: int = 0, **overrides) -> NanoChatForCausalLM:
    torch.manual_seed(seed)
    return randomize(NanoChatForCausalLM(tiny_config(generation, **overrides)), seed).eval()


def with_backend(model: NanoChatForCausalLM, name: str) -> NanoChatForCausalLM:
    if name == "flash_semantics_reference":
        # transformers' loader takes any name with "flash" in it for a Hub kernel to download: set it directly
        model.config._attn_implementation = name
    else:
        model.set_attn_implementation(name)
    assert model.config._attn_implementation == name
    return model


def loss_and_grads(model: NanoChatForCausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------------------------
# same function on every backend


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("length", [37, 64])  # a window (8) dividing the length, and one leaving a tail
def test_sdpa_equals_eager_logits_and_gradients(generation, length):
    model = make_model(generation, seed=1).train()
    ids = torch.randint(0, 300, (2, length), generator=torch.Generator().manual_seed(length))
    loss_e, grads_e = loss_and_grads(with_backend(model, "eager"), ids)
    loss_s, grads_s = loss_and_grads(with_backend(model, "sdpa"), ids)
    assert abs(loss_e - loss_s) <= ATOL
    assert grads_e.keys() == grads_s.keys() and len(grads_e) == len(list(model.parameters()))
    for name in grads_e:
        torch.testing.assert_close(grads_s[name], grads_e[name], atol=ATOL, rtol=1e-4, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, with_backend(model, "eager")(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("backend", ["flex_attention", "flash_semantics_reference"])
def test_backend_equals_eager_logits(generation, backend):
    model = make_model(generation, seed=2)
    ids = torch.randint(0, 300, (2, 45), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = with_backend(model, "eager")(ids).logits
        got = with_backend(model, backend)(ids).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("backend", ["eager", *BACKENDS])
def test_left_padding_on_every_backend(generation, backend):
    """Each left-padded row gives the logits of its unpadded forward, on every backend."""
    model = with_backend(make_model(generation, seed=3), backend)
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(2, 300, (n,), generator=gen) for n in (30, 19, 4)]
    width = max(len(r) for r in rows)
    ids = torch.full((3, width), 1)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        assert torch.isfinite(batch).all()
        for i, r in enumerate(rows):
            single = model(r[None]).logits[0]
            torch.testing.assert_close(batch[i, width - len(r) :], single, atol=ATOL, rtol=0, msg=f"row {i}")


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("backend", ["eager", *BACKENDS])
def test_cached_decoding_on_every_backend(generation, backend):
    """Prefill, then one token at a time on a DynamicCache: every step's logits equal the eager full forward's."""
    model = make_model(generation, seed=4)
    ids = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = with_backend(model, "eager")(ids).logits
        with_backend(model, backend)
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :12], **{CACHE_KW: cache}, use_cache=True).logits]
        steps += [model(ids[:, t : t + 1], **{CACHE_KW: cache}, use_cache=True).logits for t in range(12, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", ["flex_attention", "flash_semantics_reference"])
def test_generate_and_engine_cache_on_other_backends(backend, tiny_model_factory):
    """greedy generate() (DynamicCache, left-padded batch) and a prefill + decode on the engine's in-place
    KVCache give sdpa's tokens and logits."""
    model = tiny_model_factory("2026", seed=5)
    ids = torch.randint(2, 300, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=25, do_sample=False, pad_token_id=1)
        reference = [model(ids[:1, : t + 1]).logits[:, -1] for t in range(3, 9)]
        with_backend(model, backend)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=25, do_sample=False, pad_token_id=1)
        assert torch.equal(got, expected)
        cache = KVCache(model.config.num_hidden_layers, max_len=16)
        steps = [model(ids[:1, :4], **{CACHE_KW: cache}, use_cache=True, logits_to_keep=1).logits[:, -1]]
        steps += [model(ids[:1, t : t + 1], **{CACHE_KW: cache}, use_cache=True).logits[:, -1] for t in range(4, 9)]
    for t, (a, b) in enumerate(zip(steps, reference, strict=True)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=f"position {t + 3}")


# ---------------------------------------------------------------------------------------------------------------
# the windows in each backend's terms, and what they cost


def test_each_layer_hands_flash_its_window_in_transformers_terms(monkeypatch):
    """nanochat's window w (a query sees keys with q - k <= w) is transformers' `sliding_window = w + 1`; a long
    layer gets none. The padding mask reaches flash as 2-D, and no dense mask is built."""
    model = with_backend(make_model("2026", seed=6), "flash_semantics_reference")
    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((module.layer_idx, kwargs["sliding_window"], None if attention_mask is None else
                     tuple(attention_mask.shape)))
        return flash_semantics_reference(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("flash_semantics_reference", spy)
    try:
        ids = torch.randint(0, 300, (2, 20))
        with torch.no_grad():
            model(ids)
            model(ids, attention_mask=torch.tensor([[0] * 3 + [1] * 17, [1] * 20]))
    finally:
        AttentionInterface.register("flash_semantics_reference", flash_semantics_reference)
    assert model.config.layer_windows == [8, 8, 8, 96]
    assert seen[:4] == [(0, 9, None), (1, 9, None), (2, 9, None), (3, 97, None)]
    assert seen[4:] == [(0, 9, (2, 20)), (1, 9, (2, 20)), (2, 9, (2, 20)), (3, 97, (2, 20))]


class ShapeRecorder(TorchDispatchMode):
    """Every tensor shape an op returns, forward and backward."""

    def __init__(self):
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("backend", ["sdpa", "flex_attention"])
def test_no_training_step_builds_a_sequence_by_sequence_mask(generation, backend, monkeypatch):
    """With no padding, no tensor of a (T, T) shape appears in a forward (and, on sdpa, the backward) with short
    windows; eager, which scores every pair by definition, shows the recorder would see one."""
    T = 40
    model = make_model(generation, seed=7, max_position_embeddings=T)
    ids = torch.randint(0, 300, (2, T))

    def square(shapes):
        return sorted(s for s in shapes if len(s) >= 2 and s[-1] == T and s[-2] == T)

    with_backend(model.train(), backend)
    if backend == "flex_attention":
        # compiled flex can't run under a dispatch mode: stand in for the kernel, keep everything the model builds
        def kernel(module, query, key, value, attention_mask, **kwargs):
            assert isinstance(attention_mask, BlockMask)
            return torch.zeros_like(query).transpose(1, 2), None

        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flex_attention", kernel)
    recorder = ShapeRecorder()
    with recorder, torch.set_grad_enabled(backend == "sdpa"):
        loss = model(ids, labels=ids).loss
        if backend == "sdpa":
            loss.backward()
    assert square(recorder.shapes) == []
    recorder = ShapeRecorder()
    with recorder, torch.no_grad():
        with_backend(model, "eager")(ids)
    assert square(recorder.shapes) != []


def test_flex_skips_the_tiles_outside_the_window():
    """A short window touches far fewer (128 x 128) tiles than causal attention, and only the band's edges are
    checked element by element."""
    T = 2048
    short = flex_block_mask_for_window(511, T, 0, None, torch.device("cpu"))
    full = flex_block_mask_for_window(-1, T, 0, None, torch.device("cpu"))
    tiles = T // 128
    assert int(full.kv_num_blocks.sum() + full.full_kv_num_blocks.sum()) == tiles * (tiles + 1) // 2
    assert int(full.kv_num_blocks.sum()) == tiles  # only the diagonal tiles need the mask function
    # window 511: each query tile touches itself and 4 tiles back (the 4th only partly)
    assert int(short.kv_num_blocks.sum() + short.full_kv_num_blocks.sum()) == sum(min(i, 4) + 1 for i in range(tiles))
    dense = short.to_dense()[0, 0]
    q_tile = torch.arange(tiles)[:, None]
    k_tile = torch.arange(tiles)[None, :]
    assert torch.equal(dense.bool(), (k_tile <= q_tile) & (q_tile - k_tile <= 4))


@pytest.mark.parametrize("window,length", [(1, 5), (3, 10), (7, 7), (8, 64), (5, 23)])
def test_banded_sdpa_equals_a_dense_window_mask(window, length):
    gen = torch.Generator().manual_seed(window * 100 + length)
    q, k, v = (torch.randn(2, 4, length, 16, generator=gen) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # grouped-query: 2 kv heads for 4 query heads
    pos = torch.arange(length)
    allowed = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] <= window)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=allowed, scale=0.3
    ).transpose(1, 2)
    torch.testing.assert_close(banded_sdpa(q, k, v, window, 0.3), expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# choosing a backend that can't run here


@pytest.mark.parametrize("name", ["flash_attention_2", "flash_attention_3"])
def test_flash_on_cpu_says_what_to_install_or_use(name, tiny_checkpoint):
    with pytest.raises((ImportError, ValueError)) as error:
        NanoChatForCausalLM.from_pretrained(tiny_checkpoint, attn_implementation=name)
    message = str(error.value)
    assert "flash" in message and "'sdpa'" in message and "pip install" in message
    model = NanoChatForCausalLM.from_pretrained(tiny_checkpoint)
    with pytest.raises((ImportError, ValueError), match="'sdpa'"):
        model.set_attn_implementation(name)


def test_a_flash_kernel_on_cpu_tensors_is_refused_at_the_first_forward(monkeypatch):
    """Were a flash backend selected anyway (e.g. a config edited by hand), the forward refuses CPU tensors instead
    of crashing inside the kernel."""
    model = make_model("2025")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="CUDA GPUs only.*'sdpa'"):
        model(torch.randint(0, 300, (1, 5)))


def test_flex_backward_on_cpu_fails_with_torchs_message():
    model = with_backend(make_model("2026").train(), "flex_attention")
    ids = torch.randint(0, 300, (1, 12))
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        model(ids, labels=ids).loss.backward()
