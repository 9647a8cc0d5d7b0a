"""Every route out of the python tool's sandbox that we know of, tried against each of its layers alone and against
both together. Each attack prints ESCAPED only if the step that should be refused went through, and each must leave
the host as it was: the secret file unread and unchanged, nothing planted outside the box, the victim process
alive and at its priority, no connection to the host's servers, the call back within its time limit.

The layers: "kernel" (namespaces, Landlock, seccomp, a tmpfs box: whatever this host offers, listed by
`sandbox_guards()`) and "hook" (the audit hook, the only layer on a host that offers none of them)."""

import os
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import pytest

from nanochat_hf.inference.tools import _MAX_BOX_ENTRIES, _discard, _remove_tree, run_python, sandbox_guards

GUARDS = sandbox_guards()
KERNEL_CONFINES = {"landlock-fs", "seccomp"} <= set(GUARDS)
BOTH, HOOK, KERNEL = ("kernel", "hook"), ("hook",), ("kernel",)
MODES = [
    pytest.param(BOTH, id="both"),
    pytest.param(HOOK, id="hook-only"),
    pytest.param(KERNEL, id="kernel-only", marks=pytest.mark.skipif(
        not KERNEL_CONFINES, reason=f"this host offers neither Landlock nor seccomp to the sandbox: {GUARDS}")),
]
TOKEN = "the-host-secret-4c1f"
STDLIB = sysconfig.get_paths()["stdlib"]
PLANTED_IN_STDLIB = os.path.join(os.path.realpath(STDLIB), "nanochat_sandbox_planted.py")


class Host:
    """What the attacks aim at, set up once: a 0600 secret, an empty folder, a victim process, listening sockets."""

    def __init__(self, root: Path):
        self.secret = root / "secret.txt"
        self.secret.write_text(TOKEN)
        self.secret.chmod(0o600)
        self.secret_stat = self.secret.stat()
        self.outside = root / "outside"
        self.outside.mkdir()
        self.victim = subprocess.Popen(["sleep", "600"], start_new_session=True)
        self.victim_nice = os.getpriority(os.PRIO_PROCESS, self.victim.pid)
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.unix_path = str(root / "host.sock")
        self.unix = socket.socket(socket.AF_UNIX)
        self.unix.bind(self.unix_path)
        self.unix.listen(4)
        self.abstract_name = f"\0nanochat-sandbox-test-{os.getpid()}"
        self.abstract = socket.socket(socket.AF_UNIX)
        self.abstract.bind(self.abstract_name)
        self.abstract.listen(4)
        for s in (self.tcp, self.udp, self.unix, self.abstract):
            s.setblocking(False)

    def values(self) -> dict:
        return {"secret": str(self.secret), "outside": str(self.outside), "victim": self.victim.pid,
                "tcp": self.tcp.getsockname()[1], "udp": self.udp.getsockname()[1], "unix": self.unix_path,
                "abstract": self.abstract_name, "planted": PLANTED_IN_STDLIB}

    def assert_unharmed(self) -> None:
        assert self.secret.read_text() == TOKEN
        now = self.secret.stat()
        assert (stat.S_IMODE(now.st_mode), now.st_mtime_ns) == (0o600, self.secret_stat.st_mtime_ns)
        assert list(self.outside.iterdir()) == []
        assert not os.path.exists(PLANTED_IN_STDLIB)
        assert self.victim.poll() is None, "the victim process was killed"
        assert os.getpriority(os.PRIO_PROCESS, self.victim.pid) == self.victim_nice
        for server in (self.tcp, self.unix, self.abstract):
            with pytest.raises(BlockingIOError):  # nothing ever connected
                server.accept()
        with pytest.raises(BlockingIOError):  # nothing ever arrived
            self.udp.recvfrom(100)

    def reset(self) -> None:
        """Undo what an earlier (failed) attack did, so that each test's verdict is about its own attack."""
        self.secret.chmod(0o600)
        self.secret.write_text(TOKEN)
        os.utime(self.secret, ns=(self.secret_stat.st_atime_ns, self.secret_stat.st_mtime_ns))
        for planted in self.outside.iterdir():
            planted.unlink()
        if os.path.exists(PLANTED_IN_STDLIB):
            os.remove(PLANTED_IN_STDLIB)
        if self.victim.poll() is not None:
            self.victim = subprocess.Popen(["sleep", "600"], start_new_session=True)
        os.setpriority(os.PRIO_PROCESS, self.victim.pid, self.victim_nice)
        for server in (self.tcp, self.unix, self.abstract):
            try:
                while True:
                    server.accept()[0].close()
            except BlockingIOError:
                pass
        try:
            while True:
                self.udp.recvfrom(100)
        except BlockingIOError:
            pass

    def close(self) -> None:
        self.victim.kill()
        self.victim.wait()
        for s in (self.tcp, self.udp, self.unix, self.abstract):
            s.close()
        if os.path.exists(PLANTED_IN_STDLIB):
            os.remove(PLANTED_IN_STDLIB)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    h = Host(tmp_path_factory.mktemp("host"))
    yield h
    h.close()


# Code run from the box's cwd that climbs from the box to the filesystem root with as many `..` as the box is deep.
UP = "UP = '../' * os.getcwd().count('/')\n"
LIBC = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.syscall.restype = ctypes.c_long\n"

ATTACKS = {
    # --- reading files
    "read": "print(open({secret!r}).read())\nprint('ESCAPED')",
    "read-os-open": "import os\nprint(os.read(os.open({secret!r}, os.O_RDONLY), 100))\nprint('ESCAPED')",
    # the attack: a directory descriptor opened before a chdir, then a path the check resolved against the
    # new cwd (inside the box) and the kernel against the descriptor (outside it)
    "read-dir-fd": "import os\n" + UP + "top = os.open('.', os.O_RDONLY)\nfor _ in range(UP.count('/')):\n"
                   "    os.mkdir('d')\n    os.chdir('d')\n"
                   "print(os.read(os.open(UP + {secret!r}[1:], os.O_RDONLY, dir_fd=top), 100))\nprint('ESCAPED')",
    "read-openat2": "import os\n" + LIBC + "how = (ctypes.c_uint64 * 3)(os.O_RDONLY, 0, 0)\n"
                    "fd = libc.syscall(437, -100, {secret!r}.encode(), ctypes.byref(how), 24)\n"
                    "print(os.read(fd, 100))\nprint('ESCAPED')",
    "read-symlink": "import os\nos.symlink({secret!r}, 'link')\nprint(open('link').read())\nprint('ESCAPED')",
    "read-hardlink": "import os\nos.link({secret!r}, 'hard')\nprint(open('hard').read())\nprint('ESCAPED')",
    "read-proc-self-root": "print(open('/proc/self/root' + {secret!r}).read())\nprint('ESCAPED')",
    "read-proc-self-fd": "import os\n" + UP + "fd = os.open('.', os.O_RDONLY)\n"
                         "print(open(f'/proc/self/fd/{{fd}}/' + UP + {secret!r}[1:]).read())\nprint('ESCAPED')",
    "read-proc-cwd": "import os\n" + UP + "print(open('/proc/self/cwd/' + UP + {secret!r}[1:]).read())\nprint('ESCAPED')",
    "list-outside": "import os\nprint(os.listdir(os.path.dirname({secret!r})))\nprint('ESCAPED')",
    "read-parent-environ": "import os\nprint(open(f'/proc/{{os.getppid()}}/environ').read())\nprint('ESCAPED')",
    "read-parent-memory": "import os\n" + LIBC + "buf = ctypes.create_string_buffer(64)\n"
                          "local = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 64)\n"
                          "remote = (ctypes.c_void_p * 2)(0x400000, 64)\n"
                          "assert libc.syscall(310, os.getppid(), local, 1, remote, 1, 0) > 0\nprint('ESCAPED')",
    # --- writing files
    "write": "open({outside!r} + '/planted', 'w').write('x')\nprint('ESCAPED')",
    "write-dir-fd": "import os\n" + UP + "top = os.open('.', os.O_RDONLY)\nfor _ in range(UP.count('/')):\n"
                    "    os.mkdir('d')\n    os.chdir('d')\n"
                    "os.open(UP + {outside!r}[1:] + '/planted', os.O_CREAT | os.O_WRONLY, dir_fd=top)\n"
                    "print('ESCAPED')",
    "write-rename-out": "import os\nopen('x', 'w').write('x')\nos.rename('x', {outside!r} + '/planted')\n"
                        "print('ESCAPED')",
    "write-symlink-out": "import os\nos.symlink({outside!r} + '/planted', 'link')\nopen('link', 'w').write('x')\n"
                         "print('ESCAPED')",
    "write-proc-cwd": "import os\n" + UP + "open('/proc/self/cwd/' + UP + {outside!r}[1:] + '/planted', 'w')\n"
                      "print('ESCAPED')",
    "write-stdlib": "open({planted!r}, 'w').write('import os')\nprint('ESCAPED')",
    "truncate-secret": "import os\nos.truncate({secret!r}, 0)\nprint('ESCAPED')",
    "chmod-secret": "import os\nos.chmod({secret!r}, 0o777)\nprint('ESCAPED')",
    "utime-secret": "import os\nos.utime({secret!r}, (0, 0))\nprint('ESCAPED')",
    "chmod-secret-ctypes": LIBC + "assert libc.chmod({secret!r}.encode(), 0o777) == 0\nprint('ESCAPED')",
    "new-user-namespace": LIBC + "assert libc.unshare(0x10000000 | 0x20000) == 0\nprint('ESCAPED')",
    # --- sockets
    "tcp": "import socket\nsocket.create_connection(('127.0.0.1', {tcp}), timeout=2).sendall(b'leak')\n"
           "print('ESCAPED')",
    "tcp-_socket": "import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {tcp}))\nprint('ESCAPED')",
    "udp": "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
           "s.sendto(b'leak', ('127.0.0.1', {udp}))\nprint('ESCAPED')",
    "unix-socket": "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({unix!r})\nprint('ESCAPED')",
    "abstract-unix-socket": "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({abstract!r})\n"
                            "print('ESCAPED')",
    "socket-ctypes": LIBC + "assert libc.socket(2, 1, 0) >= 0\nprint('ESCAPED')",
    "http": "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{tcp}/', timeout=2)\nprint('ESCAPED')",
    # --- creating processes
    "os-system": "import os\nassert os.system('true') == 0\nprint('ESCAPED')",
    "subprocess": "import subprocess\nsubprocess.run(['true'])\nprint('ESCAPED')",
    "execv": "import os\nos.execv('/bin/sh', ['sh', '-c', 'echo ESCAPED'])",
    "posix-spawn": "import os\nos.posix_spawn('/bin/true', ['true'], {{}})\nprint('ESCAPED')",
    "fork": "import os\nos.fork()\nprint('ESCAPED')",
    "fork-ctypes": LIBC + "assert libc.fork() >= 0\nprint('ESCAPED')",
    "pty-fork": "import pty\npty.fork()\nprint('ESCAPED')",
    "multiprocessing": "import multiprocessing\nmultiprocessing.Process(target=print).start()\nprint('ESCAPED')",
    "thread": "import threading\nthreading.Thread(target=print).start()\nprint('ESCAPED')",
    "system-ctypes": "import ctypes\nassert ctypes.CDLL(None).system(b'true') == 0\nprint('ESCAPED')",
    # --- reaching other processes (signal 0 checks the permission without sending anything)
    "pidfd-parent": "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), 0)\nprint('ESCAPED')",
    "pidfd-victim": "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open({victim}), signal.SIGKILL)\n"
                    "print('ESCAPED')",
    "kill-parent": "import os\nos.kill(os.getppid(), 0)\nprint('ESCAPED')",
    "kill-victim": "import os, signal\nos.kill({victim}, signal.SIGKILL)\nprint('ESCAPED')",
    "killpg-victim": "import os, signal\nos.killpg({victim}, signal.SIGKILL)\nprint('ESCAPED')",
    "kill-everyone": "import os\nos.kill(-1, 0)\nprint('ESCAPED')",
    "kill-ctypes": LIBC + "assert libc.syscall(62, {victim}, 9) == 0\nprint('ESCAPED')",
    "sigio-victim": "import fcntl, os, signal\nr, w = os.pipe()\nfcntl.fcntl(r, fcntl.F_SETOWN, {victim})\n"
                    "fcntl.fcntl(r, 10, signal.SIGKILL)\n"
                    "fcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) | os.O_ASYNC)\n"
                    "os.write(w, b'x')\nprint('ESCAPED')",
    "ptrace-victim": LIBC + "assert libc.ptrace(16, {victim}, None, None) == 0\nprint('ESCAPED')",
    "renice-victim": "import os\nos.setpriority(os.PRIO_PROCESS, {victim}, 19)\nprint('ESCAPED')",
    "prlimit-parent": "import os, resource\nresource.prlimit(os.getppid(), resource.RLIMIT_NOFILE)\nprint('ESCAPED')",
}


@pytest.mark.parametrize("layers", MODES)
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attack_fails_and_leaves_the_host_unharmed(attack, layers, host):
    host.reset()
    started = time.monotonic()
    result = run_python(ATTACKS[attack].format(**host.values()), timeout=5.0, layers=layers)
    assert time.monotonic() - started < 5.0
    assert "ESCAPED" not in result.stdout, result
    assert not result.success and result.error, result
    assert TOKEN not in result.stdout + result.stderr
    host.assert_unharmed()


# Native code is out of the audit hook's sight: it must not load any but the standard library's.
NATIVE = "import _imp, importlib.util, os, shutil, sys\n" \
         "so = [os.path.join(p, f) for p in sys.path if os.path.isdir(p) for f in os.listdir(p) if f.startswith({module!r})][0]\n"
NATIVE_ATTACKS = {
    # an extension module copied into the box (a real attack would write its own)
    "extension-from-the-box": NATIVE.format(module="_bisect") + "shutil.copyfile(so, 'evil.so')\n"
                              "_imp.create_dynamic(importlib.util.spec_from_file_location('_bisect', 'evil.so'))\n"
                              "print('ESCAPED')",
    # a refused module under a package name: its init function is found by the last component
    "refused-module-renamed": NATIVE.format(module="_posixsubprocess") +
                              "m = _imp.create_dynamic(importlib.util.spec_from_file_location('x._posixsubprocess', so))\n"
                              "print('ESCAPED')",
}


@pytest.mark.parametrize("layers", MODES[:2])
@pytest.mark.parametrize("attack", list(NATIVE_ATTACKS))
def test_the_hook_loads_no_native_code_but_the_standard_librarys(attack, layers):
    result = run_python(NATIVE_ATTACKS[attack], layers=layers)
    assert "ESCAPED" not in result.stdout and not result.success
    assert "not allowed" in result.error or "failed to map" in result.error, result.error


def test_environment_holds_nothing_from_the_host(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", TOKEN)
    result = run_python("import os\nprint(dict(os.environ))")
    assert result.success, result.error
    assert TOKEN not in result.stdout and "NANOCHAT_TEST_SECRET" not in result.stdout


# --- floods: the box counts and caps what it holds, and is gone (quickly) after the call

FLOODS = {
    "mkdir": "import os\nn = 0\ntry:\n    while True:\n        os.mkdir(f'd{{n}}')\n        n += 1\n"
             "finally:\n    print('MADE', n)",
    "files": "n = 0\ntry:\n    while True:\n        open(f'f{{n}}', 'w').close()\n        n += 1\nfinally:\n"
             "    print('MADE', n)",
    "deep-tree": "import os\nn = 0\ntry:\n    for _ in range(3000):\n        os.mkdir('d')\n        os.chdir('d')\n"
                 "        n += 1\nfinally:\n    print('MADE', n)",
    # the cap used to be a list in the audit hook's closure, reachable from a traceback frame's locals
    "counter-through-traceback": "try:\n    open('/nonexistent-dir/x', 'w')\nexcept Exception as e:\n"
                                 "    tb = e.__traceback__\n    while tb:\n"
                                 "        for v in list(tb.tb_frame.f_locals.values()):\n"
                                 "            if isinstance(v, list) and v and isinstance(v[0], int):\n"
                                 "                v[0] = -10 ** 9\n        tb = tb.tb_next\n"
                                 "n = 0\ntry:\n    while True:\n        open(f'f{{n}}', 'w').close()\n        n += 1\n"
                                 "finally:\n    print('MADE', n)",
    "counter-through-tracer": "import sys\ndef tracer(frame, event, arg):\n"
                              "    frame.f_locals.clear()\n    return tracer\ntry:\n    sys.settrace(tracer)\n"
                              "except PermissionError:\n    pass\n"
                              "n = 0\ntry:\n    while True:\n        open(f'f{{n}}', 'w').close()\n        n += 1\n"
                              "finally:\n    print('MADE', n)",
}


def _flood_modes():
    capped_by_kernel = "box-tmpfs" in GUARDS
    return MODES[:2] + [pytest.param(KERNEL, id="kernel-only", marks=pytest.mark.skipif(
        not capped_by_kernel, reason=f"no private tmpfs for the box on this host: {GUARDS}"))]


@pytest.mark.parametrize("layers", _flood_modes())
@pytest.mark.parametrize("flood", list(FLOODS))
def test_floods_are_capped_and_the_box_is_removed_within_the_time_limit(flood, layers):
    started = time.monotonic()
    result = run_python("import os\nprint('BOX', os.getcwd())\n" + FLOODS[flood].format(), timeout=3.0, layers=layers)
    assert time.monotonic() - started < 3.0 + 1.5
    assert not result.success
    box = result.stdout.split("BOX ", 1)[1].split()[0]
    made = int(result.stdout.split("MADE ", 1)[1].split()[0])
    assert made <= _MAX_BOX_ENTRIES
    assert not os.path.exists(box)


def test_big_files_and_descriptor_floods_fail_cleanly():
    result = run_python("open('big', 'wb').write(b'x' * (2 << 20))")
    assert not result.success and "File too large" in result.error
    result = run_python("fs = [open(f'f{i}', 'w') for i in range(50)] + [open('f0') for i in range(100)]")
    assert not result.success and "Too many open files" in result.error


# --- clean-up never raises and never outlives the call


def _deep_tree(top: Path, depth: int, outside_file: Path) -> None:
    """A `depth`-deep chain of directories, with a file and a symlink to `outside_file` at every 500th level
    (built with descriptors: its paths are far longer than PATH_MAX)."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY)
    for level in range(depth):
        if level % 500 == 0:
            os.close(os.open("f", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
            os.symlink(outside_file, "link", dir_fd=fd)
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(fd)


@pytest.fixture
def fast_tmp(tmp_path):
    """A folder on tmpfs where there is one: on a disk each rmdir can cost a millisecond, which is not under test."""
    if not os.path.isdir("/dev/shm"):
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:
        yield Path(folder)


def test_a_3000_deep_tree_is_removed_without_recursion_and_without_following_links(fast_tmp):
    tmp_path = fast_tmp
    keep = tmp_path / "keep.txt"
    keep.write_text("stays")
    _deep_tree(tmp_path / "box", 3000, keep)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(100)  # an iterative removal does not care
    try:
        started = time.monotonic()
        assert _remove_tree(str(tmp_path / "box"), time.monotonic() + 30)
    finally:
        sys.setrecursionlimit(limit)
    assert time.monotonic() - started < 10
    assert not (tmp_path / "box").exists() and keep.read_text() == "stays"


def test_clean_up_past_its_deadline_finishes_in_the_background_and_never_raises(tmp_path, caplog):
    _deep_tree(tmp_path / "box", 200, tmp_path / "nothing")
    started = time.monotonic()
    _discard(str(tmp_path / "box"), deadline=time.monotonic() - 1)  # already late
    assert time.monotonic() - started < 1
    assert "in the background" in caplog.text
    for thread in [t for t in threading.enumerate() if t.name == "nanochat-sandbox-cleanup"]:
        thread.join(timeout=10)
    assert not (tmp_path / "box").exists()
    (tmp_path / "a-file").write_text("not a directory")
    _discard(str(tmp_path / "a-file"), deadline=time.monotonic() + 5)  # fails, says so, raises nothing
    assert "could not remove" in caplog.text


# --- which guards are in force


def _landlock_abi() -> int:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc.syscall(ctypes.c_long(444), None, ctypes.c_long(0), ctypes.c_long(1))


def test_the_guards_in_force_are_reported_and_match_what_the_kernel_offers(caplog):
    result = run_python("print(1)")
    assert result.success and result.guards == GUARDS
    assert {"rlimits", "audit-hook"} <= set(GUARDS)
    if sys.platform == "linux" and _landlock_abi() >= 1:
        assert "landlock-fs" in GUARDS
    if sys.platform == "linux" and os.uname().machine == "x86_64":
        assert "seccomp" in GUARDS
    assert run_python("print(1)", layers=HOOK).guards in (("rlimits", "audit-hook"),
                                                          ("uid-nobody", "rlimits", "audit-hook"))
    assert "audit-hook" not in run_python("print(1)", layers=KERNEL).guards
    with pytest.raises(ValueError, match="layers"):
        run_python("print(1)", layers=("seatbelt",))


def test_ordinary_programs_still_run_under_every_layer():
    code = (
        "import math, json, re, collections, itertools, functools, heapq, bisect, random, string, datetime\n"
        "import decimal, fractions, statistics, hashlib, zlib, os, tempfile, typing, dataclasses\n"
        "os.makedirs('a/b', exist_ok=True)\nopen('a/b/x.txt', 'w').write('hi')\nos.rename('a/b/x.txt', 'a/y.txt')\n"
        "with tempfile.TemporaryDirectory() as d:\n    open(os.path.join(d, 'z'), 'w').write('z')\n"
        "import shutil\nshutil.rmtree('a')\nprint(open(os.devnull, 'w').write('quiet'))\n"
        "print(math.isqrt(49), json.dumps(sorted(collections.Counter('abca').items())), hashlib.sha256(b'').hexdigest()[:8])\n"
        "import os, signal\nsignal.signal(signal.SIGUSR1, lambda *a: print('own signal'))\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
    )
    for layers in (BOTH, HOOK) + ((KERNEL,) if KERNEL_CONFINES else ()):
        result = run_python(code, layers=layers)
        assert result.success, (layers, result.error, result.stderr)
        assert result.stdout == "5\n7 [[\"a\", 2], [\"b\", 1], [\"c\", 1]] e3b0c442\nown signal\n", layers
