"""Mistakes in a command's input: the one exception type for them, the checks that raise it, and how every
`nanochat-hf` command reports them.

The rule, applied by :func:`run_command` (``cli.main`` runs every command through it):

* An input error ends the command with ONE line on stderr, ``nanochat-hf <command>: error: <message>``, and exit
  status 2 (argparse's own status for a bad command line). Input errors are the exceptions that checking input
  raises: ``ValueError`` (:class:`UsageError` and every ``*Error`` of this package derive from it, and so do json's
  ``JSONDecodeError``, ``UnicodeDecodeError`` and huggingface_hub's ``HFValidationError``), ``OSError`` (a file or
  folder that is missing, unreadable or of the wrong kind; ``from_pretrained`` raises it for a model it cannot
  find), ``NotImplementedError`` (a combination the code does not support), and ``SystemExit("message")`` from a
  stage that stops itself with a message.
* Any other exception is a bug, and Python reports it as usual: the traceback, exit status 1.
* ``nanochat-hf --debug <command>`` or ``NANOCHAT_HF_DEBUG=1`` prints an input error's traceback too, above the
  line; the exit status stays 2.

Checks raise :class:`UsageError` with a message that says what is wrong, names the field or file, and says how to
fix it. This module imports nothing heavy: the error path of a command stays as cheap as its argument parsing.
"""

from __future__ import annotations

import math
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

DEBUG_ENV = "NANOCHAT_HF_DEBUG"
INPUT_ERRORS = (ValueError, OSError, NotImplementedError)


class UsageError(ValueError):
    """The command's input is wrong; the message names the field or file and says how to fix it."""


# ---------------------------------------------------------------------------------------------------------------
# Reporting


def debug_requested() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def one_line(err: BaseException) -> str:
    """The message of `err` on one line. An OSError of the system (errno and file) reads `FILE: reason`."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        message = f"{err.filename}: {err.strerror}"
    else:
        message = str(err.code if isinstance(err, SystemExit) else err) or type(err).__name__
    return " ".join(message.split())


def run_command(command: str, fn: Callable[[], object], debug: bool = False) -> None:
    """Run `fn` (a command's body) under the rule of this module's docstring."""
    debug = debug or debug_requested()
    try:
        fn()
    except SystemExit as exit:
        if not isinstance(exit.code, str):  # argparse's exit 2, a stage's own exit status, or a plain exit
            raise
        _report(command, exit, debug)
    except INPUT_ERRORS as err:
        _report(command, err, debug)


def _report(command: str, err: BaseException, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    message = one_line(err)
    prefix = f"nanochat-hf {command}: error: "
    # a stage stopping with SystemExit("nanochat-hf chat: error: ...") has already said who it is
    print(message if message.startswith("nanochat-hf ") else prefix + message, file=sys.stderr, flush=True)
    raise SystemExit(2) from None


# ---------------------------------------------------------------------------------------------------------------
# Checks


def looks_local(name: str) -> bool:
    """Whether `name` can only mean a local path (no Hub repo id is spelled like it), or means one here: an
    `owner/name` whose `owner` is a local folder."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "~", os.sep)) or (os.altsep and os.altsep in name):
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return "/" in name and Path(name).parent.is_dir()


def check_source(name: str, what: str) -> None:
    """Refuse, before anything loads, a local folder that does not exist (`from_pretrained` would take it for a
    malformed Hub repo id). `what` names the argument, e.g. "--model"."""
    if not Path(name).expanduser().exists() and looks_local(name):
        raise UsageError(f"{what}: no such folder: {name}; pass an existing folder or a Hub repo id (owner/name)")


@dataclass(frozen=True)
class Bound:
    """The values a numeric field accepts: `low`..`high` (inclusive; None: unbounded), strictly above `above`,
    and `off`, the one out-of-range value that means "derive it" or "turn it off" (-1)."""

    low: float | None = None
    high: float | None = None
    above: float | None = None
    off: int | None = None

    def admits(self, value: float) -> bool:
        if value == self.off:
            return True
        if isinstance(value, float) and math.isnan(value):
            return False
        return ((self.low is None or value >= self.low) and (self.high is None or value <= self.high)
                and (self.above is None or value > self.above))

    def describe(self) -> str:
        parts = []
        if self.above is not None:
            parts.append(f"greater than {self.above:g}")
        if self.low is not None and self.high is not None:
            parts.append(f"between {self.low:g} and {self.high:g}")
        elif self.low is not None:
            parts.append(f"at least {self.low:g}")
        elif self.high is not None:
            parts.append(f"at most {self.high:g}")
        text = " and ".join(parts)
        return text + (f", or {self.off}" if self.off is not None else "")


def check_bounds(args: object, bounds: dict[str, Bound]) -> None:
    """Refuse the first field of the dataclass `args` outside its bound (a None field is unset and passes), with
    the field's help text, which says what an `off` value means."""
    helps = {f.name: f.metadata.get("help", "") for f in fields(args)}
    for name, bound in bounds.items():
        value = getattr(args, name)
        if value is not None and not bound.admits(value):
            raise UsageError(f"--{name} {value}: must be {bound.describe()} ({helps[name]})")


def check_choice(args: object, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(args, name)
    if value not in choices:
        raise UsageError(f"--{name} {value!r}: use one of {', '.join(choices)}")
