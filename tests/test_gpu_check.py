"""benchmarks/gpu_check.py on CPU: its --smoke profile runs the code path of the GPU check with a tiny model.

The GPU check is run by sessions that hold a GPU for a few minutes, with no second try to spare, so its logic
(variant order, skips with reasons, the table, the JSON, the out-of-memory retry) is tested here.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def run(args: list[str], tmp_path: Path, code: str | None = None) -> tuple[str, dict]:
    out = tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}  # the result goes to --json only
    argv = [sys.executable, str(SCRIPT)] if code is None else [sys.executable, "-c", code]
    proc = subprocess.run([*argv, "--smoke", "--json", str(out), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def rows_by_name(result: dict) -> dict[str, dict]:
    return {row["name"]: row for row in result["variants"]}


def test_smoke_runs_the_table(tmp_path):
    stdout, result = run([], tmp_path)
    rows = rows_by_name(result)
    # every backend x compile x fp8 has a row, the baseline first
    assert len(rows) == 16
    assert result["variants"][0]["name"] == "sdpa/eager/fp32" == result["baseline"]
    for name in ("sdpa/eager/fp32", "sdpa/compile/fp32"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0
        assert len(row["losses"]) == 3 and all(math.isfinite(x) for x in row["losses"])
        assert row["mfu"] is None  # no peak FLOP/s for a CPU
        assert name in stdout
    # same weights, same batches: compiling does not change the loss
    assert abs(rows["sdpa/compile/fp32"]["loss_delta"]) < 1e-3
    # what cannot run on this machine is listed with the reason, not silently left out
    for name, row in rows.items():
        if row["status"] != "ok":
            assert row["status"] == "skipped" and row["reason"], row
            assert row["reason"] in stdout
        if name.startswith("sdpa/") and name.endswith("/fp8"):
            assert row["status"] == "skipped" and "fp8 unsupported" in row["reason"]
        if name.startswith("flash_attention_2/"):
            assert row["status"] == "skipped" and "flash_attn" in row["reason"]
    assert result["fp8_unsupported"]
    assert result["verdicts"]["mfu_met"] is None and result["verdicts"]["fp8_met"] is None
    # the decode benchmark: Engine against generate at batch 1 and 8
    decode = result["decode"]
    assert decode["status"] == "ok", decode
    assert [row["batch"] for row in decode["rows"]] == [1, 8]
    for row in decode["rows"]:
        assert row["same_tokens"]
        for side in ("engine", "generate"):
            assert math.isfinite(row[side]["decode_tokens_per_s"]) and row[side]["decode_tokens_per_s"] > 0
    assert "decode batch 8: Engine" in stdout
    assert stdout.count("sdpa/eager/fp32") >= 2  # printed as it finished and in the final table


# Runs the script's main() with train_variant failing like a full GPU whenever the micro-batch is above 2.
OOM_DRIVER = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)
real = check.train_variant
def tight(setup, variant, micro_batch):
    if variant.compiled and micro_batch > 2:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    return real(setup, variant, micro_batch)
check.train_variant = tight
check.main(sys.argv[1:])
"""


def test_out_of_memory_retries_with_gradient_accumulation(tmp_path):
    code = OOM_DRIVER.replace("SCRIPT", repr(str(SCRIPT)))
    stdout, result = run(["--backends", "sdpa", "--fp8", "off", "--no-decode"], tmp_path, code=code)
    rows = rows_by_name(result)
    eager, compiled = rows["sdpa/eager/fp32"], rows["sdpa/compile/fp32"]
    assert (eager["micro_batch"], eager["grad_accum"]) == (4, 1)
    assert (compiled["micro_batch"], compiled["grad_accum"]) == (2, 2)
    assert "OOM at micro-batch 4" in compiled["note"]
    # the same 4 rows per step, in two halves: the loss is the same as in one piece
    assert abs(compiled["loss_delta"]) < 1e-3
    assert result["decode"]["status"] == "skipped"
