# This file ships to the Hub next to the weights: it imports only torch, transformers and its sibling config.
"""NanoChat: Karpathy's nanochat GPT as a transformers model, both architecture generations.

Weight names follow transformers' built-in `NanoChatForCausalLM` where the two share a part, so a 2025-generation
checkpoint exports to the built-in class by rewriting config.json alone.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg

try:  # flex attention needs torch >= 2.5 and a platform with Triton or a C++ compiler
    from torch.nn.attention.flex_attention import _DEFAULT_SPARSE_BLOCK_SIZE as FLEX_BLOCK_SIZE
    from torch.nn.attention.flex_attention import BlockMask
except ImportError:  # pragma: no cover
    BlockMask, FLEX_BLOCK_SIZE = None, 128

from .configuration_nanochat import NanoChatConfig

# transformers 5.24 renamed the cache field of model outputs from `past_key_values` to `cache`; support both.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
logger = logging.get_logger(__name__)
# Attribute on the KV cache holding the id of the token before the next one fed (nanochat keeps that token's
# embedding, `prev_embedding`; an id is the same information, and generate() can refresh it from its sequences).
_SMEAR_STATE = "nanochat_prev_token"


def _cache_argument(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The KV cache under either name (transformers < 5.24 passes `past_key_values`)."""
    if past_key_values is not None and cache is not None:
        raise ValueError("NanoChat: pass the KV cache as `cache` or `past_key_values`, not both.")
    return cache if cache is not None else past_key_values


def _renamed_cache_argument(forward):
    """Where transformers calls the KV cache `cache` (>= 5.24), `past_key_values` warns and is renamed, as in
    transformers' own models; older releases pass `past_key_values` themselves, so there it stays silent."""
    if _CACHE_FIELD != "cache":
        return forward
    return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)


def _output_flags(config: NanoChatConfig, output_attentions, output_hidden_states, return_dict) -> tuple[bool, ...]:
    """The call's output switches, each defaulting to the config's; attention weights need the eager backend."""
    output_attentions = getattr(config, "output_attentions", False) if output_attentions is None else output_attentions
    if output_hidden_states is None:
        output_hidden_states = getattr(config, "output_hidden_states", False)
    return_dict = getattr(config, "return_dict", True) if return_dict is None else return_dict
    if output_attentions and config._attn_implementation != "eager":
        # transformers' own models answer this with no weights rather than an error; say why, once
        logger.warning_once(
            f"NanoChat: output_attentions=True needs attn_implementation='eager'; {config._attn_implementation!r} "
            "never forms the attention weights, so `attentions` is None. Load the model with "
            "attn_implementation='eager' or call `model.set_attn_implementation('eager')`."
        )
        output_attentions = False
    return bool(output_attentions), bool(output_hidden_states), bool(return_dict)


def rms_norm(x: torch.Tensor, eps: float | None) -> torch.Tensor:
    # Weightless, like nanochat's `F.rms_norm(x, (d,))`; eps=None means the dtype's machine epsilon.
    return F.rms_norm(x, (x.size(-1),), eps=eps)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and a signed sin, (B|1, 1, T, head_dim), for any positions. The model keeps a table of these for the
    positions 0 .. max_position_embeddings - 1 (`NanoChatModel.rope_cos`/`rope_sin`) and computes others here."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    freqs = position_ids[:, None, :, None].float() * inv_freq
    cos, sin = freqs.cos(), freqs.sin()
    # nanochat rotates the halves by -theta: y1 = x1 cos + x2 sin, y2 = x2 cos - x1 sin. Putting the sign on the
    # small sin table keeps a negation off the activations.
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((sin, -sin), dim=-1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((x2, x1), dim=-1) * signed_sin


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference attention on a boolean mask (True = attend); (B, H, T, D) layout like SDPA. It scores every
    (query, key) pair, so the model always hands it a dense mask."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    scores = scores.masked_fill(~attention_mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def sdpa_window_attention_forward(
    module, query, key, value, attention_mask, scaling, dropout=0.0, sliding_window=None, **kwargs
):
    """SDPA with nanochat's windows. Given no mask (no padding, no cache), a windowed layer attends band by band
    (`banded_sdpa`) instead of through a dense (T, T) mask; everything else is transformers' SDPA."""
    T = query.shape[2]
    if attention_mask is None and sliding_window is not None and key.shape[2] == T and T > sliding_window:
        return banded_sdpa(query, key, value, sliding_window - 1, scaling, dropout if module.training else 0.0), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def banded_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, window: int, scaling: float, dropout: float = 0.0
) -> torch.Tensor:
    """Causal attention in which query t sees keys t - window .. t, with no (T, T) mask.

    The sequence is cut into chunks of `window` positions. The first chunk is plain causal attention; each later
    chunk's queries see exactly the keys of their own and the previous chunk, through one (window, 2 * window)
    band mask shared by all chunks. Work and memory grow as T * window instead of T^2. Returns (B, T, H, D).
    """
    B, H, T, D = query.shape
    kv_heads = key.shape[1]
    c = window
    n = -(-T // c)
    if n * c != T:  # pad the tail: padded queries are dropped and padded keys come after every real query
        pad = (0, 0, 0, n * c - T)
        query, key, value = F.pad(query, pad), F.pad(key, pad), F.pad(value, pad)
    gqa = {"enable_gqa": True} if kv_heads != H else {}
    first = F.scaled_dot_product_attention(
        query[:, :, :c], key[:, :, :c], value[:, :, :c], is_causal=True, dropout_p=dropout, scale=scaling, **gqa
    )
    if n == 1:
        return first[:, :, :T].transpose(1, 2)

    def pairs(x: torch.Tensor) -> torch.Tensor:
        # (B, h, n*c, D) -> (B*(n-1), h, 2c, D): for chunk i >= 1, the keys of chunks i-1 and i
        x = x.view(B, x.shape[1], n, c, D)
        x = torch.cat((x[:, :, :-1], x[:, :, 1:]), dim=3)
        return x.transpose(1, 2).reshape(B * (n - 1), x.shape[1], 2 * c, D)

    q = query.view(B, H, n, c, D)[:, :, 1:].transpose(1, 2).reshape(B * (n - 1), H, c, D)
    r = torch.arange(c, device=query.device)[:, None]
    j = torch.arange(2 * c, device=query.device)[None, :]
    band = (j >= r) & (j <= r + c)  # query r (position ic + r) sees key j (position (i-1)c + j) iff 0 <= ic+r - that <= c
    rest = F.scaled_dot_product_attention(
        q, pairs(key), pairs(value), attn_mask=band, dropout_p=dropout, scale=scaling, **gqa
    )
    rest = rest.view(B, n - 1, H, c, D).transpose(1, 2).reshape(B, H, (n - 1) * c, D)
    return torch.cat((first, rest), dim=2)[:, :, :T].transpose(1, 2)


def attention_mask_for_window(
    window: int, query_len: int, past_len: int, padding_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Boolean (B|1, 1, Tq, Tk) mask: causal, at most `window` keys to the left (-1: any), padded keys removed.

    Query rows with no key left (left padding) are opened to every key so SDPA returns finite values; their
    outputs are padding and nothing attends to them.
    """
    key_len = past_len + query_len
    q_pos = torch.arange(past_len, key_len, device=device)[:, None]
    k_pos = torch.arange(key_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window >= 0:
        mask = mask & (q_pos - k_pos <= window)
    mask = mask[None, None]
    if padding_mask is not None:
        mask = mask & padding_mask[:, None, None, :key_len].bool()
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask


def flex_block_mask_for_window(
    window: int, query_len: int, past_len: int, padding_mask: torch.Tensor | None, device: torch.device
) -> "BlockMask":
    """flex_attention's BlockMask for a causal window (-1: any), with padded keys removed.

    Built from the block structure directly (which (query, key) tiles the band touches, which it covers whole),
    so no dense mask is evaluated: flex skips every tile outside the band and applies the mask function only on
    the tiles the band's edges cross. With padding, every touched tile is checked element by element; a padded
    query row whose keys are all padding gets zeros.
    """
    size = FLEX_BLOCK_SIZE
    key_len = past_len + query_len
    q_first = past_len + torch.arange(0, query_len, size, device=device)  # absolute positions
    q_last = torch.clamp(q_first + size - 1, max=key_len - 1)
    k_first = torch.arange(0, key_len, size, device=device)
    k_last = torch.clamp(k_first + size - 1, max=key_len - 1)
    touched = k_first[None, :] <= q_last[:, None]
    whole = k_last[None, :] <= q_first[:, None]
    if window >= 0:
        touched = touched & (q_first[:, None] - k_last[None, :] <= window)
        whole = whole & (q_last[:, None] - k_first[None, :] <= window)
    # tail tiles (shorter than a block) go through the mask function, which knows the real lengths
    whole = whole & (q_first + size <= key_len)[:, None] & (k_first + size <= key_len)[None, :]
    if padding_mask is not None:
        whole = torch.zeros_like(whole)
    partial = touched & ~whole

    def blocks(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # per query tile: how many key tiles, and their indices first (a stable sort keeps them ascending)
        counts = rows.sum(dim=-1, dtype=torch.int32)
        indices = torch.argsort(rows.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return counts[None, None], indices[None, None]

    keys = None if padding_mask is None else padding_mask[:, :key_len].bool()
    # Decoding: a tensor, not a constant, or compiled flex would recompile at every step. Training and prefill: a
    # plain 0 (inductor's CPU flex kernel can't take a tensor made inside a compiled graph).
    offset = torch.tensor(past_len, device=device) if past_len else 0

    def mask_mod(b, h, q_idx, kv_idx):
        q = q_idx + offset
        allowed = kv_idx <= q
        if window >= 0:
            allowed = allowed & (q - kv_idx <= window)
        if keys is not None:
            allowed = allowed & keys[b, kv_idx]
        return allowed

    kv_num, kv_idx = blocks(partial)
    full_num, full_idx = blocks(whole)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=size, mask_mod=mask_mod, seq_lengths=(query_len, key_len)
    )


def is_flash(attn_implementation: str) -> bool:
    """flash_attention_2/3 and Hub flash kernels (e.g. kernels-community/flash-attn3), as transformers names them."""
    return "flash" in attn_implementation


def attention_inputs(
    attn_implementation: str,
    windows: set[int],
    query_len: int,
    past_len: int,
    padding_mask: torch.Tensor | None,
    device: torch.device,
) -> dict[int, object]:
    """What each window's layers hand their attention backend as `attention_mask`, in that backend's terms.

    flash: the 2-D padding mask (or None); the window itself travels as `sliding_window`. flex: a BlockMask.
    sdpa with no padding and no cache: None (causal, or banded for a short window). Otherwise (eager, sdpa with
    padding or a cache, any other registered backend): a dense boolean mask.
    """
    if is_flash(attn_implementation):
        mask = None if padding_mask is None else padding_mask[:, : past_len + query_len]
        return dict.fromkeys(windows, mask)
    if attn_implementation == "flex_attention":
        return {w: flex_block_mask_for_window(w, query_len, past_len, padding_mask, device) for w in windows}
    if attn_implementation == "sdpa" and padding_mask is None and past_len == 0:
        return dict.fromkeys(windows)
    return {w: attention_mask_for_window(w, query_len, past_len, padding_mask, device) for w in windows}


class NanoChatAttention(nn.Module):
    def __init__(self, config: NanoChatConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.window = config.layer_windows[layer_idx]
        # transformers' (and flash's) convention counts the current token: `sliding_window` = nanochat's window + 1
        self.sliding_window = self.window + 1 if self.window >= 0 else None
        # nanochat multiplies q and k by qk_scale after QK-norm; folding both into the softmax scale is the same.
        self.scaling = config.qk_scale**2 / math.sqrt(self.head_dim)
        self.is_causal = True
        d = config.hidden_size
        self.q_proj = _with_role(nn.Linear(d, self.num_heads * self.head_dim, bias=False), "qkv")
        self.k_proj = _with_role(nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False), "qkv")
        self.v_proj = _with_role(nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False), "qkv")
        self.o_proj = _with_role(nn.Linear(self.num_heads * self.head_dim, d, bias=False), "zero")
        self.ve_gate = None
        if layer_idx in config.value_embed_layers:
            self.ve_gate = _with_role(nn.Linear(config.value_embed_gate_channels, self.num_kv_heads, bias=False), "gate")

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, T, d), already normed
        value_embedding: torch.Tensor | None,  # (B, T, kv_heads * head_dim) or None
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        key_length: int | None = None,  # past + current tokens: how many of the cache's slots are filled
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, _ = hidden_states.shape
        # One matmul for q, k and v (the weights keep the built-in class's three names); then q and k share one
        # RoPE and one QK-norm pass. Projections that are not plain Linear layers (FP8 training swaps in torchao's
        # Float8Linear) run as themselves.
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if all(type(p) is nn.Linear for p in projections):
            qkv = F.linear(hidden_states, torch.cat([p.weight for p in projections]))
        else:
            qkv = torch.cat([p(hidden_states) for p in projections], dim=-1)
        qkv = qkv.view(B, T, self.num_heads + 2 * self.num_kv_heads, self.head_dim).transpose(1, 2)
        qk, v = qkv.split((self.num_heads + self.num_kv_heads, self.num_kv_heads), dim=1)
        if self.ve_gate is not None:
            channels = self.config.value_embed_gate_channels
            gate = self.config.value_embed_gate_range * torch.sigmoid(self.ve_gate(hidden_states[..., :channels]))
            ve = value_embedding.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = v + gate.transpose(1, 2).unsqueeze(-1) * ve
        cos, sin = position_embeddings
        # nanochat order: RoPE first, then the weightless QK-norm.
        q, k = rms_norm(apply_rotary(qk, cos, sin), self.config.rms_norm_eps).split(
            (self.num_heads, self.num_kv_heads), dim=1
        )
        # RoPE tables in the embeddings' dtype can lift q and k above v's under autocast; SDPA casts them back
        # itself, flex and flash need one dtype.
        q, k = q.to(v.dtype), k.to(v.dtype)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
            if key_length is not None and k.shape[2] > key_length:
                # a preallocated (static) cache hands back every slot; the filled ones are the first key_length
                k, v = k[:, :, :key_length], v[:, :, :key_length]
        implementation = self.config._attn_implementation
        if implementation == "flex_attention":
            # v is a strided view of the fused projection; inductor's CPU flex kernel (torch 2.13) reads such a
            # view wrongly inside a compiled model (tests/test_compile.py), so it gets its own storage
            v = v.contiguous()
        if implementation == "eager":
            attention = eager_attention_forward
        elif implementation == "sdpa":
            attention = sdpa_window_attention_forward
        else:
            # flash-attn and the Hub's kernels are CUDA code; a CPU tensor would crash inside them
            if q.device.type == "cpu" and (implementation.startswith("flash_attention_") or "/" in implementation):
                raise ValueError(
                    f"attn_implementation={implementation!r} runs on CUDA GPUs only and this model is on the CPU: use "
                    "'sdpa' (the default), 'eager' or 'flex_attention' there, or move the model to a GPU."
                )
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, sdpa_window_attention_forward)
        out, weights = attention(self, q, k, v, attention_mask, scaling=self.scaling, dropout=0.0,
                                 sliding_window=self.sliding_window, **kwargs)
        return self.o_proj(out.reshape(B, T, -1)), weights


class NanoChatMLP(nn.Module):
    def __init__(self, config: NanoChatConfig):
        super().__init__()
        self.fc1 = _with_role(nn.Linear(config.hidden_size, config.intermediate_size, bias=False), "fc1")
        self.fc2 = _with_role(nn.Linear(config.intermediate_size, config.hidden_size, bias=False), "zero")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)).square())


class NanoChatDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: NanoChatConfig, layer_idx: int):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.self_attn = NanoChatAttention(config, layer_idx)
        self.mlp = NanoChatMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        value_embedding: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The new residual stream, and the attention weights where the backend forms them (eager)."""
        attn, weights = self.self_attn(
            rms_norm(hidden_states, self.eps), value_embedding, position_embeddings, attention_mask, cache, **kwargs
        )
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(rms_norm(hidden_states, self.eps)), weights


class NanoChatPreTrainedModel(PreTrainedModel):
    config_class = NanoChatConfig
    config: NanoChatConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NanoChatDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = False
    _can_compile_fullgraph = True

    def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
        try:
            return super()._check_and_adjust_attn_implementation(attn_implementation, *args, **kwargs)
        except (ImportError, ValueError) as error:
            if not attn_implementation or not is_flash(attn_implementation):
                raise
            raise type(error)(
                f"{error}\nNanoChat: attn_implementation={attn_implementation!r} needs a CUDA GPU and its package: "
                "`pip install flash-attn` for 'flash_attention_2', `pip install kernels` (and Hub access) for "
                "'kernels-community/flash-attn3' on Hopper. Without them use 'sdpa' (the default) or "
                "'flex_attention'; on the CPU, 'sdpa' or 'eager'."
            ) from error

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """transformers' resize, for every token table: the input embeddings, the lm_head and the 2026 value
        embeddings. `config.vocab_size` stays the real token count; the tables keep `pad_vocab_size_to` padding
        (`pad_to_multiple_of`, if given, becomes the new padding)."""
        if new_num_tokens is None and pad_to_multiple_of is None:
            return self.get_input_embeddings()
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            # transformers' own wording (typo included), which callers may match
            raise ValueError(
                f"Asking to pad the embedding matrix to a multiple of `{pad_to_multiple_of}`, which is not and "
                "integer. Please make sure to pass an integer"
            )
        config = self.config
        vocab = config.vocab_size if new_num_tokens is None else new_num_tokens
        if pad_to_multiple_of is not None:
            config.pad_vocab_size_to = pad_to_multiple_of
        rows = math.ceil(vocab / config.pad_vocab_size_to) * config.pad_vocab_size_to
        embeddings = super().resize_token_embeddings(rows, None, mean_resizing)
        model = getattr(self, self.base_model_prefix, self)
        for key, table in list(model.value_embeds.items()):
            model.value_embeds[key] = self._get_resized_embeddings(table, rows, mean_resizing=mean_resizing)
        tables = [(self.get_input_embeddings(), "embed"), (self.get_output_embeddings(), "lm_head")]
        tables += [(table, "value_embed") for table in model.value_embeds.values()]
        for table, role in tables:
            if table is None:
                continue
            _with_role(table, role)  # kept or rebuilt, each table keeps its init role
            # transformers swaps the rows in through `weight.data`; a parameter that was in an autograd graph
            # before keeps expecting its old shape from backward, so each table gets a fresh parameter
            table.weight = nn.Parameter(table.weight.detach(), requires_grad=table.weight.requires_grad)
        config.vocab_size = vocab
        self.vocab_size = vocab
        return embeddings

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """nanochat's initialisation, per generation.

        transformers skips modules that own no tensor directly, so each Linear/Embedding carries its role in
        `init_role` (set where it is built) and the scalars are set by the module that owns them.
        """
        config = self.config
        modern = config.generation == "2026"
        role = getattr(module, "init_role", None)
        if role is not None:
            weight = module.weight
            fan_out, fan_in = weight.shape
            s = math.sqrt(3) / math.sqrt(config.hidden_size)  # uniform bound with the std of N(0, 1/d)
            if role == "zero":
                init.zeros_(weight)
            elif role == "gate":
                init.uniform_(weight, 0.0, 0.02)
            elif role == "value_embed":
                init.uniform_(weight, -s, s)
            elif role == "embed":
                init.normal_(weight, mean=0.0, std=0.8 if modern else 1.0)
            elif role == "lm_head":
                init.normal_(weight, mean=0.0, std=0.001) if modern else init.zeros_(weight)
            elif modern:  # "qkv" or "fc1"
                bound = 0.4 * s if role == "fc1" else s
                init.uniform_(weight, -bound, bound)
            else:
                # 2025: N(0, 1/sqrt(fan_in) * min(1, sqrt(fan_out / fan_in))) (arXiv 2310.17813)
                init.normal_(weight, mean=0.0, std=min(1.0, math.sqrt(fan_out / fan_in)) / math.sqrt(fan_in))
        elif isinstance(module, NanoChatModel):
            cos, sin = module._rope_tables(module.rope_cos.device)
            init.copy_(module.rope_cos, cos)
            init.copy_(module.rope_sin, sin)
            if module.resid_lambdas is not None:
                n = config.num_hidden_layers
                frac = torch.arange(n, dtype=torch.float32) / max(n - 1, 1)
                init.copy_(module.resid_lambdas, 1.15 - 0.10 * frac)
                init.copy_(module.x0_lambdas, 0.20 - 0.15 * frac)
            if module.smear_lambda is not None:
                init.zeros_(module.smear_lambda)
            if module.backout_lambda is not None:
                init.constant_(module.backout_lambda, 0.2)


def _with_role(module: nn.Module, role: str) -> nn.Module:
    module.init_role = role
    return module


class NanoChatModel(NanoChatPreTrainedModel):
    def __init__(self, config: NanoChatConfig):
        super().__init__(config)
        vocab = config.padded_vocab_size
        kv_dim = config.num_key_value_heads * config.head_dim
        self.embed_tokens = _with_role(nn.Embedding(vocab, config.hidden_size), "embed")
        self.value_embeds = nn.ModuleDict(
            {str(i): _with_role(nn.Embedding(vocab, kv_dim), "value_embed") for i in config.value_embed_layers}
        )
        self.layers = nn.ModuleList(NanoChatDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        n = config.num_hidden_layers
        self.resid_lambdas = nn.Parameter(torch.ones(n)) if config.residual_lambdas else None
        self.x0_lambdas = nn.Parameter(torch.zeros(n)) if config.residual_lambdas else None
        self.smear_gate = _with_role(nn.Linear(config.smear_gate_channels, 1, bias=False), "gate") if config.smear else None
        self.smear_lambda = nn.Parameter(torch.zeros(1)) if config.smear else None
        self.backout_lambda = nn.Parameter(torch.zeros(1)) if config.backout else None
        self.gradient_checkpointing = False
        # RoPE tables of the positions a default forward uses. A table read once per forward is cheap; computed in
        # the forward, a compiler folds cos and sin into every per-head RoPE kernel (~4% of a compiled CPU step).
        # Not saved: `_init_weights` fills them, also after `from_pretrained`.
        cos, sin = self._rope_tables()
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _rope_tables(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        positions = torch.arange(config.max_position_embeddings, device=device)[None]
        return rotary_cos_sin(positions, config.head_dim, config.rope_theta, torch.float32)

    def _smear(
        self,
        x: torch.Tensor,
        input_ids: torch.LongTensor,
        cache: Cache | None,
        past_len: int,
        padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """x[t] += smear_lambda * sigmoid(smear_gate(x[t, :C])) * x[t-1], on the pre-smear normed embeddings."""
        if past_len > 0:
            prev_token = getattr(cache, _SMEAR_STATE, None)
            if prev_token is None or prev_token.shape[0] != x.shape[0]:
                raise ValueError(
                    "NanoChat smear needs the previous token, which this KV cache does not hold (it was not filled "
                    "by this model, or its batch was changed). Prefill the cache with this model."
                )
            prev_first = rms_norm(self.embed_tokens(prev_token.to(input_ids.device)), self.config.rms_norm_eps)
        else:
            prev_first = torch.zeros_like(x[:, :1])
        prev = torch.cat([prev_first.to(x.dtype), x[:, :-1]], dim=1)
        if padding_mask is not None:
            # A padded previous position contributes nothing: left-padded rows then match their unpadded forward.
            key_len = past_len + x.shape[1]
            prev_is_real = padding_mask[:, max(past_len - 1, 0) : key_len - 1].to(x.dtype)
            if past_len == 0:
                prev_is_real = torch.cat([prev_is_real.new_zeros(len(prev_is_real), 1), prev_is_real], dim=1)
            prev = prev * prev_is_real[..., None]
        if cache is not None:
            setattr(cache, _SMEAR_STATE, input_ids[:, -1:].detach())
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., : self.config.smear_gate_channels]))
        return x + gate * prev

    @_renamed_cache_argument
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        config = self.config
        cache = _cache_argument(cache, past_key_values)
        output_attentions, output_hidden_states, return_dict = _output_flags(
            config, output_attentions, output_hidden_states, return_dict
        )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("NanoChatModel: pass exactly one of `input_ids` or `inputs_embeds`.")
        if input_ids is None and (config.value_embeds or config.smear):
            # Value embeddings and smear's previous token are looked up by token id: embeddings alone cannot drive it.
            raise ValueError(
                "NanoChatModel: this model has value embeddings or smear (the 2026 generation), which look tokens up "
                "by id: pass `input_ids`; `inputs_embeds` alone is not enough."
            )
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"NanoChatModel: `attention_mask` must be a 2-D (batch, keys) padding mask, got {attention_mask.dim()}-D."
            )
        use_cache = use_cache if use_cache is not None else (config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = DynamicCache(config=config)
        # int(): a static cache counts in a tensor it increments in place as the layers write to it
        past_len = int(cache.get_seq_length()) if cache is not None else 0

        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        x = rms_norm(x, config.rms_norm_eps)
        if self.smear_gate is not None:
            x = self._smear(x, input_ids, cache, past_len, attention_mask)
        x0 = x

        # A mask of ones is no mask: the backends' unmasked paths are the fast ones. (Not while compiling: reading
        # the mask's values would break the graph.)
        if attention_mask is not None and not torch.compiler.is_compiling() and bool(attention_mask.all()):
            attention_mask = None
        masks = attention_inputs(
            config._attn_implementation, set(config.layer_windows), T, past_len, attention_mask, x.device
        )

        if position_ids is None and past_len + T <= self.rope_cos.shape[2]:
            position_embeddings = (self.rope_cos[:, :, past_len : past_len + T].to(x.dtype),
                                   self.rope_sin[:, :, past_len : past_len + T].to(x.dtype))
        else:
            if position_ids is None:
                position_ids = torch.arange(past_len, past_len + T, device=x.device)[None]
            position_embeddings = rotary_cos_sin(position_ids, config.head_dim, config.rope_theta, x.dtype)
        all_hidden = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        x_backout = None
        for i, layer in enumerate(self.layers):
            if self.resid_lambdas is not None:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            if output_hidden_states:  # transformers' convention: what enters each layer, then the final output
                all_hidden += (x,)
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x, weights = layer(
                x,
                ve,
                position_embeddings=position_embeddings,
                attention_mask=masks[layer.self_attn.window],
                cache=cache,
                key_length=past_len + T,
                **kwargs,
            )
            if output_attentions:
                all_attentions += (weights,)
            if i == config.backout_layer:
                x_backout = x
        if self.backout_lambda is not None:
            x = x - self.backout_lambda * x_backout
        x = rms_norm(x, config.rms_norm_eps)
        if output_hidden_states:
            all_hidden += (x,)
        output = BaseModelOutputWithPast(
            last_hidden_state=x,
            hidden_states=all_hidden,
            attentions=all_attentions,
            **{_CACHE_FIELD: cache if use_cache else None},
        )
        return output if return_dict else output.to_tuple()


class NanoChatForCausalLM(NanoChatPreTrainedModel, GenerationMixin):
    _tied_weights_keys = None

    def __init__(self, config: NanoChatConfig):
        super().__init__(config)
        self.model = NanoChatModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = _with_role(nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False), "lm_head")
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, *args, inputs_embeds: torch.Tensor | None = None, **kwargs
    ) -> dict:
        # `inputs_embeds` is named so that generate() sees this model accepts them (it inspects the signature).
        inputs = super().prepare_inputs_for_generation(input_ids, *args, inputs_embeds=inputs_embeds, **kwargs)
        cache = inputs.get("cache", inputs.get("past_key_values"))
        fed = inputs.get("input_ids")
        if self.config.smear and isinstance(cache, Cache) and fed is not None:
            # generate() reorders (beam search), crops (assisted decoding) and re-batches a cache's rows without
            # knowing of smear's state: take the token before the ones fed now from the sequences it keeps.
            start = input_ids.shape[1] - fed.shape[1]
            if start > 0:
                setattr(cache, _SMEAR_STATE, input_ids[:, start - 1 : start])
        return inputs

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @_renamed_cache_argument
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_cache_argument(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.logits_from_hidden(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )
        return output if return_dict else output.to_tuple()

    def create_masks_for_generate(self, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
        """generate() would build a 4-D mask for a static cache; this model builds its per-window masks itself from
        the 2-D padding mask, with any cache."""
        return attention_mask

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits over the real vocabulary from final hidden states of any shape (..., hidden_size).

        Callers that need logits at scattered (row, position) pairs gather the hidden states first and pay the
        lm_head only for those."""
        # Slice the padded vocab away, then softcap in fp32 as nanochat does.
        logits = self.lm_head(hidden)[..., : self.config.vocab_size].float()
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits

    # ---------------------------------------------------------------------------------------------------------
    # nanochat's accounting: the scaling-law parameter groups and FLOPs per token.

    def num_scaling_params(self) -> dict[str, int]:
        """Parameter counts by nanochat's groups (`GPT.num_scaling_params`)."""
        model = self.model
        counts = {
            "wte": model.embed_tokens.weight.numel(),
            "value_embeds": sum(p.numel() for p in model.value_embeds.parameters()),
            "lm_head": self.lm_head.weight.numel(),
            "transformer_matrices": sum(p.numel() for p in model.layers.parameters()),
            "scalars": sum(
                p.numel()
                for p in (model.resid_lambdas, model.x0_lambdas, model.smear_lambda, model.backout_lambda)
                if p is not None
            )
            + (model.smear_gate.weight.numel() if model.smear_gate is not None else 0),
        }
        counts["total"] = sum(counts.values())
        return counts

    def estimate_flops_per_token(self, sequence_length: int | None = None) -> float:
        """Training FLOPs per token: 6 x matmul weights + 12 x heads x head_dim x attended context, per layer."""
        config = self.config
        seq = sequence_length or config.max_position_embeddings
        matmul_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        attended = sum(seq if window < 0 else min(window, seq) for window in config.layer_windows)
        return 6 * matmul_params + 12 * config.num_attention_heads * config.head_dim * attended


__all__ = ["NanoChatPreTrainedModel", "NanoChatModel", "NanoChatForCausalLM"]
