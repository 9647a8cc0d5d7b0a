"""nanochat HEAD's (92d63d4) constants, written out as literals (nanochat-spec.md §1-§3, nanochat/gpt.py, optim.py,
tokenizer.py, scripts/base_train.py). The oracles in tests/ take them from here, never from the package under test,
so that a wrong constant in the package fails a test instead of being copied into its own reference."""

# The model (gpt.py): logits softcapped at 15 in fp32; q and k multiplied by 1.2 after QK-norm (2026 only); RoPE base.
SOFTCAP = 15.0
QK_SCALE = {"2025": 1.0, "2026": 1.2}
ROPE_BASE = {"2025": 10_000.0, "2026": 100_000.0}

# Polar Express (optim.py `polar_express_coeffs`; arXiv 2505.16932, num_iters=5, safety 2e-2, cushion 2).
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

# The pre-tokenizer split (tokenizer.py SPLIT_PATTERN; GPT-4's with \p{N}{1,2} instead of {1,3}).
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

# base_train.py's defaults handed to GPT.setup_optimizer.
EMBEDDING_LR, UNEMBEDDING_LR, MATRIX_LR, SCALAR_LR, WEIGHT_DECAY = 0.3, 0.008, 0.02, 0.5, 0.28
# GPT.setup_optimizer's AdamW groups: betas, eps and weight decay (the LRs are computed in the tests).
ADAMW_GROUPS = {
    "lm_head": dict(betas=(0.8, 0.96), eps=1e-10, weight_decay=0.01),
    "wte": dict(betas=(0.8, 0.995), eps=1e-10, weight_decay=0.001),
    "value_embeds": dict(betas=(0.8, 0.995), eps=1e-10, weight_decay=0.01),
    "resid_lambdas": dict(betas=(0.8, 0.95), eps=1e-10, weight_decay=0.05),
    "x0_lambdas": dict(betas=(0.96, 0.95), eps=1e-10, weight_decay=0.0),
    "smear": dict(betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0),
}
# ...and its Muon groups (the momentum is then overwritten by the schedule; Nesterov is implied by muon_step_fused).
MUON_GROUP = dict(momentum=0.95, ns_steps=5, beta2=0.9, nesterov=True)
SMEAR_LR = 0.2  # neither d_model- nor batch-scaled
