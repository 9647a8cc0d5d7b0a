"""What TRL's trainers need to train a NanoChat model the way nanochat does (shared by sft.py and rl.py).

* :class:`FinetuneOptimizerFactory`: our Muon + AdamW through the Trainer's factory hook, every group's LR scaled by
  nanochat's ``init_lr_frac``.
* :class:`NanoChatTRLMixin`: nanochat's LR schedule (linear to 0 over the run, no momentum schedule), no gradient
  clipping, the per-step loss :class:`~nanochat_hf.training.pretrain.LossLog` writes, and ``--push_to_hub`` with
  our repo folder and model card.
* :func:`score_real_vocab_only`: TRL 1.16 computes its losses with a fused LM head that reads
  ``get_output_embeddings().weight`` directly, bypassing our forward, which drops the rows a padded vocabulary adds
  (``padded_vocab_size`` > ``vocab_size``). Those rows would then enter every softmax. This narrows the head the
  fused path sees to the real vocabulary, so the loss and log-probabilities are the model's own.
* :func:`enable_tool_rollouts` and :func:`python`: nanochat's calculator in GRPO rollouts through TRL's own tool
  loop (see below).

**The calculator in TRL's tool loop.** nanochat's engine watches the sampled tokens and, at ``<|python_end|>``,
forces ``<|output_start|>result<|output_end|>`` into the row and samples on. TRL's GRPOTrainer (1.16) reaches the
same token stream in three moves: generation stops at any id of ``model.generation_config.eos_token_id`` (we add
``<|python_end|>`` to ``<|assistant_end|>``); ``tokenizer.parse_response`` with our
:data:`NANOCHAT_RESPONSE_TEMPLATE` turns ``<|python_start|>expr<|python_end|>`` into an assistant ``tool_calls``
entry for the tool named ``python``; TRL calls :func:`python`, renders the ``tool`` message through the chat template
(our template keeps the assistant turn open after a tool result, so the suffix is exactly
``<|output_start|>result<|output_end|>``), appends those ids and generates again from there. TRL's ``tool_mask`` is 0
on the appended ids, so tool output is left out of the loss, as nanochat's mask does.
"""

import functools
import types

import torch

from ..inference.tools import calculate
from .hub_push import HubPushMixin
from .optim import MuonAdamW, NanoChatSchedule
from .pretrain import NanoChatOptimizerFactory

# transformers' response-template format (`tokenizer.parse_response`): the text after the last
# <|assistant_start|> (a new turn) or <|output_end|> (the same turn, continued after a tool result) is content up to
# <|assistant_end|>, and each python block is one call of the tool `python` with its code as the `code` argument,
# the shape the tasks write (nanochat_hf/tasks/common.py) and the chat template renders back.
NANOCHAT_RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": ["<|assistant_start|>", "<|output_end|>"],
    "fields": {
        "tool_calls": {
            "open": "<|python_start|>",
            "close": "<|python_end|>",
            "repeats": True,
            "content": "text",
            "content_args": {"strip": False},
            "transform": {"type": "function", "function": {"name": "python", "arguments": {"code": "{content}"}}},
        },
        "content": {"close": "<|assistant_end|>", "content": "text", "content_args": {"strip": False}},
    },
}


class FinetuneOptimizerFactory(NanoChatOptimizerFactory):
    """`optimizer_cls_and_kwargs=(FinetuneOptimizerFactory, {"init_lr_frac": f, ...})`: nanochat's groups with every
    LR (the smear group's included) multiplied by `init_lr_frac`, as chat_sft/chat_rl do."""

    def __call__(self, model, init_lr_frac: float = 1.0, **kwargs) -> MuonAdamW:
        optimizer = super().__call__(model, **kwargs)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] = group["lr"] * init_lr_frac
        return optimizer


def finetune_optimizer_kwargs(run) -> dict:
    """The factory's settings from an SFT or RL recipe (both name the LRs, weight decay and init_lr_frac alike)."""
    return dict(embedding_lr=run.embedding_lr, unembedding_lr=run.unembedding_lr, matrix_lr=run.matrix_lr,
                scalar_lr=run.scalar_lr, weight_decay=run.weight_decay, init_lr_frac=run.init_lr_frac)


class NanoChatTRLMixin(HubPushMixin):
    """Mix in before a TRL trainer class. LR multiplier ``1 - step / num_steps`` (nanochat's SFT and RL); the Hub
    push of our repo folder (:class:`~nanochat_hf.training.hub_push.HubPushMixin`)."""

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = NanoChatSchedule(
                optimizer or self.optimizer, total_steps=num_training_steps, warmup_steps=0, warmdown_ratio=1.0,
                final_lr_frac=0.0, momentum_schedule=None, weight_decay_schedule=False,
            )
        return self.lr_scheduler

    def _get_grad_norm(self, model, grad_norm=None):
        return grad_norm if self.args.max_grad_norm > 0 else None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_loss = getattr(self, "_step_loss", 0.0) + loss.item()
        return loss


class _RealVocabHead:
    """The first `vocab_size` rows of an lm_head, as the module-like object the fused head reads."""

    bias = None

    def __init__(self, lm_head: torch.nn.Linear, vocab_size: int):
        self._lm_head = lm_head
        self._vocab_size = vocab_size

    @property
    def weight(self) -> torch.Tensor:
        return self._lm_head.weight[: self._vocab_size]  # a view: the gradient reaches the real rows only


def score_real_vocab_only(model: torch.nn.Module) -> None:
    """After a TRL trainer patched `model.forward` with its fused LM head: make that head score the real
    vocabulary only. A model whose vocabulary is not padded is left untouched."""
    config = model.config
    if getattr(config, "padded_vocab_size", config.vocab_size) == config.vocab_size:
        return
    fused_forward = model.forward

    @functools.wraps(type(model).forward)  # keep the signature: generate() validates its kwargs against it
    def forward(self, *args, fused_lm_head: bool = False, **kwargs):
        if not fused_lm_head:
            return fused_forward(*args, **kwargs)
        head = _RealVocabHead(self.lm_head, config.vocab_size)
        self.get_output_embeddings = lambda: head  # seen only by this call of the fused path
        try:
            return fused_forward(*args, fused_lm_head=True, **kwargs)
        finally:
            del self.get_output_embeddings

    model.forward = types.MethodType(forward, model)


def python(code: str) -> str:
    """Evaluate an arithmetic expression with nanochat's calculator.

    Args:
        code: the expression inside the python block, e.g. "34*9" or "'strawberry'.count('r')".
    """
    # nanochat's engine inserts nothing when the calculator refuses; TRL always appends the tool message, so the
    # closest is an empty output block.
    result = calculate(code)
    return "" if result is None else result


def enable_tool_rollouts(model: torch.nn.Module, tokenizer) -> list[int]:
    """Prepare `model` and `tokenizer` for TRL's tool loop with :func:`python` (pass ``tools=[python]``): the
    response template on the tokenizer, and ``<|python_end|>`` as a stop id of the model's generation config.
    Returns the generation config's previous ``eos_token_id`` so the caller can restore it before saving."""
    stops = [tokenizer.convert_tokens_to_ids(t) for t in ("<|assistant_end|>", "<|python_end|>")]
    if tokenizer.unk_token_id in stops or None in stops:
        raise ValueError("the tokenizer lacks nanochat's <|assistant_end|>/<|python_end|> tokens; tool rollouts need "
                         "a tokenizer made by nanochat_hf.tokenizer.bpe")
    previous = model.generation_config.eos_token_id
    tokenizer.response_template = NANOCHAT_RESPONSE_TEMPLATE
    model.generation_config.eos_token_id = stops
    return previous
