"""nanochat's GPT forward pass, re-stated from its equations (shared/reference/nanochat-spec.md §1).

Written independently of `nanochat_hf.modeling_nanochat`: plain tensors in nanochat's (B, T, H, D) layout, q/k scaled
after QK-norm, explicit sliding-window masks. Tests use it as an oracle for our model and for the converters.
"""

import torch
import torch.nn.functional as F


def _norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def _rope(x: torch.Tensor, base: float) -> torch.Tensor:
    # x: (B, T, H, D); nanochat: y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos
    T, D = x.shape[1], x.shape[3]
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)
    cos, sin = freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)


def _window_sizes(n_layer: int, pattern: str, long_w: int, short_w: int) -> list[int]:
    sizes = []
    for i in range(n_layer):
        c = pattern[i % len(pattern)]
        sizes.append(long_w if c == "L" else short_w)
    sizes[-1] = long_w
    return sizes


def nanochat_forward(sd: dict, cfg: dict, idx: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, vocab) of a nanochat GPT.

    `sd` uses nanochat's own state-dict names (`transformer.wte.weight`, `transformer.h.{i}.attn.c_q.weight`, ...);
    `cfg` holds n_layer, n_head, n_kv_head, n_embd, vocab_size, rope_base, qk_scale, window_pattern,
    long_window, short_window, softcap and the 2026 switches (has_ve, has_lambdas, has_smear, has_backout).
    """
    B, T = idx.shape
    L, H, KV, d = cfg["n_layer"], cfg["n_head"], cfg["n_kv_head"], cfg["n_embd"]
    hd = d // H
    x = _norm(F.embedding(idx, sd["transformer.wte.weight"].float()))
    if cfg["has_smear"]:
        gate = sd["smear_lambda"] * torch.sigmoid(x[:, 1:, :24] @ sd["smear_gate.weight"].t())
        x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
    x0 = x
    windows = _window_sizes(L, cfg["window_pattern"], cfg["long_window"], cfg["short_window"])
    backout_at = L // 2
    x_backout = None
    rows = torch.arange(T)[:, None]
    cols = torch.arange(T)[None, :]
    for i in range(L):
        p = f"transformer.h.{i}."
        if cfg["has_lambdas"]:
            x = sd["resid_lambdas"][i] * x + sd["x0_lambdas"][i] * x0
        h = _norm(x)
        q = (h @ sd[p + "attn.c_q.weight"].t()).view(B, T, H, hd)
        k = (h @ sd[p + "attn.c_k.weight"].t()).view(B, T, KV, hd)
        v = (h @ sd[p + "attn.c_v.weight"].t()).view(B, T, KV, hd)
        if f"value_embeds.{i}.weight" in sd:
            ve = F.embedding(idx, sd[f"value_embeds.{i}.weight"].float()).view(B, T, KV, hd)
            gate = 3 * torch.sigmoid(h[..., :12] @ sd[p + "attn.ve_gate.weight"].t())
            v = v + gate.unsqueeze(-1) * ve
        q, k = _norm(_rope(q, cfg["rope_base"])), _norm(_rope(k, cfg["rope_base"]))
        q, k = q * cfg["qk_scale"], k * cfg["qk_scale"]
        mask = cols <= rows
        if windows[i] >= 0:  # FA3 convention: -1 is an unlimited window
            mask = mask & (rows - cols <= windows[i])
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, d)
        x = x + y @ sd[p + "attn.c_proj.weight"].t()
        h = _norm(x)
        x = x + F.relu(h @ sd[p + "mlp.c_fc.weight"].t()).square() @ sd[p + "mlp.c_proj.weight"].t()
        if i == backout_at:
            x_backout = x
    if cfg["has_backout"]:
        x = x - sd["backout_lambda"] * x_backout
    x = _norm(x)
    logits = (x @ sd["lm_head.weight"].t())[..., : cfg["vocab_size"]].float()
    return cfg["softcap"] * torch.tanh(logits / cfg["softcap"])


def to_nanochat_state_dict(our_sd: dict) -> dict:
    """Our parameter names -> nanochat's, written out by hand for the tests."""
    out = {}
    for key, value in our_sd.items():
        name = key
        name = name.replace("model.embed_tokens.", "transformer.wte.")
        name = name.replace("model.layers.", "transformer.h.")
        name = name.replace(".self_attn.q_proj.", ".attn.c_q.").replace(".self_attn.k_proj.", ".attn.c_k.")
        name = name.replace(".self_attn.v_proj.", ".attn.c_v.").replace(".self_attn.o_proj.", ".attn.c_proj.")
        name = name.replace(".self_attn.ve_gate.", ".attn.ve_gate.")
        name = name.replace(".mlp.fc1.", ".mlp.c_fc.").replace(".mlp.fc2.", ".mlp.c_proj.")
        name = name.replace("model.value_embeds.", "value_embeds.")
        name = name.removeprefix("model.")
        out[name] = value
    return out


def reference_config(config) -> dict:
    """The `cfg` dict of `nanochat_forward` from one of our configs."""
    return {
        "n_layer": config.num_hidden_layers,
        "n_head": config.num_attention_heads,
        "n_kv_head": config.num_key_value_heads,
        "n_embd": config.hidden_size,
        "vocab_size": config.vocab_size,
        "rope_base": config.rope_parameters["rope_theta"],
        "qk_scale": config.qk_scale,
        "window_pattern": config.window_pattern,
        "long_window": config.long_window,
        "short_window": config.short_window,
        "softcap": config.final_logit_softcapping,
        "has_smear": config.smear,
        "has_lambdas": config.residual_lambdas,
        "has_backout": config.backout,
    }


# ---------------------------------------------------------------------------------------------------------------
# nanochat's render_conversation (nanochat-spec.md §3.1), re-stated from the spec, not from our chat template


def render_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """nanochat's render_conversation: ids and loss mask (1 = trained) for a nanochat-format conversation."""
    special = tokenizer.convert_tokens_to_ids

    def text(s: str) -> list[int]:
        return tokenizer.encode(s, add_special_tokens=False)

    ids, mask = [], []

    def add(tokens: list[int], value: int) -> None:
        ids.extend(tokens)
        mask.extend([value] * len(tokens))

    if messages[0]["role"] == "system":
        first = dict(messages[1], content=messages[0]["content"] + "\n\n" + messages[1]["content"])
        messages = [first, *messages[2:]]
    add([special("<|bos|>")], 0)
    for i, message in enumerate(messages):
        assert message["role"] == ("user" if i % 2 == 0 else "assistant")
        if message["role"] == "user":
            add([special("<|user_start|>"), *text(message["content"]), special("<|user_end|>")], 0)
            continue
        add([special("<|assistant_start|>")], 0)
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts:
            if part["type"] == "text":
                add(text(part["text"]), 1)
            elif part["type"] == "python":
                add([special("<|python_start|>"), *text(part["text"]), special("<|python_end|>")], 1)
            else:
                add([special("<|output_start|>"), *text(part["text"]), special("<|output_end|>")], 0)
        add([special("<|assistant_end|>")], 1)
    return ids, mask
