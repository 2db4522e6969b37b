"""Step checkpoints of a training stage (`checkpoints/step_000012/`: model, optimizer, RNG, trainer
state) and the one way every checkpoint and saved model is written: `atomic_write`.

`atomic_write` checks the free space of the target's file system against the bytes the write needs,
lets the caller write under a temporary name beside the target, and renames it into place only once
complete; on any failure the partial copy is removed. A run killed at any instant (SIGKILL included)
therefore leaves either the old or the new checkpoint intact, and a full disk ends in a DiskFullError
("no space left on <dir>: need N MB") with nothing half-written left behind.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from r1pipe.errors import UserError

STATE_FILE = "trainer_state.json"
TMP_PREFIX = ".tmp_"
FULL_BYTES = 2**20  # a write that failed with less than this left free ran out of space


class DiskFullError(UserError, RuntimeError):
    """The file system holding `directory` has less free space than a write needs (checked before the
    write, or the write itself ran out of space). A user error: the CLI prints it as one line, exit 2."""

    def __init__(self, directory: str | Path, need_bytes: int, free_bytes: int | None = None):
        self.directory, self.need_bytes, self.free_bytes = Path(directory), int(need_bytes), free_bytes
        free = "" if free_bytes is None else f" ({free_bytes / 2**20:.0f} MB free)"
        super().__init__(f"no space left on {directory}: need {_megabytes(need_bytes)} MB{free}")

    def __reduce__(self):  # rebuilt from its fields when it crosses from a Ray worker
        return DiskFullError, (self.directory, self.need_bytes, self.free_bytes)


def _megabytes(nbytes: int) -> int:
    return max(1, math.ceil(nbytes / 2**20))


def free_bytes(path: str | Path) -> int:
    """Bytes an unprivileged process may still write on the file system holding `path` (or, when
    `path` does not exist yet, its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


def tree_bytes(path: str | Path) -> int:
    """Bytes of the file at `path`, or of every file under the directory (0 when absent)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0


def check_free_space(directory: str | Path, need_bytes: int) -> None:
    """DiskFullError unless the file system holding `directory` has `need_bytes` free."""
    free = free_bytes(directory)
    if free < need_bytes:
        raise DiskFullError(directory, need_bytes, free)


def ran_out_of_space(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it wraps: its cause or context, or a Ray task error's cause) is
    ENOSPC, or reports it in its text (torch's zip writer and remote tracebacks only say it there)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e):
            return True
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_write(target: str | Path, need_bytes: int = 0) -> Iterator[Path]:
    """`with atomic_write(target, need_bytes) as tmp:` write a file or a directory at `tmp`; on leaving
    the block it replaces `target`. Before: DiskFullError when the target's file system has less than
    `need_bytes` free. On any exception the partial `tmp` is removed; one caused by a full disk (ENOSPC
    anywhere in the exception, or, as torch's writers report it only as "unexpected pos" or an iostream
    error, a file system left with less than FULL_BYTES or than the rest of the write needed) is raised
    as DiskFullError, from the original."""
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    check_free_space(parent, need_bytes)
    tmp = parent / f"{TMP_PREFIX}{target.name}"
    _remove(tmp)  # left by a run killed while writing it
    try:
        yield tmp
    except BaseException as e:
        short = free_bytes(parent) < max(FULL_BYTES, need_bytes - tree_bytes(tmp))
        _remove(tmp)
        # DCP's CheckpointException is a BaseException: only an interrupt or an exit passes as it is
        if not isinstance(e, (KeyboardInterrupt, SystemExit)) and (ran_out_of_space(e) or short):
            raise DiskFullError(parent, need_bytes, free_bytes(parent)) from e
        raise
    if target.is_dir() and tmp.is_dir():  # a directory cannot be renamed over a non-empty one
        old = parent / f"{TMP_PREFIX}old_{target.name}"
        _remove(old)
        os.replace(target, old)
        os.replace(tmp, target)
        _remove(old)
    else:
        if target.is_dir():
            _remove(target)
        os.replace(tmp, target)


def checkpoint_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def checkpoint_need(root: str | Path, estimate: int) -> int:
    """Bytes the next checkpoint under `root` needs: `estimate`, or the newest complete one's size when larger."""
    newest = latest_checkpoint(root)
    return max(int(estimate), tree_bytes(newest[0]) if newest else 0)


def check_room_for_checkpoints(root: str | Path, estimate: int, saves: int, keep: int) -> None:
    """Before training: DiskFullError unless the file system holding `root` has room for the `saves`
    checkpoints still to come at their peak. Each is written beside the `keep` kept ones before the
    oldest is dropped, so up to keep + 1 exist at once (every one, with keep <= 0); those already on
    disk count as written."""
    on_disk = len([p for p in Path(root).glob("step_*") if (p / STATE_FILE).exists()])
    peak = on_disk + saves if keep <= 0 else min(keep + 1, on_disk + saves)
    check_free_space(root, max(0, peak - on_disk) * checkpoint_need(root, estimate))


def write_checkpoint(root: str | Path, step: int, write: Callable[[Path], None], state: dict[str, Any],
                    keep: int = 2, need_bytes: int = 0) -> Path:
    """Checkpoint `step` under `root` through atomic_write: `write(dir)` fills a new directory, the trainer
    state is added, and the whole is published as step_NNNNNN; then all but the newest `keep` are dropped.
    Free space is checked first against checkpoint_need(root, need_bytes)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{TMP_PREFIX}*"):  # partial ones of a killed run
        _remove(stale)
    final = checkpoint_dir(root, step)
    with atomic_write(final, checkpoint_need(root, need_bytes)) as staging:
        staging.mkdir()
        write(staging)
        (staging / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=1))
    for old in sorted(root.glob("step_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint and its trainer state, or None."""
    for path in sorted(Path(root).glob("step_*"), reverse=True):
        state_file = path / STATE_FILE
        if state_file.exists():
            try:
                return path, json.loads(state_file.read_text())
            except json.JSONDecodeError:
                continue
    return None
