"""nanochat's bits per byte (nanochat-spec.md §5.2): the loss of a model in bits per byte of text, independent of
the tokenizer, from batches of ids and already-shifted targets."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate_bpb(
    model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], token_bytes: torch.Tensor
) -> float:
    """nanochat's bits per byte: the summed cross-entropy (nats) of every target whose token stands for at least
    one byte, over ln 2 times the number of those bytes. Targets that are negative (-100, or nanochat's -1) or
    special tokens (0 bytes) count in neither sum. `batches` hold ``input_ids`` and ALREADY-SHIFTED ``labels``
    (as :class:`PackedBatches` yields); the model is called with ``input_ids`` only. Sums are all-reduced across
    ranks when torch.distributed is initialised. Returns inf when no target has bytes. Put the model in eval mode
    first."""
    device = next(model.parameters()).device
    token_bytes = token_bytes.to(device=device, dtype=torch.long)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.long, device=device)
    for batch in batches:
        input_ids = batch["input_ids"].to(device)
        targets = batch["labels"].to(device).reshape(-1)
        logits = model(input_ids=input_ids).logits
        valid = targets >= 0
        safe_targets = targets.clamp(min=0)  # cross_entropy rejects negative ids; those are masked below anyway
        nats = F.cross_entropy(logits.float().reshape(targets.numel(), -1), safe_targets, reduction="none")
        nbytes = torch.where(valid, token_bytes[safe_targets], 0)
        total_nats += (nats.double() * (nbytes > 0)).sum()
        total_bytes += nbytes.sum()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total_nats)
        torch.distributed.all_reduce(total_bytes)
    n_bytes = int(total_bytes.item())
    if n_bytes == 0:
        return math.inf
    return total_nats.item() / (math.log(2) * n_bytes)
