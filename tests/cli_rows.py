"""Run many `nanochat-hf` command lines cheaply, each in a process of its own, for tests/test_cli_errors.py.

    python tests/cli_rows.py JOB.json RESULTS.json

Starting Python and importing torch, transformers and the stage modules takes seconds, which a test row of bad
input would otherwise pay every time. This runner imports them once (JOB's "preload" modules), then forks one child
per row: the child takes the row's working folder and extra environment, points file descriptors 1 and 2 at files,
and runs `python -m nanochat_hf` (``runpy``, with the row's argv) exactly as the interpreter would, top-level
SystemExit and traceback handling included. The row's exit status, stdout and stderr are what a shell would see,
less what the imports print once in this parent. Linux (fork) only.
"""

import importlib
import json
import os
import runpy
import signal
import sys
import tempfile
import time
import traceback


def _child(argv: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    os.chdir(cwd)
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = ["nanochat-hf", *argv]
    code = 0
    try:
        runpy.run_module("nanochat_hf", run_name="__main__", alter_sys=True)
    except SystemExit as exit:  # as the interpreter ends on SystemExit
        if isinstance(exit.code, int) or exit.code is None:
            code = exit.code or 0
        else:
            print(exit.code, file=sys.stderr)
            code = 1
    except BaseException:  # as the interpreter ends on an uncaught exception
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_row(row: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="cli-row-") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        sys.stdout.flush()
        sys.stderr.flush()
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            try:
                _child(row["argv"], row["cwd"], row.get("env", {}), out, err)
            finally:
                os._exit(70)  # never return into the parent's code
        returncode: int | str = "timeout"
        while time.perf_counter() - start < timeout:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                returncode = os.waitstatus_to_exitcode(status)
                break
            time.sleep(0.02)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        with open(out) as f, open(err) as g:
            return {"returncode": returncode, "stdout": f.read(), "stderr": g.read(),
                    "seconds": round(time.perf_counter() - start, 2)}


def main() -> None:
    job_path, results_path = sys.argv[1:3]
    with open(job_path) as f:
        job = json.load(f)
    for module in job["preload"]:
        importlib.import_module(module)
    results = [run_row(row, job.get("timeout", 120)) for row in job["rows"]]
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
