"""Pretraining tokens/s: `nanochat-hf pretrain` against nanochat HEAD's own `scripts.base_train`, side by side.

Both programs train the same model on the same data with the same tokenizer, one after the other on this machine:
nanochat's GPT (compiled model, compiled fused optimizer, fp32 on CPU) and ours (NanoChatForCausalLM on the
transformers Trainer with MuonAdamW, with the CPU tier's speed settings from recipes/cpu/pretrain.yaml: the model
compiled, tokenizing in-process), at the CPU tier's shape by default: depth 4, head_dim 64, window pattern L,
T=512, vocab 4096, 8 x 512 = 4096 tokens per optimizer step, --steps optimizer steps, no evaluation, no sampling,
no checkpoint before the end. Target: ours / nanochat >= 1.0.

Shared inputs, built once in a temporary NANOCHAT_BASE_DIR:
  - data: the project's embedded corpus (`nanochat_hf.data.embedded`) as --shards parquet files in nanochat's
    layout (`base_data_climbmix/shard_NNNNN.parquet`, a `text` column); both sides use the last shard as
    validation and read the others, and both pack rows BOS-aligned by best fit;
  - tokenizer: ours, trained on the train shards (`train_tokenizer`, vocab --vocab-size), written for nanochat as
    `tokenizer/tokenizer.pkl` + `token_bytes.pt` by our converter (`nanochat_hf.hub.tiktoken_format.hf_to_tiktoken`, the code
    behind `nanochat-hf convert to-nanochat`). nanochat's own tokenizer code then encodes sample texts, and the ids
    must equal ours.
The first nanochat run's start-up report (vocab size, parameter counts per group, FLOPs per token) must equal what
our model reports at the same settings (`--generation 2026`: value embeddings, resid/x0 lambdas, smear, backout).

Timing: each per-step log line (nanochat's `step NNNNN/...`, ours the Trainer's `{'loss': ...}` with
`--log_every 1`) is time-stamped as it arrives here (PYTHONUNBUFFERED), so both sides are measured by the same
clock from the end of one optimizer step to the end of the next, data loading and every per-step overhead included.
The first --skip steps of every run (start-up, torch.compile) are left out. Each program's own number (nanochat's
`tok/sec`, from its `dt`, which leaves out its logging; ours `tokens_per_s`) is reported beside it. Rounds alternate
the programs (nanochat, ours[, ours plain, variants], nanochat, ...); medians over rounds are compared.

Other work on the machine skews such numbers badly (two cores: a busy neighbour stalls every parallel region), so
each run also records how many cores OTHER processes kept busy meanwhile (all CPU time used on the machine, from
/proc/stat, minus the run's own), beside the load average; --max-busy waits before each run until the machine is
that quiet.

    NANOCHAT_CHECKOUT=/path/to/nanochat NANOCHAT_PYTHON=/path/to/nanochat-venv/bin/python \\
        python benchmarks/vs_nanochat.py [--rounds 3] [--steps 30] [--skip 5] [--max-busy 0.3] [--json out.json]
    python benchmarks/vs_nanochat.py --ours-extra "--log_every 1"   # appended to our command line
    python benchmarks/vs_nanochat.py --plain      # also ours eager with 2 tokenizing workers (the defaults)
    python benchmarks/vs_nanochat.py --variant "--torch_compile false"   # more contenders: ours + these flags
    python benchmarks/vs_nanochat.py --keep /tmp/vs   # keep the data, tokenizers and every run's log

Without NANOCHAT_CHECKOUT the benchmark says what to set and exits 0 without measuring. nanochat's venv needs
torch (the same version as ours, for a fair comparison), filelock, numpy, psutil, pyarrow, rustbpe, tiktoken,
wandb and kernels.
"""

import argparse
import json
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from train_step import load_average, machine  # the sibling benchmark's machine description

from nanochat_hf.data.embedded import embedded_corpus, embedded_corpus_info
from nanochat_hf.hub.tiktoken_format import hf_to_tiktoken, nanochat_token_bytes, write_tiktoken_pickle
from nanochat_hf.tokenizer.bpe import encode, load_tokenizer, train_tokenizer
from nanochat_hf.training import pretrain

TARGET = 1.0
# nanochat: "step 00012/00030 (40.00%) | loss: ... | dt: 1234.56ms | tok/sec: 3,317 | ..."
NANOCHAT_STEP = re.compile(r"^step (\d+)/(\d+) .*\| dt: ([\d.]+)ms \| tok/sec: ([\d,]+)")
# ours: the Trainer's log dict, one per optimizer step with --log_every 1
OURS_STEP = re.compile(r"\{'loss': |, 'loss': ")
# what the CPU tier's recipe sets for speed, and ours therefore runs with
SPEED_SETTINGS = ("torch_compile", "num_workers")
OURS_TOKENS_PER_S = re.compile(r"'tokens_per_s': '?([\d.]+)")
# nanochat's start-up report
NANOCHAT_VOCAB = re.compile(r"^Vocab size: ([\d,]+)")
NANOCHAT_FLOPS = re.compile(r"^Estimated FLOPs per token: ([\d.e+-]+)")
NANOCHAT_COUNT = re.compile(r"^(wte|value_embeds|lm_head|transformer_matrices|scalars|total)\s*: ([\d,]+)")
SAMPLES = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "    def f(x):\n        return x ** 2  # 12345 + 67890 = 80235\n",
    "Ünïcödé, 日本語のテキスト, emoji 🙂 and <|bos|> written as plain text.",
]


# ---------------------------------------------------------------------------------------------------------------
# shared inputs


def write_shards(data_dir: Path, shards: int, rows_per_group: int) -> list[list[str]]:
    """The embedded corpus dealt round-robin into `shards` parquet files named as nanochat names them."""
    docs = list(embedded_corpus())
    data_dir.mkdir(parents=True)
    parts = [docs[i::shards] for i in range(shards)]
    for i, part in enumerate(parts):
        table = pa.table({"text": pa.array(part, type=pa.string())})
        pq.write_table(table, data_dir / f"shard_{i:05d}.parquet", row_group_size=rows_per_group)
    return parts


def build_tokenizer(train_docs: list[str], vocab_size: int, ours_dir: Path, nanochat_dir: Path):
    """Ours trained on the train shards, then the same vocabulary as nanochat's tokenizer.pkl + token_bytes.pt."""
    tokenizer = train_tokenizer(train_docs, vocab_size=vocab_size, show_progress=False)
    tokenizer.save_pretrained(ours_dir)
    tokenizer = load_tokenizer(str(ours_dir))
    state = hf_to_tiktoken(tokenizer, ours_dir)
    nanochat_dir.mkdir(parents=True)
    write_tiktoken_pickle(state, nanochat_dir / "tokenizer.pkl")
    torch.save(nanochat_token_bytes(state), nanochat_dir / "token_bytes.pt")
    return tokenizer


NANOCHAT_ENCODE = """
import json, sys
from nanochat.tokenizer import get_tokenizer
texts = json.load(sys.stdin)
tok = get_tokenizer()
print(json.dumps({"vocab_size": tok.get_vocab_size(), "bos": tok.get_bos_token_id(),
                  "ids": [tok.encode(t) for t in texts]}))
"""


def check_same_tokenizer(tokenizer, texts: list[str], python: str, checkout: Path, env: dict) -> dict:
    """nanochat's tokenizer code on its tokenizer.pkl must give our ids for every text."""
    proc = subprocess.run([python, "-c", NANOCHAT_ENCODE], input=json.dumps(texts), capture_output=True, text=True,
                          cwd=checkout, env=env, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"nanochat's tokenizer failed to load:\n{proc.stderr[-3000:]}")
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = [encode(tokenizer, t) for t in texts]
    mismatched = [i for i, (a, b) in enumerate(zip(ours, theirs["ids"], strict=True)) if a != b]
    result = {
        "texts": len(texts),
        "tokens": sum(map(len, ours)),
        "ours_vocab_size": len(tokenizer),
        "nanochat_vocab_size": theirs["vocab_size"],
        "ours_bos": tokenizer.bos_token_id,
        "nanochat_bos": theirs["bos"],
        "mismatched_texts": mismatched,
    }
    result["same"] = (not mismatched and result["ours_vocab_size"] == result["nanochat_vocab_size"]
                      and result["ours_bos"] == result["nanochat_bos"])
    return result


# ---------------------------------------------------------------------------------------------------------------
# the contenders


@dataclass
class Contender:
    name: str
    cmd: list[str]
    cwd: Path
    env: dict
    step_line: re.Pattern
    reported: str  # how the program's own tokens/s is read from a step line: "nanochat" or "ours"
    runs: list[dict] = field(default_factory=list)


def nanochat_command(args: argparse.Namespace, python: str) -> list[str]:
    return [
        python, "-m", "scripts.base_train", f"--depth={args.depth}", f"--head-dim={args.head_dim}",
        f"--window-pattern={args.window_pattern}", f"--max-seq-len={args.seq}",
        f"--device-batch-size={args.device_batch}", f"--total-batch-size={args.total_batch}",
        f"--num-iterations={args.steps}", "--eval-every=-1", "--core-metric-every=-1", "--sample-every=-1",
        "--save-every=-1", "--run=dummy", "--device-type=cpu",
    ]


def ours_argv(args: argparse.Namespace, data_dir: Path, tokenizer_dir: Path, out: Path) -> list[str]:
    return [
        "--depth", str(args.depth), "--head_dim", str(args.head_dim), "--window_pattern", args.window_pattern,
        "--max_seq_len", str(args.seq), "--device_batch_size", str(args.device_batch),
        "--total_batch_size", str(args.total_batch), "--num_iterations", str(args.steps), "--eval_every", "-1",
        "--save_every", "-1", "--log_every", "1", "--generation", "2026", "--dataset", str(data_dir),
        "--tokenizer", str(tokenizer_dir), "--output_dir", str(out),
        *shlex.split(args.ours_extra),
    ]


def cpu_tier_speed_settings() -> list[str]:
    """The CPU tier's speed settings (recipes/cpu/pretrain.yaml: compile, in-process tokenizing), as flags: ours runs
    the way `nanochat-hf speedrun --tier cpu` runs it, as nanochat runs compiled."""
    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes/cpu/pretrain.yaml").read_text())
    return [arg for key in SPEED_SETTINGS for arg in (f"--{key}", str(recipe[key]).lower())]


def busy_cpu_seconds() -> float | None:
    """CPU seconds every process on the machine has used since boot (/proc/stat), None where there is none."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_quiet(max_busy: float, max_wait: float, window: float = 3.0) -> float | None:
    """Wait until the machine's other processes use less than `max_busy` cores over `window` seconds (at most
    `max_wait` seconds); returns the last reading."""
    deadline = time.monotonic() + max_wait
    while True:
        before = busy_cpu_seconds()
        if before is None:
            return None
        time.sleep(window)
        busy = (busy_cpu_seconds() - before) / window
        if busy < max_busy or time.monotonic() > deadline:
            return round(busy, 2)
        print(f"[quiet] other processes use {busy:.2f} cores (waiting for < {max_busy})", flush=True)


def run_once(contender: Contender, log_path: Path, timeout: float) -> dict:
    """One run; every step line is time-stamped on arrival. Output goes to `log_path`. Also measures how many
    cores the machine's OTHER processes kept busy meanwhile (all CPU time used minus this run's own)."""
    start = time.perf_counter()
    times: list[float] = []
    reported: list[float] = []
    load = load_average()
    busy0, own0 = busy_cpu_seconds(), children_cpu_seconds()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(contender.cmd, cwd=contender.cwd, env=contender.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        for line in proc.stdout:  # universal newlines: progress bars' \r updates arrive as lines too
            now = time.perf_counter()
            log.write(line)
            if not contender.step_line.search(line):
                continue
            times.append(now)
            if contender.reported == "nanochat":
                m = NANOCHAT_STEP.search(line)
                reported.append(float(m.group(3)) / 1000)  # seconds of this step, by nanochat's own clock
            else:
                m = OURS_TOKENS_PER_S.search(line)
                reported.append(float(m.group(1)) if m else float("nan"))
        rc = proc.wait()
        watchdog.cancel()
    end = time.perf_counter()
    others = None
    if busy0 is not None:
        others = round((busy_cpu_seconds() - busy0 - (children_cpu_seconds() - own0)) / (end - start), 2)
    return {"rc": rc, "start": start, "end": end, "times": times, "reported": reported, "load_average": load,
            "other_cores_busy": others, "log": str(log_path)}


def summarize_run(run: dict, skip: int, tokens_per_step: int, reported: str) -> dict:
    """tokens/s over steps skip+1..N by our clock, and by the program's own."""
    times = run["times"]
    n = len(times)
    tps = (n - skip) * tokens_per_step / (times[-1] - times[skip - 1])
    if reported == "nanochat":
        own = tokens_per_step * (n - skip) / sum(run["reported"][skip:])
    else:
        own = statistics.median(run["reported"][skip:])
    step_s = [b - a for a, b in zip(times[skip - 1 : -1], times[skip:], strict=True)]
    return {
        "tokens_per_s": round(tps, 1),
        "own_tokens_per_s": round(own, 1),
        "median_step_s": round(statistics.median(step_s), 4),
        "startup_s": round(times[0] - run["start"], 1),
        "wall_s": round(run["end"] - run["start"], 1),
        "load_average": run["load_average"],
        "other_cores_busy": run["other_cores_busy"],
    }


# ---------------------------------------------------------------------------------------------------------------
# the architecture check


def parse_nanochat_report(log_text: str) -> dict:
    report: dict = {"counts": {}}
    for line in log_text.splitlines():
        if m := NANOCHAT_VOCAB.search(line):
            report["vocab_size"] = int(m.group(1).replace(",", ""))
        elif m := NANOCHAT_FLOPS.search(line):
            report["flops_per_token"] = float(m.group(1))
        elif m := NANOCHAT_COUNT.search(line):
            report["counts"][m.group(1)] = int(m.group(2).replace(",", ""))
    return report


def our_report(argv: list[str]) -> dict:
    """What our model reports at the benchmark's settings (the same code path `nanochat-hf pretrain` builds it by)."""
    run = pretrain.parse_args(argv)
    tokenizer = load_tokenizer(run.tokenizer)
    model = pretrain.build_pretrain_model(run, tokenizer)
    c = model.config
    return {
        "vocab_size": c.vocab_size,
        "padded_vocab_size": c.padded_vocab_size,
        "flops_per_token": model.estimate_flops_per_token(),
        "counts": model.num_scaling_params(),
        "features": {"generation": c.generation, "value_embeds": c.value_embeds,
                     "value_embed_layers": list(c.value_embed_layers), "residual_lambdas": c.residual_lambdas,
                     "smear": c.smear, "backout": c.backout, "layer_windows": list(c.layer_windows),
                     "hidden_size": c.hidden_size, "heads": c.num_attention_heads, "head_dim": c.head_dim},
    }


def compare_models(ours: dict, theirs: dict) -> dict:
    flops_ok = "flops_per_token" in theirs and abs(ours["flops_per_token"] - theirs["flops_per_token"]) <= (
        1e-6 * theirs["flops_per_token"])
    return {
        "ours": ours,
        "nanochat": theirs,
        "same_vocab": ours["vocab_size"] == theirs.get("vocab_size"),
        "same_flops_per_token": flops_ok,
        "same_parameter_counts": ours["counts"] == theirs["counts"],
    }


# ---------------------------------------------------------------------------------------------------------------


def skip_without_nanochat() -> None:
    print("vs_nanochat: skipped, NANOCHAT_CHECKOUT is not set.\n"
          "  Set NANOCHAT_CHECKOUT to a checkout of https://github.com/karpathy/nanochat (its root, with scripts/ and\n"
          "  nanochat/) and NANOCHAT_PYTHON to a python that can run it (default: python3), e.g.\n"
          "    git clone https://github.com/karpathy/nanochat /work/nanochat\n"
          "    python3 -m venv /work/nanochat-venv && /work/nanochat-venv/bin/pip install torch filelock numpy psutil "
          "pyarrow rustbpe tiktoken wandb kernels\n"
          "    NANOCHAT_CHECKOUT=/work/nanochat NANOCHAT_PYTHON=/work/nanochat-venv/bin/python "
          "python benchmarks/vs_nanochat.py")
    sys.exit(0)


def git_head(checkout: Path) -> str | None:
    proc = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--window-pattern", default="L")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--device-batch", type=int, default=8)
    parser.add_argument("--total-batch", type=int, default=4096, help="tokens per optimizer step")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--shards", type=int, default=4, help="parquet shards; the last one is validation")
    parser.add_argument("--rows-per-group", type=int, default=64, help="documents per parquet row group")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--skip", type=int, default=5, help="steps of every run left out of the clock")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ours-extra", default="", help="appended to our command line, e.g. '--num_workers 0'")
    parser.add_argument("--plain", action="store_true",
                        help="also run ours without the CPU tier's speed settings (eager, 2 tokenizing workers)")
    parser.add_argument("--variant", action="append", default=[], metavar="ARGS",
                        help="also run ours with ARGS appended (after --ours-extra); repeatable, e.g. "
                        "--variant '--num_workers 0'")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds before a run is killed")
    parser.add_argument("--max-busy", type=float,
                        help="before each run, wait until other processes keep fewer than this many cores busy")
    parser.add_argument("--max-wait", type=float, default=600, help="longest wait for --max-busy, per run (s)")
    parser.add_argument("--keep", help="build the inputs and keep every log in this folder (default: a temp dir)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    if not 1 <= args.skip < args.steps - 1:
        parser.error("--skip must be at least 1 and below --steps - 1")

    checkout_env = os.environ.get("NANOCHAT_CHECKOUT")
    if not checkout_env:
        skip_without_nanochat()
    checkout = Path(checkout_env).expanduser().resolve()
    if not (checkout / "scripts" / "base_train.py").is_file():
        raise SystemExit(f"NANOCHAT_CHECKOUT={checkout}: no scripts/base_train.py there; point it at nanochat's root")
    python = os.environ.get("NANOCHAT_PYTHON", "python3")
    if shutil.which(python) is None:
        raise SystemExit(f"NANOCHAT_PYTHON={python}: not found")

    tmp = None
    if args.keep:
        work = Path(args.keep).resolve()
        if work.exists() and any(work.iterdir()):
            raise SystemExit(f"--keep {work}: exists and is not empty; choose a new folder")
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="vs_nanochat_")
        work = Path(tmp.name)
    try:
        result = bench(args, checkout, python, work)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def bench(args: argparse.Namespace, checkout: Path, python: str, work: Path) -> dict:
    result: dict = {"benchmark": "vs_nanochat", "machine": machine(), "load_average_start": load_average(),
                    "nanochat": {"checkout": str(checkout), "commit": git_head(checkout), "python": python}}
    base = work / "nanochat_base"
    data_dir = base / "base_data_climbmix"
    ours_tok = work / "tokenizer"
    t0 = time.perf_counter()
    parts = write_shards(data_dir, args.shards, args.rows_per_group)
    train_docs = [d for part in parts[:-1] for d in part]
    tokenizer = build_tokenizer(train_docs, args.vocab_size, ours_tok, base / "tokenizer")
    info = embedded_corpus_info()
    print(f"[inputs] embedded corpus ({info['num_docs']} documents, {info['num_chars']:,} chars) in {args.shards} "
          f"parquet shards, tokenizer (vocab {len(tokenizer)}) built in {time.perf_counter() - t0:.1f}s", flush=True)

    base_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    nanochat_env = {**base_env, "NANOCHAT_BASE_DIR": str(base), "WANDB_MODE": "disabled"}
    texts = SAMPLES + [d[:3000] for d in train_docs[:: max(1, len(train_docs) // 20)]] + [parts[-1][0][:3000]]
    same_tok = check_same_tokenizer(tokenizer, texts, python, checkout, nanochat_env)
    print(f"[inputs] tokenizer: nanochat's code on tokenizer.pkl and ours agree on {same_tok['texts']} texts "
          f"({same_tok['tokens']:,} tokens): {'yes' if same_tok['same'] else 'NO'}; vocab ours "
          f"{same_tok['ours_vocab_size']} / nanochat {same_tok['nanochat_vocab_size']}, bos {same_tok['ours_bos']} / "
          f"{same_tok['nanochat_bos']}", flush=True)
    if not same_tok["same"]:
        raise SystemExit(f"the two tokenizers differ: {same_tok}")

    logs = work / "logs"
    logs.mkdir()
    tokens_per_step = args.total_batch
    contenders = [Contender("nanochat", nanochat_command(args, python), checkout, nanochat_env, NANOCHAT_STEP,
                            "nanochat")]
    ours_prefix = [sys.executable, "-m", "nanochat_hf", "pretrain"]
    repo = Path(__file__).resolve().parents[1]
    argv = [*ours_argv(args, data_dir, ours_tok, work / "ours_out"), *cpu_tier_speed_settings()]
    contenders.append(Contender("ours", [*ours_prefix, *argv], repo, base_env, OURS_STEP, "ours"))
    if args.plain:
        argv = ours_argv(args, data_dir, ours_tok, work / "ours_plain_out")
        contenders.append(Contender("ours_plain", [*ours_prefix, *argv], repo, base_env, OURS_STEP, "ours"))
    for i, extra in enumerate(args.variant):
        argv = [*ours_argv(args, data_dir, ours_tok, work / f"ours_variant{i}_out"), *shlex.split(extra)]
        contenders.append(Contender(f"ours[{extra}]", [*ours_prefix, *argv], repo, base_env, OURS_STEP, "ours"))
    for c in contenders:
        print(f"[{c.name}] {shlex.join(c.cmd)}", flush=True)

    model_check = None
    for r in range(args.rounds):
        for c in contenders:
            if c.name != "nanochat":  # each run writes its own output folder
                out = Path(c.cmd[c.cmd.index("--output_dir") + 1])
                shutil.rmtree(out, ignore_errors=True)
            else:
                shutil.rmtree(base / "base_checkpoints", ignore_errors=True)
            if args.max_busy is not None:
                wait_for_quiet(args.max_busy, args.max_wait)
            run = run_once(c, logs / f"{c.name}_{r}.log", args.timeout)
            if run["rc"] != 0 or len(run["times"]) != args.steps:
                tail = Path(run["log"]).read_text()[-4000:]
                raise SystemExit(f"{c.name} round {r + 1}: exit code {run['rc']}, {len(run['times'])} of {args.steps} "
                                 f"step lines; the end of its output:\n{tail}")
            summary = summarize_run(run, args.skip, tokens_per_step, c.reported)
            c.runs.append(summary)
            print(f"[round {r + 1}/{args.rounds}] {c.name:13s} {summary['tokens_per_s']:9.1f} tokens/s "
                  f"(its own clock {summary['own_tokens_per_s']:9.1f}; median step {summary['median_step_s']:.3f}s; "
                  f"start-up + step 1 {summary['startup_s']:.1f}s; load average {summary['load_average']}, other processes "
                  f"kept {summary['other_cores_busy']} cores busy)", flush=True)
            if c.name == "nanochat" and model_check is None:
                theirs = parse_nanochat_report(Path(run["log"]).read_text())
                model_check = compare_models(our_report(ours_argv(args, data_dir, ours_tok, work / "unused")), theirs)
                ok = all(model_check[k] for k in ("same_vocab", "same_flops_per_token", "same_parameter_counts"))
                print(f"[model] vocab ours {model_check['ours']['vocab_size']} / nanochat {theirs.get('vocab_size')}; "
                      f"FLOPs/token ours {model_check['ours']['flops_per_token']:.6e} / nanochat "
                      f"{theirs.get('flops_per_token', float('nan')):.6e}; parameter groups "
                      f"{'equal' if model_check['same_parameter_counts'] else 'DIFFER'} "
                      f"({model_check['ours']['counts']} vs {theirs['counts']}): {'same model' if ok else 'MISMATCH'}",
                      flush=True)

    medians = {c.name: statistics.median(s["tokens_per_s"] for s in c.runs) for c in contenders}
    own = {c.name: statistics.median(s["own_tokens_per_s"] for s in c.runs) for c in contenders}
    result.update({
        "config": f"depth {args.depth}, head_dim {args.head_dim}, window {args.window_pattern}, seq {args.seq}, "
                  f"vocab {args.vocab_size}, device batch {args.device_batch}, {args.total_batch} tokens/step, "
                  f"{args.steps} steps, steps {args.skip + 1}..{args.steps} timed, {args.rounds} rounds",
        "commands": {c.name: shlex.join(c.cmd) for c in contenders},
        "ours_extra": args.ours_extra,
        "corpus": info,
        "tokenizer_check": same_tok,
        "model_check": model_check,
        "tokens_per_s": {k: round(v, 1) for k, v in medians.items()},
        "own_clock_tokens_per_s": {k: round(v, 1) for k, v in own.items()},
        "ratio": round(medians["ours"] / medians["nanochat"], 3),
        "target": f">= {TARGET}",
        "met": medians["ours"] / medians["nanochat"] >= TARGET,
        "rounds": {c.name: c.runs for c in contenders},
        "load_average_end": load_average(),
    })
    result["ratios"] = {k: round(v / medians["nanochat"], 3) for k, v in medians.items() if k != "nanochat"}

    m = result["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cpu_count']} cores, {m['torch_threads']} torch threads, {m['platform']}, "
          f"torch {m['torch']}, transformers {m['transformers']}; load average {result['load_average_start']} -> "
          f"{result['load_average_end']}")
    print(f"nanochat {result['nanochat']['commit']} ({checkout}); {result['config']}")
    print("median tokens/s (our clock: step line to step line; in brackets each program's own)")
    for name in medians:
        busy = [s["other_cores_busy"] for s in result["rounds"][name]]
        print(f"   {name:13s} {medians[name]:9.1f}   ({own[name]:9.1f})   rounds "
              f"{[s['tokens_per_s'] for s in result['rounds'][name]]}, other processes kept {busy} cores busy")
    print(f"   ratio ours/nanochat = {result['ratio']:.3f}  (target {result['target']}: "
          f"{'met' if result['met'] else 'MISSED'})")
    for name, ratio in result["ratios"].items():
        if name != "ours":
            print(f"   ratio {name}/nanochat = {ratio:.3f}")
    return result


if __name__ == "__main__":
    main()
