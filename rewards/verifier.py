"""A pool of math-verify child processes with a hard deadline per call.

sympy can hang on adversarial input, and SIGALRM only works in the main thread (never in a
thread pool or a Ray actor's worker thread). So each comparison is sent to a child process; if
it does not answer in time the child is killed and replaced, and the call reports a timeout.
Safe to call from many threads: each call checks one child out of the pool.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

_START_TIMEOUT_S = 60.0  # importing sympy on a loaded machine


@dataclass
class ServerReply:
    equal: bool
    timed_out: bool = False
    error: str | None = None


class _Server:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "r1pipe.rewards.mv_server"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
        )
        self._buf = b""
        self.ready = False

    def _readline(self, deadline: float) -> bytes | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError("verifier process exited")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def wait_ready(self, deadline: float) -> None:
        if not self.ready:
            line = self._readline(deadline)
            if line is None:
                raise TimeoutError("verifier process did not start in time")
            self.ready = True

    def ask(self, pred: str, gold: str, timeout_s: float) -> ServerReply | None:
        """The reply, or None on timeout (the caller must then kill this server)."""
        self.wait_ready(time.monotonic() + _START_TIMEOUT_S)
        self.proc.stdin.write((json.dumps({"pred": pred, "gold": gold}) + "\n").encode())
        self.proc.stdin.flush()
        line = self._readline(time.monotonic() + timeout_s)
        if line is None:
            return None
        msg = json.loads(line)
        return ServerReply(bool(msg["equal"]), False, msg.get("error"))

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:
            pass


class VerifierPool:
    """At most `size` math-verify processes, started on first use, replaced when killed."""

    def __init__(self, size: int = 2) -> None:
        if size < 1:
            raise ValueError("VerifierPool size must be >= 1")
        self.size = size
        self._idle: queue.LifoQueue[_Server] = queue.LifoQueue()
        self._lock = threading.Lock()
        self._live = 0
        self.timeouts = 0
        self.restarts = 0

    def _checkout(self) -> _Server:
        while True:
            try:
                return self._idle.get(timeout=0.05)
            except queue.Empty:
                pass
            with self._lock:  # fewer live than allowed (first use, or one was killed): start one
                if self._live < self.size:
                    self._live += 1
                    break
        try:
            return _Server()
        except Exception:
            with self._lock:
                self._live -= 1
            raise

    def _discard(self, server: _Server) -> None:
        server.kill()
        with self._lock:
            self._live -= 1
            self.restarts += 1

    def verify(self, pred: str, gold: str, timeout_s: float) -> ServerReply:
        """math-verify's default `verify(parse(gold), parse(pred))` on the texts as given (a bare
        LaTeX answer should come wrapped in `$...$`)."""
        server = self._checkout()
        try:
            reply = server.ask(pred, gold, timeout_s)
        except Exception as exc:  # dead or wedged child: replace it, report the error
            self._discard(server)
            return ServerReply(False, False, f"verifier process failed: {exc!r}")
        if reply is None:
            self._discard(server)
            with self._lock:
                self.timeouts += 1
            return ServerReply(False, True, f"math-verify exceeded {timeout_s:.1f}s")
        self._idle.put(server)
        return reply

    def start(self) -> None:
        """Start every process now, without waiting: they import sympy while the caller goes on, so the
        first answer that needs one does not wait for that (~0.5 s)."""
        with self._lock:
            while self._live < self.size:
                self._idle.put(_Server())
                self._live += 1

    def warm_up(self) -> None:
        """Start every process now and wait until each is ready (tests and benchmarks time steady state)."""
        servers = [self._checkout() for _ in range(self.size)]
        for s in servers:
            s.wait_ready(time.monotonic() + _START_TIMEOUT_S)
            self._idle.put(s)

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().kill()
            except queue.Empty:
                break
        with self._lock:
            self._live = 0


_default_pool: VerifierPool | None = None
_default_lock = threading.Lock()


def default_pool() -> VerifierPool:
    """The process-wide pool (one per Python process: each Ray worker gets its own)."""
    global _default_pool
    with _default_lock:
        if _default_pool is None:
            _default_pool = VerifierPool(size=max(1, min(2, os.cpu_count() or 1)))
            atexit.register(_default_pool.close)
        return _default_pool
