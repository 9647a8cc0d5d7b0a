"""Every shell line of README.md works as written.

Each line of the README's ```bash blocks (a trailing `\\` joins the next line; a trailing `  # comment` is dropped)
must be listed in LINES with how this test runs it, so a command added to the README without a way to check it
fails `test_every_readme_line_is_listed`. (The README's one ```python block loads a model from the Hub; it is not
a shell line.)

The lines run in a stand-in checkout: a temporary folder whose code, recipes and configs are links into this
repository and whose `runs/` holds what the line reads (a tiny model where the README has a trained one, the task
fixtures where it has the Hub's datasets), with the virtualenv first on PATH, the Hub offline (HF_HUB_OFFLINE=1,
an empty cache) and a temporary HOME. Long lines run with a few steps (`append`); lines that need a GPU node, the
network or a person are listed with the reason they are not run here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# what a checkout holds that the lines read; `runs/`, `tok/`, `d32-*` are written by the lines themselves
LINKED = (".venv", "Makefile", "pyproject.toml", "nanochat_hf", "recipes", "accelerate_configs", "evals", "spaces",
          "tests", "benchmarks")


@dataclass(frozen=True)
class Run:
    """How a line runs here: in the stand-in checkout with `needs` made first, `append` added to its arguments,
    `stdin` as its input; it must exit with `status`, print `expect` and leave `creates` behind."""

    needs: tuple[str, ...] = ()
    append: str = ""
    stdin: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    expect: str = ""
    status: int = 0
    creates: str = ""
    slow: bool = False
    server: bool = False  # runs until stopped: it must answer HTTP on $GRADIO_SERVER_PORT, then it is stopped
    program: tuple[str, str] | None = None  # (as written, as run): the program is replaced, for the reason given
    make: str = ""  # a make target: the command `make -n` must print, which then runs (make's install step aside)
    without_gpu: bool = False  # a GPU node's line: run only where no GPU is visible, where it must refuse at once


@dataclass(frozen=True)
class Skip:
    reason: str


GPU_NODE = "trains for hours on a node of 8 GPUs with the Hub's data"
SMOKE = "--max-steps 2 --eval-max-per-task 4 --eval-max-tokens 16"
NO_GPU = "none is visible; use --tier cpu"

LINES: dict[str, Run | Skip] = {
    # Two commands
    "make speedrun-cpu": Run(make=".venv/bin/nanochat-hf speedrun --tier cpu --run-dir runs/cpu", append=SMOKE,
                             creates="runs/cpu/report.md", slow=True),
    "make test": Skip("the test suite this test belongs to"),
    ".venv/bin/nanochat-hf chat --model runs/cpu/sft": Run(needs=("runs/cpu/sft",), append="--max-tokens 8",
                                                           stdin="What is 2+3?\n", expect="Assistant:"),
    ".venv/bin/nanochat-hf serve --model runs/cpu/sft": Run(needs=("runs/cpu/sft",), server=True, slow=True),
    # The GPU speedruns
    'make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"':
        Skip("installs a CUDA build of torch from the network"),
    "hf auth login": Skip("asks a person for a Hub token"),
    ".venv/bin/nanochat-hf speedrun --tier d24 --run-dir runs/d24": Run(without_gpu=True, status=2, expect=NO_GPU),
    ".venv/bin/nanochat-hf speedrun --tier d20 --run-dir runs/d20 --pipeline 2025":
        Run(without_gpu=True, status=2, expect=NO_GPU, slow=True),  # as d24's, with the other pipeline
    # The stages one by one
    "nanochat-hf tokenizer train --data karpathy/climbmix-400b-shuffle --vocab-size 32768 --out tok/":
        Skip("streams 2B characters of ClimbMix from the Hub"),
    "accelerate launch --config_file accelerate_configs/ddp_8gpu.yaml -m nanochat_hf.training.pretrain --config "
    "recipes/d20/pretrain.yaml": Skip(GPU_NODE),
    "accelerate launch --config_file accelerate_configs/ddp_8gpu.yaml -m nanochat_hf.training.midtrain --config "
    "recipes/d20/midtrain.yaml": Skip(GPU_NODE),
    "accelerate launch --config_file accelerate_configs/ddp_8gpu.yaml -m nanochat_hf.training.sft --config "
    "recipes/d20/sft.yaml": Skip(GPU_NODE),
    "accelerate launch --config_file accelerate_configs/ddp_8gpu.yaml -m nanochat_hf.training.sft --config "
    "recipes/d20/sft-2026.yaml": Skip(GPU_NODE),
    "accelerate launch --config_file accelerate_configs/ddp_8gpu.yaml -m nanochat_hf.training.rl --config "
    "recipes/d20/rl.yaml": Skip(GPU_NODE),
    "nanochat-hf eval --model runs/d20/sft --stage sft": Run(
        needs=("runs/d20/sft", "hub-data"), append="--data-dir hub-data --max-per-task 2 --max-tokens 8",
        expect="ChatCORE: ", creates="runs/d20/sft/eval_sft.json", slow=True),
    "nanochat-hf report --run-dir runs/d20": Run(needs=("runs/d20/base", "runs/d20/sft"),
                                                  creates="runs/d20/report.md", slow=True),
    "accelerate launch --config_file accelerate_configs/cpu_2proc.yaml -m nanochat_hf.training.pretrain --config "
    "recipes/cpu/pretrain.yaml --device_batch_size 4 --output_dir runs/cpu/train/pretrain-2proc": Run(
        needs=("runs/cpu/tokenizer", "runs/cpu/corpus"),
        append="--num_iterations 2 --eval_every 2 --save_every 2 --eval_tokens 4096 --torch_compile false",
        env=(("OMP_NUM_THREADS", "1"),), creates="runs/cpu/train/pretrain-2proc/final/model.safetensors", slow=True),
    # plain lighteval downloads tinyBenchmarks.pkl when it starts (the README says so); offline, the wrapper it names
    'lighteval accelerate "model_name=runs/d20/base,trust_remote_code=True,dtype=bfloat16,max_length=4096,'
    'override_chat_template=False" "core|0" --custom-tasks evals/core.py --output-dir runs/d20/lighteval': Run(
        needs=("runs/d20/base", "bundle"), program=("lighteval", "python -m nanochat_hf.evaluation.lighteval_cli"),
        env=(("NANOCHAT_CORE_MAX_PER_TASK", "2"),), creates="runs/d20/lighteval/results", slow=True),
    # Chat, serve, the Space, push
    "nanochat-hf chat --model runs/d20/sft": Run(needs=("runs/d20/sft",), append="--max-tokens 8",
                                                 stdin="Hello\n/clear\n", expect="Assistant:", slow=True),
    'nanochat-hf chat --model runs/d20/sft -p "What is 17*23?"': Run(needs=("runs/d20/sft",),
                                                                     append="--max-tokens 8"),
    "nanochat-hf serve --model runs/d20/sft": Run(needs=("runs/d20/sft",), server=True, slow=True),
    "nanochat-hf push --model runs/d20/sft --repo-id you/nanochat-d20 --space you/nanochat-d20-chat":
        Skip("uploads to the Hub with a token (tests/test_hub.py runs push --dry-run)"),
    # Convert
    "nanochat-hf convert from-nanochat --checkpoint-dir ~/.cache/nanochat/chatsft_checkpoints/d32 --out d32-hf/":
        Run(needs=("nanochat-d32",), creates="d32-hf/model.safetensors", slow=True),
    "nanochat-hf convert to-nanochat --model d32-hf/ --out d32-nanochat/":
        Run(needs=("d32-hf",), creates="d32-nanochat/tokenizer.pkl", slow=True),
    "nanochat-hf convert to-transformers --model d32-hf/ --out d32-builtin/":
        Run(needs=("d32-hf",), creates="d32-builtin/config.json", slow=True),
    # Development
    "make test-slow": Skip("the slow tests, this file's among them (about an hour on 2 cores)"),
    "make quality": Run(make=".venv/bin/ruff check nanochat_hf tests benchmarks"),
    "make bench": Skip("minutes of benchmarks; their results are recorded in docs/benchmarks.md"),
}


def readme_lines(text: str) -> list[str]:
    """The shell lines of the ```bash blocks of `text`, continuations joined and trailing comments dropped."""
    lines, fence, pending = [], None, ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("```"):
            fence = stripped[3:] if fence is None else None
            continue
        if fence != "bash" or not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1]
            continue
        lines.append(re.sub(r"\s+#\s.*$", "", pending + stripped))
        pending = ""
    return lines


def test_every_readme_line_is_listed():
    lines = readme_lines((ROOT / "README.md").read_text())
    assert len(lines) >= 20  # the extraction found the blocks
    unlisted = [line for line in lines if line not in LINES]
    assert not unlisted, f"README lines without an entry in LINES (say how to run each, or why not): {unlisted}"
    stale = [line for line in LINES if line not in lines]
    assert not stale, f"LINES entries the README no longer has: {stale}"


def test_make_targets_run_what_the_table_says():
    for line, how in LINES.items():
        if isinstance(how, Run) and how.make:
            target = line.removeprefix("make ")
            # -o: the virtualenv counts as installed (it is the one running this test)
            # under `make test` (CI) this is a sub-make: keep the parent's flags and directory notes out of it
            env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
            out = subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.installed-dev", target],
                                 cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
            assert out.returncode == 0 and out.stdout.strip() == how.make, out.stdout + out.stderr


def test_the_cpu_2proc_line_divides_the_batch_over_its_processes(monkeypatch):
    """The recipe's 4,096-token batch over 2 processes of `--device_batch_size` rows of 512 tokens: the line as
    written divides it; the recipe's own 8 rows per process do not (what the README used to say)."""
    import yaml

    from nanochat_hf.training.pretrain import parse_args

    (line,) = [line for line in LINES if "cpu_2proc.yaml" in line]
    argv = shlex.split(line)
    config = yaml.safe_load((ROOT / argv[argv.index("--config_file") + 1]).read_text())
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WORLD_SIZE", str(config["num_processes"]))
    assert config["num_processes"] == 2
    stage_args = argv[argv.index("nanochat_hf.training.pretrain") + 1:]
    run = parse_args(stage_args)
    assert (run.total_batch_size, run.device_batch_size, run.max_seq_len) == (4096, 4, 512)
    without = stage_args[: stage_args.index("--device_batch_size")] + stage_args[stage_args.index("--output_dir"):]
    with pytest.raises(ValueError, match="not a multiple"):
        parse_args(without)


# ---------------------------------------------------------------------------------------------------------------
# Running the lines


def _stand_in(name: str, checkout: Path, home: Path, models: dict[str, Path]) -> None:
    """Make what a line reads: a model folder, the tokenizer and corpus of a CPU run, the Hub's eval sets, the
    CORE bundle (NANOCHAT_EVAL_BUNDLE), or a nanochat checkpoint in nanochat's cache."""
    target = checkout / name
    if name.startswith("runs/") and name.endswith(("/sft", "/base")):
        shutil.copytree(models["2026"], target)
    elif name == "d32-hf":
        shutil.copytree(models["2025"], target)
    elif name == "runs/cpu/tokenizer":
        target.mkdir(parents=True)
        for path in models["2026"].iterdir():
            if path.name.startswith("tokenizer") or path.suffix == ".jinja":
                shutil.copy(path, target)
    elif name == "runs/cpu/corpus":
        from nanochat_hf.data.embedded import write_corpus_shards

        write_corpus_shards(target, max_chars=400_000)
    elif name == "hub-data":
        from tests.task_fixtures import write_fixture

        for fixture, repo in (("arc", "allenai/ai2_arc"), ("mmlu", "cais/mmlu"), ("gsm8k", "openai/gsm8k"),
                              ("humaneval", "openai/openai_humaneval")):
            write_fixture(fixture, target / repo)
        shutil.move(write_fixture("words", target), target / "words_alpha.txt")
    elif name == "bundle":
        from tests.core_fixtures import write_bundle

        write_bundle(target, labels=["copa", "winograd", "lambada_openai"], items_per_task=6)
    elif name == "nanochat-d32":
        from nanochat_hf.hub.convert import to_nanochat

        folder = home / ".cache" / "nanochat" / "chatsft_checkpoints" / "d32"
        folder.parent.mkdir(parents=True)
        to_nanochat(models["2025"], folder)
    else:
        raise AssertionError(f"no stand-in named {name}")


@pytest.fixture(scope="module")
def models(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The stand-in models: the shared tiny 2026 checkpoint, and a 2025 one (what `to-transformers` converts)."""
    from transformers import AutoTokenizer

    from nanochat_hf.training.init_model import build_model, save_atomically

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    torch.manual_seed(0)
    model = build_model(tokenizer, depth=2, generation="2025", head_dim=32, max_position_embeddings=256)
    old = save_atomically(model, tokenizer, tmp_path_factory.mktemp("tiny2025") / "checkpoint")
    return {"2026": tiny_checkpoint, "2025": old}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(command: str, checkout: Path, env: dict) -> str:
    """Start a server line, wait until it answers HTTP, stop it; returns its output."""
    port = _free_port()
    log = checkout / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(["bash", "-c", command], cwd=checkout, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env={**env, "GRADIO_SERVER_PORT": str(port)},
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as answer:
                    assert answer.status == 200
                    return log.read_text()
            except OSError:
                time.sleep(1)
        raise AssertionError(f"the server never answered on port {port}:\n{log.read_text()[-3000:]}")
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the session this test started: bash and the server under it
        process.wait(30)


def _params():
    for line, how in LINES.items():
        if isinstance(how, Run):
            yield pytest.param(line, marks=[pytest.mark.slow] if how.slow else [], id=line[:60])


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("line", list(_params()))
def test_readme_line_runs(line, tmp_path, models):
    how = LINES[line]
    assert isinstance(how, Run)
    if how.without_gpu and torch.cuda.is_available():
        pytest.skip(f"{GPU_NODE}; on a machine without a GPU it must refuse at once")
    checkout, home = tmp_path / "checkout", tmp_path / "home"
    checkout.mkdir()
    home.mkdir()
    for name in LINKED:
        (checkout / name).symlink_to(ROOT / name)
    for name in how.needs:
        _stand_in(name, checkout, home, models)
    command = how.make or line
    if how.program is not None:
        written, run_as = how.program
        assert command.startswith(written + " ")
        command = run_as + command[len(written):]
    command = f"{command} {how.append}".strip()
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": str(home),
           "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "NANOCHAT_HF_CACHE": str(tmp_path / "cache"),
           "TOKENIZERS_PARALLELISM": "false", **dict(how.env)}
    env.pop("NANOCHAT_EVAL_BUNDLE", None)
    if "bundle" in how.needs:
        env["NANOCHAT_EVAL_BUNDLE"] = str(checkout / "bundle")
    if how.server:
        output = _serve(command, checkout, env)
    else:
        proc = subprocess.run(["bash", "-c", command], cwd=checkout, env=env, input=how.stdin or "",
                              capture_output=True, text=True, timeout=1500)
        output = proc.stdout + proc.stderr
        assert proc.returncode == how.status, f"$ {command}\n{output[-5000:]}"
    assert how.expect in output, f"$ {command}\n{output[-5000:]}"
    if how.creates:
        assert (checkout / how.creates).exists(), f"$ {command} wrote no {how.creates}\n{output[-5000:]}"
