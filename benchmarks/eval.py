"""CORE scoring throughput: our batched scorer against nanochat's one-example-at-a-time scoring.

Same tiny model, same synthetic bundle (tests/core_fixtures.py, all 22 task shapes), same requests. The baseline
scores one example per forward pass the way nanochat's core_eval does (logits, cross-entropy and argmax at every
position); ours packs `--batch` examples per pass, runs the prefix an example's options share once on a KV cache, and
computes logits only where a span needs them. Both must give the same verdicts. Rounds are interleaved so both see the same machine conditions. Target: >= 4x at batch 8.

    python benchmarks/eval.py [--depth 4] [--head-dim 64] [--vocab-size 8192] [--items 12] [--batch 8] [--rounds 3]
    python benchmarks/eval.py --depth 2 --head-dim 32 --vocab-size 512   # the test suite's tiny model
"""

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanochat_hf.data.embedded import embedded_corpus  # noqa: E402
from nanochat_hf.evaluation.bundle import load_core_tasks, load_task_data  # noqa: E402
from nanochat_hf.evaluation.core import build_requests, score_requests, verdict  # noqa: E402
from nanochat_hf.tokenizer.bpe import train_tokenizer  # noqa: E402
from nanochat_hf.training.init_model import build_model  # noqa: E402
from tests.conftest import randomize  # noqa: E402
from tests.core_fixtures import write_bundle  # noqa: E402


@torch.no_grad()
def one_at_a_time(model, requests, pad_id: int) -> list[bool]:
    """nanochat's core_eval.forward_model per example: the options right-padded, losses/argmax everywhere."""
    verdicts = []
    for r in requests:
        width = max(len(s) for s in r.sequences)
        ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in r.sequences])
        logits = model(input_ids=ids).logits
        targets = torch.roll(ids, -1, dims=1)
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(ids.shape)
        predictions = logits.argmax(-1)
        spans = list(zip(r.starts, r.ends, strict=True))
        means = [losses[i, s - 1 : e - 1].mean().item() for i, (s, e) in enumerate(spans)]
        greedy = [torch.equal(predictions[i, s - 1 : e - 1], ids[i, s:e]) for i, (s, e) in enumerate(spans)]
        verdicts.append(verdict(r, means, greedy).correct)
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Defaults: the CPU tier's model (d4, head dim 64, context 512, vocab 8192), the project's tiny model.
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--items", type=int, default=12, help="items per task in the synthetic bundle")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()

    tokenizer = train_tokenizer(embedded_corpus(max_chars=2_000_000), vocab_size=args.vocab_size, show_progress=False)
    torch.manual_seed(0)
    model = randomize(build_model(tokenizer, depth=args.depth, generation="2026", head_dim=args.head_dim,
                                  max_position_embeddings=512, window_pattern="L"), seed=0).eval()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = write_bundle(Path(tmp), items_per_task=args.items)
        requests = []
        for task in load_core_tasks(bundle):
            data, num_eval = load_task_data(bundle, task)
            requests += build_requests(task, data, tokenizer, range(num_eval))
    pad = tokenizer.bos_token_id
    ours_s, base_s = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        base = one_at_a_time(model, requests, pad)
        base_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        ours = [r.correct for r in score_requests(model, requests, args.batch, pad)]
        ours_s.append(time.perf_counter() - start)
        agree = sum(a == b for a, b in zip(ours, base, strict=True)) / len(requests)
    result = {
        "examples": len(requests),
        "batch": args.batch,
        "depth": args.depth,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "baseline_examples_per_s": len(requests) / statistics.median(base_s),
        "batched_examples_per_s": len(requests) / statistics.median(ours_s),
        "speedup": statistics.median(base_s) / statistics.median(ours_s),
        "verdict_agreement": agree,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
