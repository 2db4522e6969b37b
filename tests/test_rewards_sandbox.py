"""Hostile programs in the sandbox: each fails (scores 0), returns within its timeout + 1 s, and
leaves no process and no file behind."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import pytest

from r1pipe.rewards import build_reward_fn
from r1pipe.rewards.sandbox import SandboxConfig, active_isolation, run_python

TIMEOUT_S = 2.0
PROJECT = Path(__file__).resolve().parents[1]
LAUNCHER_MARK = "_f=sys.argv[0];exec(compile("  # in the command line of every sandboxed interpreter
ISO = active_isolation()
STRONG = ISO.mode == "bwrap" or ISO.unique_uid  # a fresh uid or a pid namespace contains everything


def _leftovers(token: str) -> list[str]:
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            status = Path(entry.path, "status").read_text()
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "\nState:\tZ" in status:  # already dead, only waiting to be reaped
            continue
        uid = int(status.split("\nUid:\t", 1)[1].split()[0])
        if token in cmdline or LAUNCHER_MARK in cmdline or uid >= 2_000_000:
            found.append(f"{entry.name}: uid={uid} {cmdline[:120]}")
    return found


def _run_hostile(body: str, isolation: str = "auto", timeout_s: float = TIMEOUT_S):
    token = secrets.token_hex(6)
    code = body.replace("TOKEN", token)
    start = time.monotonic()
    res = run_python(code, timeout_s=timeout_s, memory_mb=512, config=SandboxConfig(isolation=isolation))
    elapsed = time.monotonic() - start
    assert elapsed < timeout_s + 1.0, f"took {elapsed:.2f}s"
    time.sleep(0.05)
    assert _leftovers(token) == []
    assert not res.ok
    # As a code completion it scores 0 too, within the same bound.
    reward = build_reward_fn({"code": 1.0}, code_timeout_s=timeout_s, code_memory_mb=512)
    start = time.monotonic()
    scored = reward(code, {"test_list": ["assert solve() == 42"], "test_imports": []})
    assert time.monotonic() - start < timeout_s + 1.0
    assert scored.total == 0.0
    time.sleep(0.05)
    assert _leftovers(token) == []
    return res, token


ISOLATIONS = ["auto", "rlimits"]


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_infinite_loop_is_killed(isolation):
    res, _ = _run_hostile("while True:\n    pass\n", isolation)
    assert res.timed_out


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_allocating_50_gb_fails_fast(isolation):
    res, _ = _run_hostile("x = bytearray(50 * 2**30)\nprint('allocated')\n", isolation)
    assert not res.timed_out and "MemoryError" in res.stderr and "allocated" not in res.stdout


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_printing_1_gb_is_cut(isolation):
    res, _ = _run_hostile("import sys\nblock = 'x' * 2**20\nfor _ in range(1024):\n    sys.stdout.write(block)\n",
                          isolation)
    assert res.output_truncated and len(res.stdout) < 200_000


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_background_child_does_not_outlive_the_run(isolation):
    # the child leaves the process group only under strong isolation (it could escape the fallback)
    escape = "os.setsid()\n        " if (isolation == "auto" and STRONG) else ""
    body = ("import os, sys\n"
            "if os.fork() == 0:\n"
            f"        {escape}os.execv('/bin/sh', ['sh', '-c', 'sleep 30; : TOKEN'])\n"
            "sys.exit(1)\n").replace("        ", "    ")
    _run_hostile(body, isolation)


@pytest.mark.skipif(not STRONG, reason="a fork bomb is only contained with a fresh uid or bubblewrap")
def test_fork_bomb_is_contained():
    res, _ = _run_hostile("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    assert res.timed_out


@pytest.mark.skipif(ISO.mode != "bwrap", reason="file isolation needs bubblewrap")
def test_writing_outside_the_temp_dir_leaves_nothing():
    targets = [Path.home() / ".r1pipe-hostile-TOKEN", PROJECT / ".r1pipe-hostile-TOKEN", Path("/tmp/r1pipe-hostile-TOKEN")]
    body = "".join(f"open({str(t)!r}, 'w').write('pwned')\n" for t in targets)
    res, token = _run_hostile(body)
    assert "Error" in res.stderr
    for t in targets:
        assert not Path(str(t).replace("TOKEN", token)).exists()


@pytest.mark.skipif(not ISO.private_network, reason="no private network namespace available")
@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_network_is_unreachable(isolation):
    res, _ = _run_hostile("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\nprint('connected')\n",
                          isolation)
    assert "connected" not in res.stdout and ("OSError" in res.stderr or "unreachable" in res.stderr)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_limits_are_in_force_from_the_programs_first_line(isolation):
    names = ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_CORE")
    res = run_python(f"import resource\nprint([resource.getrlimit(getattr(resource, n)) for n in {names!r}])",
                     timeout_s=2.0, memory_mb=300, config=SandboxConfig(isolation=isolation))
    # soft = hard for each, CPU: ceil(timeout) + 1 s soft (SIGXCPU), 1 s more hard; files 16 MB; no core dumps
    assert res.ok and res.stdout.strip() == str([(300 * 2**20,) * 2, (3, 4), (16 * 2**20,) * 2, (256, 256), (0, 0)])


def test_private_dir_is_writable_and_removed():
    res = run_python("import os\nopen('scratch.txt', 'w').write('ok')\nprint(os.getcwd())\nprint(open('scratch.txt').read())")
    assert res.ok and res.stdout.split()[-1] == "ok"
    assert not Path(res.stdout.split()[0]).exists() or ISO.mode == "bwrap"


def test_exit_status_and_streams():
    res = run_python("import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)")
    assert (res.returncode, res.stdout, res.stderr, res.timed_out) == (3, "out\n", "err\n", False)
    assert res.isolation == ISO.mode


def test_interpreter_in_a_hidden_directory_is_bound_back(monkeypatch):
    """A virtual environment under /tmp (CI clones live there) is hidden by the sandbox's fresh
    /tmp; its directory must be bound back read-only or bubblewrap cannot start Python."""
    from r1pipe.rewards import sandbox

    monkeypatch.setattr(sandbox.sys, "prefix", "/tmp/clone/.venv")
    binds = sandbox._interpreter_binds(["/tmp", "/dev/shm"])
    assert "/tmp/clone/.venv" in binds
    assert all(not b.startswith("/usr/") for b in binds)  # what stays visible is not re-bound


_TTY_PROBE = "import os\ntry:\n    os.close(os.open('/dev/tty', os.O_RDWR))\n    print('tty')\nexcept OSError:\n    print('no tty')\n"
_AUTOGROUP_PROBE = "print(open('/proc/self/autogroup').read().split()[0])"


def _in_child(body: str, isolation: str, with_terminal: bool) -> str:
    """Run `body` (Python; its result in the variable `out`) in a child process that has a controlling
    terminal (a pty, as a run started from an interactive shell has) or none; return `out`."""
    import json
    import pty
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp, "out.json")
        script = (f"import json\nfrom r1pipe.rewards.sandbox import SandboxConfig, run_python\n"
                  f"cfg = SandboxConfig(isolation={isolation!r})\n{body}\n"
                  f"open({str(result)!r}, 'w').write(json.dumps(out))\n")
        if not with_terminal:
            subprocess.run([sys.executable, "-c", script], start_new_session=True, check=True, timeout=60)
        else:
            pid, fd = pty.fork()  # the child leads a new session whose controlling terminal is the pty
            if pid == 0:
                os.execv(sys.executable, [sys.executable, "-c", script])
            try:
                while True:  # drain the terminal until the child exits
                    os.read(fd, 4096)
            except OSError:
                pass
            assert os.waitpid(pid, 0)[1] == 0
        return json.loads(result.read_text())


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_program_never_reaches_the_callers_terminal(isolation):
    """Started from a process with a controlling terminal, a run gets a session of its own: the
    program cannot open the terminal (nor push input into it)."""
    here = "import os\nos.close(os.open('/dev/tty', os.O_RDWR))\n"  # the caller itself has the terminal
    out = _in_child(f"{here}out = run_python({_TTY_PROBE!r}, config=cfg).stdout", isolation, with_terminal=True)
    assert out.strip() == "no tty"


@pytest.mark.skipif(not Path("/proc/self/autogroup").exists(), reason="no autogroup scheduling")
@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_run_without_a_terminal_stays_in_the_callers_scheduling_group(isolation):
    """With no terminal to protect, a run stays in the caller's session, i.e. its autogroup: its CPU
    share then follows its nice value instead of weighing as much as the caller's whole session."""
    body = (f"out = [open('/proc/self/autogroup').read().split()[0], "
            f"run_python({_AUTOGROUP_PROBE!r}, config=cfg).stdout.strip()]")
    caller, program = _in_child(body, isolation, with_terminal=False)
    assert program == caller
