"""The errors a user can fix, and how an `r1pipe` command reports any error.

Every problem the user can act on (a recipe value, a data file, a model directory, the cluster,
the machine's resources or disk) is raised as a subclass of `UserError` whose message names the
thing to fix. An `r1pipe` command prints such an error as one or two lines on stderr and exits
with status 2; any other exception is reported in one line too (status 1), with the traceback
only under `--debug`.

Errors raised inside Ray actors reach the driver wrapped (RayTaskError, whose `.cause` is the
original exception, or an ActorDiedError that keeps only the text of its creation task's
traceback, whose last line names the exception); `explain` unwraps both, so the user sees the
cause, not Ray's envelope.
"""
from __future__ import annotations

import errno
import re
from dataclasses import dataclass


class UserError(Exception):
    """Something the user can fix; the message names it. `r1pipe` prints it as one or two lines, exit 2."""


class ConfigError(UserError, ValueError):
    """A recipe or override that cannot run; the message names the key or value."""


class DataError(UserError, ValueError):
    """A data source that cannot be used: missing, unreadable, empty, or without a usable row."""


class ModelError(UserError, ValueError):
    """A model or tokenizer directory that cannot be loaded (missing, incomplete or corrupt files)."""


class ClusterError(UserError, ConnectionError):
    """The Ray cluster named by `cluster.address` cannot be reached or joined."""


class ResourceError(UserError, RuntimeError):
    """The workers ask for more CPUs, GPUs or memory than the cluster has (the message has the arithmetic)."""


# exit statuses of an `r1pipe` command
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as shells report it
EXIT_TERMINATED = 143  # SIGTERM: 128 + SIGTERM


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM (by the r1pipe CLI's handler), so that `finally` blocks
    and Ray's exit hooks run as they do for Ctrl-C."""


@dataclass(frozen=True)
class Explained:
    """What to print for an exception: its lines (one or two) and the exit status."""

    lines: tuple[str, ...]
    status: int


def _user_error_names() -> set[str]:
    names, todo = set(), [UserError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo += cls.__subclasses__()
    return names


_RAISED_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)|UserError|InsufficientResources)"
                          r"(?:\(\w+\))?: (.+)$")


def unwrap(exc: BaseException) -> BaseException:
    """The original exception inside Ray's wrappers (RayTaskError.cause, possibly nested)."""
    seen = set()
    while id(exc) not in seen and type(exc).__module__.startswith("ray.") and isinstance(getattr(exc, "cause", None), BaseException):
        seen.add(id(exc))
        exc = exc.cause  # type: ignore[attr-defined]
    return exc


def _raised_in_text(text: str) -> tuple[str, str] | None:
    """(exception class name, message) of the last `Name: message` line of a traceback's text (Ray's
    rendering keeps the `  File "..."` lines and the final line, not the "Traceback" header)."""
    if '\n  File "' not in text:
        return None
    for line in reversed(text.strip().splitlines()):
        m = _RAISED_LINE.match(line.strip())
        if m:
            return m.group(1), m.group(2)
    return None


def _short(text: str, limit: int = 2) -> list[str]:
    lines = [line.rstrip() for line in text.strip().splitlines() if line.strip()]
    return lines[:limit] or [""]


def explain(exc: BaseException, prog: str) -> Explained:
    """The one or two stderr lines (each starting with `prog: `) and the exit status for `exc`."""
    if isinstance(exc, KeyboardInterrupt):
        return Explained((f"{prog}: interrupted (Ctrl-C); rerun the same command to continue from the last checkpoint",),
                         EXIT_INTERRUPTED)
    if isinstance(exc, Terminated):
        return Explained((f"{prog}: terminated (SIGTERM); rerun the same command to continue from the last checkpoint",),
                         EXIT_TERMINATED)
    exc = unwrap(exc)
    if isinstance(exc, UserError):
        return Explained(tuple(f"{prog}: {line}" if i == 0 else f"{prog}:   {line.strip()}"
                               for i, line in enumerate(_short(str(exc)))), EXIT_USER_ERROR)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = exc.filename or "the disk"
        return Explained((f"{prog}: no space left on the device of {where}",), EXIT_USER_ERROR)
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        text = f"{exc.strerror or type(exc).__name__}: {exc.filename}" if exc.filename else _short(str(exc), 1)[0]
        return Explained((f"{prog}: {text}",), EXIT_USER_ERROR)
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        first = _short(str(exc), 1)[0]
        return Explained((f"{prog}: out of memory{': ' + first if first else ''}",
                          f"{prog}:   lower the batch or micro-batch size, the model size or the number of workers"),
                         EXIT_USER_ERROR)
    raised = _raised_in_text(str(exc))  # an actor that died in its constructor keeps only the text
    if raised is not None:
        name, message = raised
        if name in _user_error_names():
            return Explained((f"{prog}: {message}",), EXIT_USER_ERROR)
        return Explained((f"{prog}: error in a Ray worker: {name}: {message}",
                          f"{prog}:   rerun with --debug for the traceback"), EXIT_INTERNAL_ERROR)
    first = _short(str(exc), 1)[0]
    return Explained((f"{prog}: unexpected error: {type(exc).__name__}{': ' + first if first else ''}",
                      f"{prog}:   rerun with --debug for the traceback"), EXIT_INTERNAL_ERROR)
