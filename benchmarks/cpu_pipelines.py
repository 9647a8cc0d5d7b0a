"""The CPU tier's two pipelines side by side: nanochat's 2025 one (pretrain -> midtrain -> SFT) against HEAD's 2026
one (pretrain -> SFT from the base model, packed and warm-started), each a full `nanochat-hf speedrun --tier cpu`
into its own folder, one after the other in one run. Prints the wall time of every stage and the chat metrics the
CPU tier is judged on (the share of replies that end their turn, the share of arithmetic replies that call the
calculator, and each task's accuracy), with the 2026/2025 ratio of each.

    python benchmarks/cpu_pipelines.py [--out /tmp/pipelines] [--json result.json]

The rule the CPU tier's default follows (issue 16): it stays on 2025 unless 2026 does at least as well on every
chat-format metric within the same 15-minute budget.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from train_step import load_average, machine  # a sibling script

from nanochat_hf.speedrun import run_speedrun

FORMAT = ("ends_turn_rate", "calculator_rate")


def metrics(run_dir: Path) -> dict[str, float]:
    chat = json.loads((run_dir / "sft" / "eval_sft.json").read_text())["chat"]
    out = {key: chat["format"][key] for key in FORMAT}
    out.update({name: task["accuracy"] for name, task in chat["tasks"].items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="parent folder of the two run folders (default: a temporary one)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="pipelines-"))
    results = {}
    for pipeline in ("2025", "2026"):
        start = time.perf_counter()
        log = run_speedrun("cpu", root / pipeline, pipeline=pipeline)
        results[pipeline] = {
            "total_s": round(time.perf_counter() - start, 1),
            "stages_s": {name: stage.get("seconds") for name, stage in log["stages"].items()},
            "metrics": metrics(root / pipeline),
            "load_average": load_average(),
        }
    old, new = results["2025"], results["2026"]
    print(f"\nmachine: {machine()}")
    print(f"{'':28s} {'2025':>10s} {'2026':>10s} {'ratio':>8s}")
    print(f"{'total wall time (s)':28s} {old['total_s']:10.1f} {new['total_s']:10.1f} "
          f"{new['total_s'] / old['total_s']:8.3f}")
    for key in old["metrics"]:
        a, b = old["metrics"][key], new["metrics"].get(key)
        ratio = f"{b / a:8.3f}" if a and b is not None else f"{'-':>8s}"
        print(f"{key:28s} {a:10.4f} {b:10.4f} {ratio}")
    at_least_as_good = all(new["metrics"][k] >= old["metrics"][k] for k in FORMAT)
    print(f"2026 at least as good on every chat-format metric: {at_least_as_good}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
