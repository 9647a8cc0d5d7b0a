"""The tools a nanochat model may call: a calculator for `<|python_start|>` blocks and a Python sandbox for HumanEval.

Imports only the standard library, so it can be vendored next to `engine.py` (e.g. into a Space).

`calculate` accepts exactly the expressions nanochat's `use_calculator` accepts (the same character sets, denied
words and `.count(` rule) and never calls `eval`: it walks the expression's AST.

`run_python` runs code in a fresh `python -I -S` subprocess in two layers, each of which stops every attack in
tests/test_sandbox_attacks.py by itself where the host offers it:
- "kernel", whatever the host's kernel offers: new user, mount, IPC and network namespaces; the box (the code's
  cwd, HOME and TMPDIR) as a private tmpfs that caps its files, directories and bytes and vanishes with the
  process; no capabilities and no new privileges; Landlock (the standard library read-only, the box read-write,
  nothing else; no TCP; no signals or abstract sockets out of the sandbox); and a seccomp filter (x86_64) that
  refuses new processes and threads, sockets, signals to any process but itself, ptrace, pidfd, other processes'
  memory and priorities, mounts and namespaces, and chmod/utime/xattr changes the owner of a host file could make.
- "hook": an audit hook (PEP 578) that checks each path where the kernel will resolve it (symlinks followed,
  directory descriptors included), refuses sockets, processes, signals to others, ctypes and tracing, and counts
  the files and directories the code creates. Alone it stops accidents and the obvious routes, not a determined
  attacker (native code it writes and loads is out of its sight); it is the only layer on a host that offers no
  kernel guard, and the first run logs a warning there.
Both layers share rlimits (memory, CPU, file size, open files, processes), a scrubbed environment, stdin from
/dev/null, a session of its own killed as a whole at the time limit, and the uid `nobody` when started as root
(where nobody can read the interpreter). `sandbox_guards()` and `ExecutionResult.guards` say which guards are in
force; the first run logs them. The box is removed after each call, iteratively, within the call's time limit,
never raising.
"""

import ast
import functools
import inspect
import logging
import math
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass

_log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# The calculator: nanochat's `use_calculator` gate, restated; an AST walk in place of its `eval`

# nanochat drops every comma (thousands separators, and commas inside strings too), then takes one of two routes,
# each gated by the characters the expression may contain.
_ARITHMETIC_CHARS = frozenset("0123456789*+-/.() ")
_STRING_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ ")
_DENIED_WORDS = ("__", "import", "exec", "eval", "compile", "open", "file", "input", "raw_input", "globals",
                 "locals", "vars", "dir", "getattr", "setattr", "delattr", "hasattr")
_BINARY_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
}
_UNARY_OPS = {ast.UAdd: lambda a: +a, ast.USub: lambda a: -a}
# The methods the string route evaluates, with how many string arguments each may take. nanochat's `eval` would run
# any method; these are the ones whose output stays the size of their input ('a'.ljust(10**9) is left out).
_STRING_METHODS = {"count": (1,), "split": (0, 1), "strip": (0, 1), "lstrip": (0, 1), "rstrip": (0, 1),
                   "lower": (0,), "upper": (0,), "casefold": (0,), "swapcase": (0,), "title": (0,), "capitalize": (0,)}
_LIST_METHODS = {"count": (1,)}  # on what split() returned


class _Refused(Exception):
    """The expression uses something the calculator does not evaluate."""


MAX_NESTING = 2500


def _nesting_depth(node: ast.AST) -> int:
    """How deep the syntax tree nests, walked with an explicit stack (the tree may be thousands of levels deep)."""
    deepest, todo = 0, [(node, 1)]
    while todo:
        node, depth = todo.pop()
        deepest = max(deepest, depth)
        todo += [(child, depth + 1) for child in ast.iter_child_nodes(node)]
    return deepest


def _arithmetic(node: ast.AST) -> int | float:
    """Numbers under + - * / // and unary +/-, evaluated with an explicit stack: `1+1+...+1` nests as deep as it is
    long, and nanochat's `eval` takes chains of thousands."""
    values: list[int | float] = []
    todo: list[tuple[ast.AST, bool]] = [(node, False)]
    while todo:
        node, operands_done = todo.pop()
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            values.append(node.value)
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
            if operands_done:
                right, left = values.pop(), values.pop()
                values.append(_BINARY_OPS[type(node.op)](left, right))
            else:
                todo += [(node, True), (node.right, False), (node.left, False)]
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
            if operands_done:
                values.append(_UNARY_OPS[type(node.op)](values.pop()))
            else:
                todo += [(node, True), (node.operand, False)]
        else:
            raise _Refused(type(node).__name__)
    return values[0]


def _string_calls(node: ast.AST) -> int:
    """A string literal and a chain of method calls on it ending in a count, each with string-literal arguments,
    e.g. `'Mississippi'.lower().count('s')`."""
    calls = []
    while isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Attribute) or node.keywords:
            raise _Refused("only method calls")
        calls.append(node)
        node = node.func.value
    if not (isinstance(node, ast.Constant) and type(node.value) is str):
        raise _Refused("methods of a string literal only")
    if not calls or calls[0].func.attr != "count":
        raise _Refused("the answer is a count")
    value = node.value
    for call in reversed(calls):
        if not all(isinstance(a, ast.Constant) and type(a.value) is str for a in call.args):
            raise _Refused("string literal arguments only")
        methods = _STRING_METHODS if type(value) is str else _LIST_METHODS
        if len(call.args) not in methods.get(call.func.attr, ()):
            raise _Refused(f"{call.func.attr} with {len(call.args)} arguments")
        value = getattr(value, call.func.attr)(*(a.value for a in call.args))
    return value


def calculate(expr: str) -> str | None:
    """Evaluate a calculator expression as nanochat's `use_calculator` does; None where it refuses (or fails).

    With every comma removed (thousands separators: "1,000 * 3"), either numbers with `+ - * / //`, parentheses
    and spaces (no `**`), or a string's method calls ending in a count, e.g. `'strawberry'.count('r')`, without
    nanochat's denied words ("open", "dir", "__", ...). The result is `str()` of the Python value ("1.5" for "3/2").
    """
    if not isinstance(expr, str):
        return None
    expr = expr.replace(",", "")
    if set(expr) <= _ARITHMETIC_CHARS:
        if "**" in expr:
            return None
        evaluate = _arithmetic
    elif set(expr) <= _STRING_CHARS and ".count(" in expr and not any(w in expr.lower() for w in _DENIED_WORDS):
        evaluate = _string_calls
    else:
        return None
    source = expr.lstrip(" ")  # as `eval` does
    try:
        tree = ast.parse(source, mode="eval").body
        # nanochat's eval cannot compile a chain thousands of operators deep, and answers None. Where that line
        # falls depends on the recursion limit (x3 for the compiler; 1,000 by default, raised by torch.compile) and
        # on the caller's stack, so it is drawn here at a fixed depth that the default limit compiles.
        if _nesting_depth(tree) > MAX_NESTING:
            return None
        value = evaluate(tree)
        compile(source, "<calculator>", "eval", dont_inherit=True)
        return str(value)  # ValueError past Python's digit limit, where nanochat's engine would raise
    except (_Refused, SyntaxError, ValueError, ArithmeticError, RecursionError, MemoryError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# The Python sandbox


@dataclass
class ExecutionResult:
    """What running untrusted code produced. `error` says why it failed (None on success); `guards` names the
    guards that were in force (see `sandbox_guards`)."""

    success: bool
    stdout: str
    stderr: str
    error: str | None = None
    timed_out: bool = False
    memory_exceeded: bool = False
    output_truncated: bool = False
    guards: tuple[str, ...] = ()


_LAYERS = ("kernel", "hook")
_NOBODY = 65534
_OUTPUT_LIMIT_BYTES = 1 << 20  # per written file, stdout and stderr included (RLIMIT_FSIZE)
_RETURNED_OUTPUT_CHARS = 64 * 1024
_MAX_BOX_ENTRIES = 64  # files and directories the code may create in its box
_CLEANUP_GRACE_S = 1.0  # how far past the call's time limit removing the box may run before it goes to a thread


# --- What runs in the sandbox process. `run_python` sends the source of these `_child_*` functions to a fresh
# interpreter (`python -c`); they never run in this one. Each imports what it uses.


def _child_main(argv: list[str]) -> None:
    """Confine this process with the layers asked for, report the guards that took hold on the report descriptor,
    then run the untrusted code as `__main__`."""
    import os
    import resource
    import sys
    import types

    code_path, box, report_fd, layers, memory_mb, cpu_s, fsize, max_entries, drop_to = argv
    layers, max_entries, drop_to = layers.split(","), int(max_entries), int(drop_to)
    with open(code_path, encoding="utf-8") as f:
        source = f.read()
    os.chdir(box)
    read_roots = _child_read_roots()
    guards = []
    if "kernel" in layers:
        guards += _child_kernel_guards(box, drop_to, max_entries, int(fsize) * max_entries, read_roots)
    elif drop_to >= 0 and os.geteuid() == 0:
        guards += _child_become(drop_to)
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
    guards.append("rlimits")
    if "hook" in layers:
        _child_disarm()
        sys.addaudithook(_child_audit_hook(os.path.realpath(box), read_roots, max_entries))
        guards.append("audit-hook")
    os.write(int(report_fd), " ".join(guards).encode())
    os.close(int(report_fd))
    main = types.ModuleType("__main__")  # the code's own module, not this one with the _child_* functions
    sys.modules["__main__"] = main
    compiled = compile(source, "<sandbox>", "exec")
    del source, f
    exec(compiled, main.__dict__)


def _child_read_roots() -> tuple[str, ...]:
    """The standard library's folders, as given and resolved: what the code may read besides its box."""
    import os
    import sys

    return tuple(sorted({q for p in sys.path if p and os.path.isdir(p) for q in (os.path.abspath(p),
                                                                                   os.path.realpath(p))}))


def _child_become(uid: int) -> list[str]:
    """Root ignores file permissions and the process limit: become `uid` (nobody), with no groups."""
    import os

    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    return ["uid-nobody"]


def _child_kernel_guards(box: str, drop_to: int, max_entries: int, box_bytes: int,
                         read_roots: tuple[str, ...]) -> list[str]:
    """Apply what the kernel offers, each step where it works: namespaces, the box as a capped tmpfs, nobody or
    no capabilities, no new privileges, Landlock, seccomp. Returns the guards that took hold. ctypes is needed for
    the system calls and is dropped from sys.modules after; what of it stays reachable can only make calls that
    the Landlock and seccomp rules applied here still govern."""
    import ctypes
    import os
    import struct
    import sys

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    ulong = ctypes.c_ulong
    guards = []
    as_root = drop_to >= 0 and os.geteuid() == 0
    uid, gid = (drop_to, drop_to) if as_root else (os.getuid(), os.getgid())
    new_ns, new_ipc, new_user, new_net = 0x00020000, 0x08000000, 0x10000000, 0x40000000
    # Real root keeps the host's user namespace (it becomes nobody below); anyone else enters a new one, mapped to
    # its own uid, which gives it the rights to make the other namespaces and the mount.
    if libc.unshare(ctypes.c_int(new_ns | new_ipc | new_net | (0 if as_root else new_user))) == 0:
        mapped = as_root
        if not as_root:
            guards.append("user-namespace")
            try:
                for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                    with open(f"/proc/self/{name}", "w") as f:
                        f.write(text)
                mapped = True
            except OSError:
                pass
        guards += ["mount-namespace", "ipc-namespace", "network-namespace"]
        # The box becomes a tmpfs seen only in this mount namespace: the kernel caps its entries and bytes, nothing in
        # it can be executed or mapped executable, and it vanishes with the process.
        ms_nosuid, ms_nodev, ms_noexec, ms_rec, ms_private = 2, 4, 8, 1 << 14, 1 << 18
        options = f"size={box_bytes},nr_inodes={max_entries + 1},mode=0700,uid={uid},gid={gid}".encode()
        if (mapped and libc.mount(None, b"/", None, ulong(ms_rec | ms_private), None) == 0
                and libc.mount(b"nanochat-box", box.encode(), b"tmpfs", ulong(ms_nosuid | ms_nodev | ms_noexec),
                               options) == 0):
            os.chdir(box)
            guards.append("box-tmpfs")
    elif libc.unshare(ctypes.c_int(new_net)) == 0:
        guards.append("network-namespace")
    if as_root:
        guards += _child_become(drop_to)
    else:  # in a new user namespace this process holds every capability there; give them all up
        header = ctypes.create_string_buffer(struct.pack("=Ii", 0x20080522, 0), 8)  # _LINUX_CAPABILITY_VERSION_3
        if libc.capset(header, ctypes.create_string_buffer(24)) == 0:
            guards.append("no-capabilities")
    if libc.prctl(ctypes.c_int(38), ulong(1), ulong(0), ulong(0), ulong(0)) == 0:  # PR_SET_NO_NEW_PRIVS
        guards.append("no-new-privileges")
        guards += _child_landlock(libc, box, read_roots)
        if os.uname().machine == "x86_64":
            program = _child_seccomp_program(os.getpid())
            instructions = ctypes.create_string_buffer(program, len(program))
            fprog = ctypes.create_string_buffer(struct.pack("=H6xQ", len(program) // 8,
                                                            ctypes.addressof(instructions)), 16)
            if libc.prctl(ctypes.c_int(22), ulong(2), fprog, ulong(0), ulong(0)) == 0:  # SECCOMP_MODE_FILTER
                guards.append("seccomp")
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]  # a later `import ctypes` goes through the audit hook
    return guards


def _child_landlock(libc, box: str, read_roots: tuple[str, ...]) -> list[str]:
    """Landlock at the ABI the kernel offers: the standard library and the shared libraries it loads read-only,
    /dev/null, the box read-write, nothing else; from ABI 4 no TCP; from ABI 6 no signals to processes outside
    the sandbox and no abstract unix sockets out of it. The kernel resolves every path it checks, so descriptors,
    openat2, symlinks and /proc/self/fd are covered."""
    import ctypes
    import os
    import stat
    import struct
    import sys

    def syscall(*args):
        return libc.syscall(*[ctypes.c_long(a) if isinstance(a, int) else a for a in args])

    abi = syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 1:
        return []
    execute, write_file, read_file, read_dir = 1, 2, 4, 8
    make_char, make_sock, make_fifo, make_block = 1 << 6, 1 << 9, 1 << 10, 1 << 11
    refer, truncate, ioctl_dev = 1 << 13, 1 << 14, 1 << 15
    handled = (1 << 13) - 1 | (refer if abi >= 2 else 0) | (truncate if abi >= 3 else 0) | (ioctl_dev if abi >= 5 else 0)
    net = 0b11 if abi >= 4 else 0  # bind and connect TCP
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets, signals
    attr = struct.pack("=QQQ", handled, net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = syscall(444, ctypes.create_string_buffer(attr, len(attr)), len(attr), 0)
    if ruleset < 0:
        return []
    in_box = handled & ~(execute | make_char | make_sock | make_fifo | make_block | ioctl_dev)
    libraries = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", os.path.join(sys.base_prefix, "lib"))
    rules = [(p, read_file | read_dir) for p in read_roots + libraries]
    rules += [("/etc/ld.so.cache", read_file), ("/dev/null", read_file | write_file), (box, in_box)]
    for path, rights in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= execute | write_file | read_file | truncate | ioctl_dev
        rule = struct.pack("=Qi", rights & handled, fd)  # struct landlock_path_beneath_attr (packed)
        syscall(445, ruleset, 1, ctypes.create_string_buffer(rule, len(rule)), 0)
        os.close(fd)
    applied = syscall(446, ruleset, 0) == 0
    os.close(ruleset)
    if not applied:
        return []
    return ["landlock-fs"] + ["landlock-net"] * bool(net) + ["landlock-scopes"] * bool(scoped)


def _child_seccomp_program(pid: int) -> bytes:
    """A seccomp filter for x86_64 in classic BPF over `struct seccomp_data`: refuse (EPERM) what reaches beyond
    the process, allow the rest. kill/tgkill/prlimit64 pass only for this process (pid) or its group, fcntl/ioctl
    only without the commands that point SIGIO at another process or push input into a terminal; system calls
    newer than this list get ENOSYS, from which the C library falls back."""
    import struct

    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    allow, kill, eperm, enosys = 0x7FFF0000, 0x80000000, 0x00050001, 0x00050026
    nr, arch, arg0, arg1 = 0, 4, 16, 24  # offsets; an argument's low 32 bits on a little-endian machine
    denied = {
        # processes and threads
        "clone": 56, "fork": 57, "vfork": 58, "execve": 59, "execveat": 322, "clone3": 435,
        # sockets
        "socket": 41, "connect": 42, "accept": 43, "bind": 49, "listen": 50, "socketpair": 53, "accept4": 288,
        # other processes: signals, tracing, memory, priorities
        "tkill": 200, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297, "ptrace": 101, "process_vm_readv": 310,
        "process_vm_writev": 311, "kcmp": 312, "pidfd_open": 434, "pidfd_send_signal": 424, "pidfd_getfd": 438,
        "process_madvise": 440, "process_mrelease": 448, "setpriority": 141, "sched_setparam": 142,
        "sched_setscheduler": 144, "sched_setaffinity": 203, "sched_setattr": 314, "ioprio_set": 251,
        "migrate_pages": 256, "move_pages": 279,
        # namespaces and mounts
        "unshare": 272, "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
        "mount_setattr": 442, "open_tree_attr": 467,
        # what the owner of a host file may change without opening it (Landlock does not cover these)
        "chmod": 90, "fchmod": 91, "fchmodat": 268, "fchmodat2": 452, "chown": 92, "fchown": 93, "lchown": 94,
        "fchownat": 260, "utime": 132, "utimes": 235, "futimesat": 261, "utimensat": 280, "setxattr": 188,
        "lsetxattr": 189, "fsetxattr": 190, "removexattr": 197, "lremovexattr": 198, "fremovexattr": 199,
        "setxattrat": 463, "removexattrat": 466, "truncate": 76, "inotify_add_watch": 254, "fanotify_init": 300,
        "fanotify_mark": 301, "mknod": 133, "mknodat": 259, "name_to_handle_at": 303, "open_by_handle_at": 304,
        # the kernel's own interfaces
        "add_key": 248, "request_key": 249, "keyctl": 250, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "init_module": 175,
        "finit_module": 313, "delete_module": 176, "kexec_load": 246, "kexec_file_load": 320, "reboot": 169,
        "swapon": 167, "swapoff": 168, "acct": 163, "quotactl": 179, "quotactl_fd": 443, "syslog": 103,
        "personality": 135, "lookup_dcookie": 212, "vhangup": 153, "iopl": 172, "ioperm": 173,
    }
    own, group = pid & 0xFFFFFFFF, -pid & 0xFFFFFFFF
    program = [(ld, 0, 0, arch), (jeq, 1, 0, 0xC000003E), (ret, 0, 0, kill),  # AUDIT_ARCH_X86_64 only
               (ld, 0, 0, nr), (jge, 0, 1, 0x40000000), (ret, 0, 0, eperm)]  # no x32 system calls
    for number in sorted(denied.values()):
        program += [(jeq, 0, 1, number), (ret, 0, 0, eperm)]

    def only(number: int, arg: int, values: list[int], listed_pass: bool) -> None:
        """System call `number` passes when argument `arg` is one of `values` (listed_pass) or none of them."""
        hit, miss = (allow, eperm) if listed_pass else (eperm, allow)
        body = [(ld, 0, 0, arg)] + [(jeq, len(values) - i, 0, v) for i, v in enumerate(values)]
        body += [(ret, 0, 0, miss), (ret, 0, 0, hit)]
        program.extend([(ld, 0, 0, nr), (jeq, 0, len(body), number)] + body)

    only(62, arg0, [0, own, group], True)  # kill: itself or its own process group
    only(234, arg0, [own], True)  # tgkill: its own threads
    only(302, arg0, [0, own], True)  # prlimit64: its own limits
    only(72, arg1, [8, 10, 15], False)  # fcntl: F_SETOWN, F_SETSIG, F_SETOWN_EX
    only(16, arg1, [0x5412, 0x8901, 0x8902], False)  # ioctl: TIOCSTI, FIOSETOWN, SIOCSPGRP
    program += [(ld, 0, 0, nr), (jge, 0, 1, 468), (ret, 0, 0, enosys), (ret, 0, 0, allow)]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)


def _child_refusing(name: str):
    def refused(*args, **kwargs):
        raise PermissionError(f"sandbox: {name} is not allowed")

    return refused


def _child_disarm() -> None:
    """Replace what reaches other processes without raising an audit event (pidfd, priorities) and thread starts
    (a second thread could change a path between the audit hook's check and the system call) with refusals."""
    import _signal
    import _thread
    import os
    import posix
    import signal

    process_calls = ("pidfd_open", "setpriority", "sched_setaffinity", "sched_setscheduler", "sched_setparam")
    for module, names in ((os, process_calls), (posix, process_calls), (signal, ("pidfd_send_signal",)),
                          (_signal, ("pidfd_send_signal",)), (_thread, ("start_new_thread", "start_new"))):
        for name in names:
            if hasattr(module, name):
                setattr(module, name, _child_refusing(f"{module.__name__}.{name}"))


def _child_audit_hook(box: str, read_roots: tuple[str, ...], max_entries: int):
    """The audit hook: reads only in the standard library, the box and /dev/null, writes only in the box and
    /dev/null, each path checked where the kernel will resolve it; at most `max_entries` files and directories
    created; no processes, sockets, ctypes, tracing, or signals to others.

    The hook is one function with no helpers: everything it refers to shows in its frame's locals, which a
    traceback hands to the code. So all of it is immutable (str, tuple, frozenset, builtin functions), except
    `created`, an itertools.count, which the code can only bring closer to the cap."""
    import itertools
    import os
    import resource

    lstat, readlink, fstat, getcwd, own = os.lstat, os.readlink, os.fstat, os.getcwd, os.getpid()
    str_, bytes_, int_, type_, item = str, bytes, int, type, tuple.__getitem__
    oserror, denied, refused_import = OSError, PermissionError, ImportError
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    created = itertools.count(1)
    write_roots = (box, "/dev/null")
    library_roots = tuple(read_roots)
    read_roots = library_roots + write_roots
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    blocked = ("socket.", "subprocess.", "ctypes.", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.system",
               "os.symlink", "os.link", "os.chown", "os.lchown", "os.chmod", "os.lchmod", "os.chflags", "os.lchflags",
               "os.chroot", "os.setxattr", "os.removexattr", "os.putenv", "os.unsetenv", "os.mkfifo", "os.mknod",
               "os.setns", "os.unshare", "os.startfile", "os.add_dll_directory", "pty.", "winreg.", "syslog.",
               "webbrowser.", "sqlite3.", "sys.remote_exec", "sys.settrace", "sys.setprofile", "resource.setrlimit",
               "resource.prlimit", "shutil.chown")
    # gc reaches every object (this hook included); the others open files or sockets in C, out of the hook's sight
    blocked_imports = frozenset(("ctypes", "_ctypes", "gc", "_posixsubprocess", "cffi", "_xxsubinterpreters",
                                 "_interpreters", "_testcapi", "_testinternalcapi", "_testmultiphase", "_testbuffer",
                                 "_ctypes_test", "_xxtestfuzz", "pwd", "grp", "spwd", "nis", "_dbm", "_gdbm",
                                 "readline", "_ssl", "_posixshmem", "_multiprocessing", "ossaudiodev", "syslog"))

    def hook(event, args):
        if event.startswith(blocked):
            raise denied(f"sandbox: {event} is not allowed")
        if event == "import":
            # every component: an extension module's init function is found by the last one (x._posixsubprocess)
            if type_(args[0]) is not str_ or not blocked_imports.isdisjoint(args[0].split(".")):
                raise refused_import(f"sandbox: importing {args[0]} is not allowed")
            if args[1] is None:
                return
        checks = ()  # (path, dir_fd, access): dir_fd None/-1 for the cwd, "any" where the event leaves a dir_fd
        # out (os.open); access "r" read, "w" write, "c" create, "d" enter, "x" load native code
        if event == "import":  # an extension module (native code, out of this hook's sight): the stdlib's only
            checks = ((args[1], None, "x"),)
        if (event == "os.kill" and args[0] not in (own, 0, -own)) or (event == "os.killpg" and args[0] not in (own, 0)):
            raise denied(f"sandbox: {event} of another process is not allowed")
        if (event == "fcntl.fcntl" and args[1] in (8, 10, 15)) or (event == "fcntl.ioctl" and args[1] in (0x5412, 0x8901, 0x8902)):
            raise denied(f"sandbox: {event} command {args[1]} is not allowed")
        elif event == "open":
            path, mode, flags = args
            if not (mode is None or type_(mode) is str_) or not (flags is None or type_(flags) is int_):
                raise denied("sandbox: open() with an unusual mode is not allowed")
            writing = (mode is not None and ("w" in mode or "a" in mode or "x" in mode or "+" in mode)) or (
                flags is not None and flags & write_flags)
            checks = ((path, None if mode is not None else "any", "w" if writing else "r"),)
        elif event == "os.mkdir":
            checks = ((args[0], args[2], "c"),)
        elif event in ("os.rmdir", "os.remove"):
            checks = ((args[0], args[1], "w"),)
        elif event == "os.rename":
            checks = ((args[0], args[2], "w"), (args[1], args[3], "w"))
        elif event == "os.utime":
            checks = ((args[0], args[3], "w"),)
        elif event in ("os.truncate", "shutil.rmtree", "tempfile.mkstemp", "tempfile.mkdtemp"):
            checks = ((args[0], None, "w"),)
        elif event == "os.chdir":
            checks = ((args[0], None, "d"),)
        elif event in ("os.listdir", "os.scandir", "os.walk", "os.listxattr", "os.getxattr", "glob.glob"):
            checks = ((args[0], None, "r"),)
        elif event == "os.fwalk":
            checks = ((args[0], args[4], "r"),)
        elif event == "glob.glob/2":
            checks = ((args[0], args[3], "r"), (args[2], args[3], "r"))
        elif event in ("shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.copytree", "shutil.move"):
            checks = ((args[0], None, "r"), (args[1], None, "w"))
        elif event == "shutil.make_archive":
            checks = ((args[0], None, "w"), (args[2], None, "r"))
        elif event == "shutil.unpack_archive":
            checks = ((args[0], None, "r"), (args[1], None, "w"))
        for path, dir_fd, access in checks:
            if path is None:
                continue  # the cwd, which stays in the box
            if type_(path) is int_:  # a descriptor: checked when it was opened; entering it must stay in the box
                if access != "d":
                    continue
                path, dir_fd = ".", path
            if type_(path) is bytes_:
                path = path.decode("utf-8", "surrogateescape")
            elif type_(path) is not str_:  # a path-like object could answer differently when asked again
                raise denied(f"sandbox: {event} with a {type_(path).__name__} path is not allowed")
            if path.startswith("/"):
                bases = ("",)
            elif dir_fd is None or dir_fd == -1:
                bases = (getcwd(),)
            elif dir_fd == "any":
                bases = [getcwd()]
                for fd in range(nofile):
                    try:
                        kind = item(fstat(fd), 0) & 0o170000
                    except oserror:
                        continue
                    if kind == 0o040000:
                        bases.append(readlink(f"/proc/self/fd/{fd}"))
            else:
                bases = (readlink(f"/proc/self/fd/{dir_fd}"),)
            new = False
            for base in bases:
                todo = (path if path.startswith("/") else base + "/" + path).split("/")
                todo.reverse()
                done = []
                links = 0
                while todo:  # resolve as the kernel will: symlinks followed, then `..`
                    part = todo.pop()
                    if part == "" or part == ".":
                        continue
                    if part == "..":
                        if done:
                            done.pop()
                        continue
                    done.append(part)
                    here = "/" + "/".join(done)
                    try:
                        kind = item(lstat(here), 0) & 0o170000
                    except oserror:
                        continue  # not there (yet): a name to create
                    if kind == 0o120000:
                        links += 1
                        if links > 40:
                            raise denied(f"sandbox: too many symbolic links in {path!r}")
                        target = readlink(here)
                        done.pop()
                        if target.startswith("/"):
                            done = []
                        more = target.split("/")
                        more.reverse()
                        todo += more
                resolved = "/" + "/".join(done)
                try:
                    lstat(resolved)
                except oserror:
                    new = True
                roots = {"r": read_roots, "d": (box,), "x": library_roots}.get(access, write_roots)
                inside = False
                for root in roots:
                    if resolved == root or resolved.startswith(root + "/"):
                        inside = True
                if not inside:
                    verb = {"r": "reading", "d": "entering", "x": "loading native code from"}.get(access, "writing")
                    where = {"r": "the current directory and the standard library",
                             "x": "the standard library"}.get(access, "the current directory")
                    raise denied(f"sandbox: {verb} {path!r} is not allowed (only {where})")
            if access == "c" or (access == "w" and event == "open" and new):
                if next(created) > max_entries:
                    raise denied(f"sandbox: too many files and directories created (at most {max_entries})")

    return hook


_CHILD_FUNCTIONS = (_child_main, _child_read_roots, _child_become, _child_kernel_guards, _child_landlock,
                    _child_seccomp_program, _child_refusing, _child_disarm, _child_audit_hook)


@functools.lru_cache(maxsize=1)
def _child_source() -> str:
    return "\n\n".join(inspect.getsource(f) for f in _CHILD_FUNCTIONS) + "\n\nimport sys\n_child_main(sys.argv[1:])\n"


# --- The host's side


@functools.lru_cache(maxsize=1)
def _kernel_offers() -> bool:
    """Whether this kernel offers the sandbox Landlock or a seccomp filter. Asked here, once: the sandbox loads
    ctypes only to apply them, and on a host without either, ctypes would stay within the code's reach (through
    `object.__subclasses__()`) with nothing in the kernel behind the audit hook."""
    if sys.platform != "linux":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        landlock = libc.syscall(ctypes.c_long(444), None, ctypes.c_long(0), ctypes.c_long(1)) >= 1
        zero = ctypes.c_ulong(0)
        seccomp = os.uname().machine == "x86_64" and libc.prctl(ctypes.c_int(21), zero, zero, zero, zero) >= 0
    except (OSError, AttributeError):
        return False
    return landlock or seccomp


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
    (an interpreter installed under /root cannot be); -1 to keep root's uid inside a new user namespace."""
    if os.geteuid() != 0:
        return -1
    stdlib = [sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")]
    stdlib += [os.path.join(p, "lib-dynload") for p in stdlib if os.path.isdir(os.path.join(p, "lib-dynload"))]
    return _NOBODY if all(_world_readable_dir(os.path.realpath(p)) for p in stdlib) else -1


@functools.cache
def _announce(guards: tuple[str, ...]) -> None:
    """Say once (per set of guards) which guards are in force."""
    if {"landlock-fs", "seccomp"} <= set(guards):
        _log.info("python sandbox guards in force: %s", ", ".join(guards))
    else:
        _log.warning("python sandbox guards in force: %s. Without Landlock and seccomp the audit hook alone keeps "
                     "the code from files and other processes: it stops accidents and the obvious routes, not a "
                     "determined attacker", ", ".join(guards) or "none")


@functools.lru_cache(maxsize=1)
def sandbox_guards() -> tuple[str, ...]:
    """The guards `run_python` puts in force on this host, probed once with an empty program: e.g. `user-namespace,
    mount-namespace, ipc-namespace, network-namespace, box-tmpfs, no-capabilities, no-new-privileges, landlock-fs,
    landlock-net, landlock-scopes, seccomp, rlimits, audit-hook` on a recent Linux."""
    return run_python("pass").guards


def _read_capped(path: str, limit: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    return data[:limit].decode("utf-8", errors="replace"), len(data) > limit


def _read_report(fd: int) -> tuple[str, ...]:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return tuple(b"".join(chunks).decode("ascii", errors="replace").split())


def run_python(code: str, timeout: float = 5.0, memory_mb: int = 512, *,
               layers: tuple[str, ...] = _LAYERS) -> ExecutionResult:
    """Run untrusted Python `code` in a sandboxed subprocess (see the module docstring) and report the outcome.

    `success` is True when the code ran to the end (exit status 0) within `timeout` seconds of wall time and
    `memory_mb` MiB of address space. stdout/stderr come back truncated to 64 KiB each; writing more than
    1 MiB to any file (stdout included) kills the run. `layers` picks the sandbox's layers ("kernel", "hook");
    tests run each alone to show it holds by itself.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if memory_mb < 32:
        raise ValueError(f"memory_mb must be at least 32 (the interpreter alone needs that), got {memory_mb!r}")
    if not layers or not set(layers) <= set(_LAYERS):
        raise ValueError(f"layers must be a non-empty subset of {_LAYERS}, got {layers!r}")
    started = time.monotonic()
    private = tempfile.mkdtemp(prefix="nanochat-run-")  # code + captured output; the sandbox cannot open it
    box = tempfile.mkdtemp(prefix="nanochat-box-")  # the code's cwd, HOME and TMPDIR
    report_read, report_write = os.pipe()  # the sandbox names its guards here, then closes it before the code runs
    try:
        uid = _sandbox_uid()
        if uid >= 0:
            os.chown(box, uid, uid)
        code_path = os.path.join(private, "code.py")
        with open(code_path, "w", encoding="utf-8") as f:
            f.write(code)
        env = {"PATH": "/usr/bin:/bin", "HOME": box, "TMPDIR": box, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        asked = ",".join(layer for layer in layers if layer != "kernel" or _kernel_offers())
        argv = [sys.executable, "-I", "-S", "-B", "-X", "utf8", "-c", _child_source(), code_path, box,
                str(report_write), asked, str(memory_mb), str(math.ceil(timeout) + 1), str(_OUTPUT_LIMIT_BYTES),
                str(_MAX_BOX_ENTRIES), str(uid)]
        with open(os.path.join(private, "stdout"), "wb") as out, open(os.path.join(private, "stderr"), "wb") as err:
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=box, env=env,
                                        start_new_session=True, pass_fds=(report_write,))
            finally:
                os.close(report_write)
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
        guards = _read_report(report_read)
        stdout, out_cut = _read_capped(os.path.join(private, "stdout"), _RETURNED_OUTPUT_CHARS)
        stderr, err_cut = _read_capped(os.path.join(private, "stderr"), _RETURNED_OUTPUT_CHARS)
        flooded = os.path.getsize(os.path.join(private, "stdout")) >= _OUTPUT_LIMIT_BYTES
    finally:
        os.close(report_read)
        deadline = max(started + timeout, time.monotonic()) + _CLEANUP_GRACE_S
        _discard(private, deadline)
        _discard(box, deadline)
    _announce(guards)
    result = _outcome(proc.returncode, stdout, stderr, timed_out, flooded, out_cut or err_cut, timeout)
    result.guards = guards
    return result


# --- Removing the box


def _remove_tree(path: str, deadline: float) -> bool:
    """Delete the directory tree at `path` without following symlinks, iteratively and with one directory open at
    a time (a 3,000-deep tree neither recurses nor holds 3,000 descriptors, and its paths may pass PATH_MAX: each
    step goes by name from an open directory, and back up through `..`). Each directory is listed once. Returns
    False, the tree partly removed, if `deadline` (time.monotonic()) passes first."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return True
    below: list[tuple[str, tuple[int, int]]] = []  # per level under `path`: its name and its parent's (dev, ino)
    subdirs: list[list[str]] = []  # per open level: subdirectories still to remove
    try:
        subdirs.append(_remove_files(fd, deadline))
        while True:
            if time.monotonic() > deadline:
                return False
            if subdirs[-1]:
                name = subdirs[-1].pop()
                try:
                    child = os.open(name, flags, dir_fd=fd)
                except FileNotFoundError:
                    continue
                parent = os.fstat(fd)
                os.close(fd)
                fd = child
                below.append((name, (parent.st_dev, parent.st_ino)))
                subdirs.append(_remove_files(fd, deadline))
            elif below:
                name, parent_id = below.pop()
                subdirs.pop()
                parent = os.open("..", flags, dir_fd=fd)
                os.close(fd)
                fd = parent
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != parent_id:
                    raise OSError(f"{path} changed while it was being removed")
                os.rmdir(name, dir_fd=fd)
            else:
                break
    finally:
        os.close(fd)
    os.rmdir(path)
    return True


def _remove_files(fd: int, deadline: float) -> list[str]:
    """Unlink everything but the subdirectories in the directory open as `fd`; return the subdirectories' names."""
    subdirs = []
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.name)
            elif time.monotonic() <= deadline:
                os.unlink(entry.name, dir_fd=fd)
    return subdirs


def _discard(path: str, deadline: float) -> None:
    """Remove the directory `path`, never raising: what is left at `deadline` goes to a background thread, and a
    failure is logged, naming the folder left behind."""
    try:
        if _remove_tree(path, deadline):
            return
    except Exception as exc:  # a failed clean-up must not turn a finished run into an error
        _log.warning("could not remove the sandbox folder %s: %s", path, exc)
        return
    _log.warning("removing the sandbox folder %s outlasted the call's time limit; finishing in the background", path)
    threading.Thread(target=_discard, args=(path, math.inf), name="nanochat-sandbox-cleanup", daemon=True).start()

# --- The verdict


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


__all__ = ["ExecutionResult", "calculate", "run_python", "sandbox_guards"]
