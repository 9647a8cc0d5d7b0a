"""The tools a nanochat model may call: a calculator for `<|python_start|>` blocks and a Python sandbox for HumanEval.

Imports only the standard library, so it can be vendored next to `engine.py` (e.g. into a Space).

`calculate` never calls `eval`: it walks the expression's AST and allows only arithmetic on numbers and the
`"word".count("x")` string calls nanochat's SpellingBee data teaches the model.

`run_python` runs code in a fresh `python -I -S` subprocess with layered limits:
- OS level: rlimits on address space, CPU time, output/file size, open files and processes; its own session (the
  whole group is killed on timeout); an empty temp dir as cwd and HOME; a scrubbed environment; stdin from
  /dev/null; a new network namespace where the kernel allows one; and, when started as root, the uid `nobody`
  (or else a new user namespace).
- Python level: an audit hook (PEP 578) that refuses sockets, subprocesses, fork/exec, ctypes, reads outside the
  standard library and the temp dir, and writes outside the temp dir.
Like nanochat's `execute_code`, this stops model-written code from doing harm by accident or by the obvious
routes; it is not a kernel-enforced jail against a determined attacker.
"""

import ast
import functools
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------------------------
# The calculator

_MAX_EXPRESSION_CHARS = 1000
_BINARY_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
}
_UNARY_OPS = {ast.UAdd: lambda a: +a, ast.USub: lambda a: -a}
# String methods the calculator allows, with how many string arguments each takes. `**` is left out on purpose
# (as in nanochat): 9**9**9 would hang the caller.
_STRING_METHODS = {"count": 1, "lower": 0, "upper": 0, "strip": 0}


class _Refused(Exception):
    """The expression uses something the calculator does not allow."""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _evaluate(node: ast.AST):
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and (_is_number(node.value) or isinstance(node.value, str)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if not (_is_number(left) and _is_number(right)):  # no "ab" * 10**9
            raise _Refused("arithmetic needs numbers")
        return _BINARY_OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        operand = _evaluate(node.operand)
        if not _is_number(operand):
            raise _Refused("arithmetic needs numbers")
        return _UNARY_OPS[type(node.op)](operand)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in _STRING_METHODS
        and not node.keywords
        and len(node.args) == _STRING_METHODS[node.func.attr]
    ):
        receiver = _evaluate(node.func.value)
        args = [_evaluate(a) for a in node.args]
        if not isinstance(receiver, str) or not all(isinstance(a, str) for a in args):
            raise _Refused("string methods take strings")
        return getattr(receiver, node.func.attr)(*args)
    raise _Refused(type(node).__name__)


def _try_calculate(expr: str):
    try:
        result = _evaluate(ast.parse(expr.strip(), mode="eval"))
    except (_Refused, SyntaxError, ArithmeticError, ValueError, RecursionError, MemoryError):
        return None
    if isinstance(result, float) and not math.isfinite(result):
        return None
    return result


def calculate(expr: str) -> str | None:
    """Evaluate a calculator expression as nanochat's tool does; None when it is not one (or fails).

    Numbers with `+ - * / // %` and parentheses, or string calls like `"strawberry".count("r")`. Thousands
    separators are accepted ("1,000 * 3"). The result is `str()` of the Python value, e.g. "1.5" for "3/2".
    """
    if not isinstance(expr, str) or len(expr) > _MAX_EXPRESSION_CHARS:
        return None
    result = _try_calculate(expr)
    # "1,000*3" parses as a tuple and is refused; nanochat strips commas from numbers, so retry without them.
    if result is None and "," in expr:
        result = _try_calculate(re.sub(r"(?<=\d),(?=\d)", "", expr))
    if result is None:
        return None
    try:
        return str(result)
    except ValueError:  # an integer past Python's str() digit limit
        return None


# ---------------------------------------------------------------------------------------------------------------
# The Python sandbox


@dataclass
class ExecutionResult:
    """What running untrusted code produced. `error` says why it failed (None on success)."""

    success: bool
    stdout: str
    stderr: str
    error: str | None = None
    timed_out: bool = False
    memory_exceeded: bool = False
    output_truncated: bool = False


_NOBODY = 65534
_OUTPUT_LIMIT_BYTES = 1 << 20  # per written file, stdout and stderr included (RLIMIT_FSIZE)
_RETURNED_OUTPUT_CHARS = 64 * 1024
_MAX_FILES_WRITTEN = 64

# Runs in the child before the untrusted code (passed with -c; argv: code file, sandbox dir, limits). It reads
# the code, then confines itself; everything the audit hook needs is bound in its closure so the code cannot
# rebind it through globals or builtins.
_BOOTSTRAP = r"""
import os, sys, resource
code_path, box, memory_mb, cpu_s, fsize, max_files, nobody = sys.argv[1:8]
with open(code_path, encoding="utf-8") as f:
    source = f.read()
os.chdir(box)

def _unshare(flags):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    ok = libc.unshare(flags) == 0
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]  # a later `import ctypes` must go through the audit hook
    return ok

CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
drop_to = int(nobody)
try:
    # No network where the kernel lets us: a new network namespace has only a down loopback device. A new user
    # namespace (when not switching uid) also takes away root's capabilities over the host's objects.
    if drop_to < 0 or os.geteuid() != 0:
        _unshare(CLONE_NEWUSER | CLONE_NEWNET) or _unshare(CLONE_NEWNET)
    else:
        _unshare(CLONE_NEWNET)
except Exception:
    pass
if drop_to >= 0 and os.geteuid() == 0:
    # Root ignores the process limit and file permissions; run as nobody instead.
    os.setgroups([])
    os.setgid(drop_to)
    os.setuid(drop_to)
for limit, value in (
    (resource.RLIMIT_AS, int(memory_mb) << 20),
    (resource.RLIMIT_CPU, int(cpu_s)),
    (resource.RLIMIT_FSIZE, int(fsize)),
    (resource.RLIMIT_NOFILE, 64),
    (resource.RLIMIT_NPROC, 0),
    (resource.RLIMIT_CORE, 0),
):
    try:
        resource.setrlimit(limit, (value, value))
    except (ValueError, OSError):
        pass

def _make_hook(box, read_roots, max_files):
    # Only builtins captured here and methods of exact str/bytes/tuple objects are used below: the code could
    # monkeypatch os.path, a Path class or a str subclass to make a check see one path and open() another.
    getcwd, type_, str_, bytes_, int_ = os.getcwd, type, str, bytes, int
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    blocked_prefixes = ("socket.", "subprocess.", "ctypes.", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                        "os.system", "os.kill", "os.killpg", "os.symlink", "os.link", "os.chown", "os.chmod",
                        "os.chroot", "os.setxattr", "os.removexattr", "os.putenv", "os.unsetenv", "os.mkfifo",
                        "os.mknod", "pty.", "winreg.", "sys.remote_exec", "sqlite3.", "resource.setrlimit",
                        "resource.prlimit")
    blocked_imports = ("ctypes", "_ctypes", "gc", "_posixsubprocess", "cffi", "_xxsubinterpreters",
                       "_interpreters", "_testcapi", "_testinternalcapi")
    # event -> how many of its leading arguments are paths
    write_events = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.rename": 2, "os.truncate": 1, "os.utime": 1,
                    "shutil.rmtree": 1, "shutil.copyfile": 2, "shutil.copytree": 2, "shutil.move": 2,
                    "os.chdir": 1, "tempfile.mkstemp": 1, "tempfile.mkdtemp": 1}
    read_events = ("os.listdir", "os.scandir", "glob.glob", "glob.glob/2")
    written = [0]

    def absolute(path):
        # Lexical: symlinks cannot be made in the sandbox, and the roots were resolved before it started.
        if type_(path) is bytes_:
            path = path.decode("utf-8", "surrogateescape")
        elif type_(path) is not str_:
            return None  # a path-like object could answer differently when open() asks it again
        if not path.startswith("/"):
            path = getcwd() + "/" + path
        parts = []
        for part in path.split("/"):
            if part == "..":
                if parts:
                    parts.pop()
            elif part and part != ".":
                parts.append(part)
        return "/" + "/".join(parts)

    def inside(path, roots):
        if path is None or type_(path) is int_:
            return True  # the cwd (inside the sandbox dir), or an already-open descriptor
        path = absolute(path)
        if path is None:
            return False
        for root in roots:
            if path == root or path.startswith(root + "/"):
                return True
        return False

    def hook(event, args):
        if event.startswith(blocked_prefixes):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import":
            name = args[0]
            if type_(name) is not str_ or name.split(".")[0] in blocked_imports:
                raise PermissionError(f"sandbox: importing {name} is not allowed")
        elif event == "open":
            path, mode, flags = args
            if not (mode is None or type_(mode) is str_) or not (flags is None or type_(flags) is int_):
                raise PermissionError("sandbox: open() with an unusual mode is not allowed")
            writing = (mode is not None and any(c in mode for c in "wax+")) or (
                flags is not None and flags & write_flags
            )
            if writing:
                if not inside(path, (box,)):
                    raise PermissionError(f"sandbox: writing {path!r} is not allowed (only the current directory)")
                written[0] += 1
                if written[0] > max_files:
                    raise PermissionError("sandbox: too many files written")
            elif not inside(path, read_roots):
                raise PermissionError(f"sandbox: reading {path!r} is not allowed")
        elif event in write_events:
            for path in args[: write_events[event]]:
                if not inside(path, (box,)):
                    raise PermissionError(f"sandbox: {event} outside the current directory is not allowed")
        elif event in read_events:
            if args and not inside(args[0], read_roots):
                raise PermissionError(f"sandbox: {event} outside the current directory is not allowed")

    return hook

_roots = tuple(q for p in sys.path if p and os.path.isdir(p) for q in {os.path.abspath(p), os.path.realpath(p)})
_roots += (os.path.realpath(box),)
sys.addaudithook(_make_hook(os.path.realpath(box), _roots, int(max_files)))
del _make_hook, _roots, _unshare, code_path, f
_compiled = compile(source, "<sandbox>", "exec")
del source
exec(_compiled, {"__name__": "__main__", "__builtins__": __builtins__})
"""


def _world_readable_dir(path: str) -> bool:
    """Whether an unprivileged user can list `path` and reach it (o+rx on it, o+x on every ancestor)."""
    try:
        if os.stat(path).st_mode & 0o005 != 0o005:
            return False
        parent = os.path.dirname(path)
        while parent != path:
            if not os.stat(parent).st_mode & 0o001:
                return False
            path, parent = parent, os.path.dirname(parent)
    except OSError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _sandbox_uid() -> int:
    """The uid the sandbox switches to when started as root: nobody, if nobody can import the standard library
    (an interpreter installed under /root cannot be); -1 to keep root inside a new user namespace."""
    if os.geteuid() != 0:
        return -1
    stdlib = [sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")]
    stdlib += [os.path.join(p, "lib-dynload") for p in stdlib if os.path.isdir(os.path.join(p, "lib-dynload"))]
    return _NOBODY if all(_world_readable_dir(os.path.realpath(p)) for p in stdlib) else -1


def _read_capped(path: str, limit: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    return data[:limit].decode("utf-8", errors="replace"), len(data) > limit


def run_python(code: str, timeout: float = 5.0, memory_mb: int = 512) -> ExecutionResult:
    """Run untrusted Python `code` in a sandboxed subprocess (see the module docstring) and report the outcome.

    `success` is True when the code ran to the end (exit status 0) within `timeout` seconds of wall time and
    `memory_mb` MiB of address space. stdout/stderr come back truncated to 64 KiB each; writing more than
    1 MiB to any file (stdout included) kills the run.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if memory_mb < 32:
        raise ValueError(f"memory_mb must be at least 32 (the interpreter alone needs that), got {memory_mb!r}")
    private = tempfile.mkdtemp(prefix="nanochat-run-")  # code + captured output; the sandbox cannot open it
    box = tempfile.mkdtemp(prefix="nanochat-box-")  # the code's cwd and HOME
    try:
        uid = _sandbox_uid()
        if uid >= 0:
            os.chown(box, uid, uid)
        code_path = os.path.join(private, "code.py")
        with open(code_path, "w", encoding="utf-8") as f:
            f.write(code)
        env = {"PATH": "/usr/bin:/bin", "HOME": box, "TMPDIR": box, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        cpu_seconds = math.ceil(timeout) + 1
        argv = [sys.executable, "-I", "-S", "-B", "-X", "utf8", "-c", _BOOTSTRAP, code_path, box, str(memory_mb),
                str(cpu_seconds), str(_OUTPUT_LIMIT_BYTES), str(_MAX_FILES_WRITTEN), str(uid)]
        with open(os.path.join(private, "stdout"), "wb") as out, open(os.path.join(private, "stderr"), "wb") as err:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=box, env=env, start_new_session=True
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # Kill the whole session: whatever the code started dies with it.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        stdout, out_cut = _read_capped(os.path.join(private, "stdout"), _RETURNED_OUTPUT_CHARS)
        stderr, err_cut = _read_capped(os.path.join(private, "stderr"), _RETURNED_OUTPUT_CHARS)
        flooded = os.path.getsize(os.path.join(private, "stdout")) >= _OUTPUT_LIMIT_BYTES
    finally:
        shutil.rmtree(private, ignore_errors=True)
        shutil.rmtree(box, ignore_errors=True)
    return _outcome(proc.returncode, stdout, stderr, timed_out, flooded, out_cut or err_cut, timeout)


def _outcome(
    returncode: int, stdout: str, stderr: str, timed_out: bool, flooded: bool, truncated: bool, timeout: float
) -> ExecutionResult:
    memory_exceeded = "MemoryError" in stderr
    error = None
    if timed_out:
        error = f"timed out after {timeout:g} s"
    elif flooded or returncode == -signal.SIGXFSZ:
        # Python ignores SIGXFSZ, so a write past RLIMIT_FSIZE raises OSError(EFBIG) in the code instead.
        error = f"output limit exceeded (more than {_OUTPUT_LIMIT_BYTES} bytes written)"
        truncated = True
    elif returncode == -signal.SIGXCPU:
        error = "CPU time limit exceeded"
        timed_out = True
    elif returncode < 0:
        error = f"killed by {signal.Signals(-returncode).name}" + (" (memory limit exceeded)" if memory_exceeded else "")
    elif returncode != 0:
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        error = lines[-1] if lines else f"exited with status {returncode}"
    return ExecutionResult(
        success=error is None,
        stdout=stdout,
        stderr=stderr,
        error=error,
        timed_out=timed_out,
        memory_exceeded=memory_exceeded,
        output_truncated=truncated,
    )


__all__ = ["ExecutionResult", "calculate", "run_python"]
