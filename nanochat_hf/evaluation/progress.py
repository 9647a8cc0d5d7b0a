"""The evaluations' progress bars: one per task, on stderr, with its count and ETA (tqdm, as lighteval shows them).

``nanochat-hf eval`` turns them on; library calls (lighteval's tasks, SFT's in-training ChatCORE, tests) pass no
description and stay quiet. Under torch.distributed only rank 0 draws, so a multi-process run shows one bar per
task. The speedrun keeps the final state of each bar in ``logs/<stage>.log`` (``speedrun.run_logged`` drops the
redrawn states a terminal overwrites).
"""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm


def task_bar(desc: str | None, total: int, unit: str = "item") -> tqdm:
    """A bar for one task of `total` units; disabled when `desc` is None or on a rank other than 0."""
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    interactive = sys.stderr.isatty()
    # Piped (a speedrun stage, a redirect), a redraw every second is enough and keeps the stream small.
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=desc is None or rank != 0,
                dynamic_ncols=interactive, mininterval=0.1 if interactive else 1.0)
