"""Starting or joining Ray as a recipe's `cluster` section says, failing fast when it cannot.

The address is checked first (r1pipe.cluster.check_cluster; "auto" is resolved as Ray does: RAY_ADDRESS,
else the cluster of the last `ray start` on this machine). Joining must then finish within
JOIN_TIMEOUT_S: Ray's client blocks the main thread while it retries, so a watchdog thread ends a join
that hangs after the TCP check passed (e.g. a port held by something other than a Ray head node) with
one line naming the address and exit status 2, and ends it at once on SIGTERM or Ctrl-C. After `ray.init` the SIGTERM handler that was in place before
(the r1pipe CLI's) is put back, as Ray replaces it with its own.
"""
from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import threading
import time
from typing import Any

import ray

from r1pipe.cluster import HINT, check_reachable, explicit_address
from r1pipe.errors import EXIT_USER_ERROR, ClusterError

try:  # where `ray start` records its cluster's address (how Ray itself resolves address="auto")
    from ray._private.services import find_bootstrap_address
except ImportError:  # a Ray that moved it: "auto" then relies on RAY_ADDRESS
    find_bootstrap_address = None

JOIN_TIMEOUT_S = 45.0  # the longest ray.init may take to join a cluster whose address answers


class JoinWatchdog:
    """While Ray joins a cluster (its client blocks the main thread, so no Python signal handler or
    exception runs there), a thread ends the process with one line on stderr: on SIGTERM or Ctrl-C
    at once (exit 143 / 130, seen through signal.set_wakeup_fd), or with exit status 2 when the join
    takes longer than `timeout_s`. Nothing local has started yet, so nothing is left behind."""

    def __init__(self, address: str, timeout_s: float):
        self.address, self.timeout_s = address, timeout_s
        self._signals_r, self._signals_w = os.pipe()
        self._stop_r, self._stop_w = os.pipe()
        os.set_blocking(self._signals_w, False)
        self._previous_fd: int | None = None
        self._thread = threading.Thread(target=self._watch, name="r1pipe-join-watchdog", daemon=True)

    def _watch(self) -> None:
        ready, _, _ = select.select([self._signals_r, self._stop_r], [], [], self.timeout_s)
        if self._stop_r in ready:
            return
        if self._signals_r in ready:
            signum = os.read(self._signals_r, 1)[0]
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            print(f"r1pipe: {name} while joining the Ray cluster at cluster.address={self.address}; stopped",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        print(f"r1pipe: cluster.address={self.address}: the Ray cluster did not accept this driver within "
              f"{self.timeout_s:g}s (is it a Ray head node of this Ray version?)", file=sys.stderr, flush=True)
        os._exit(EXIT_USER_ERROR)

    def __enter__(self) -> "JoinWatchdog":
        if threading.current_thread() is threading.main_thread():
            self._previous_fd = signal.set_wakeup_fd(self._signals_w, warn_on_full_buffer=False)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join()
        if self._previous_fd is not None:
            signal.set_wakeup_fd(self._previous_fd)
        for fd in (self._signals_r, self._signals_w, self._stop_r, self._stop_w):
            os.close(fd)


def ray_init(recipe: Any, join_timeout_s: float = JOIN_TIMEOUT_S, quiet: bool = False) -> None:
    """Start (or join) Ray as the recipe's `cluster` section says; a no-op when already up. `quiet`: no
    start-up lines and no worker output on the driver (a command that starts Ray only for itself, such as
    `r1pipe eval`; errors still reach the caller)."""
    if ray.is_initialized():
        return
    cluster = recipe.get("cluster", {}) or {}
    address = cluster.get("address")
    given = explicit_address(cluster)
    if given is None and address == "auto":
        recorded = find_bootstrap_address(None) if find_bootstrap_address else None
        if not recorded:
            raise ClusterError(f"cluster.address=auto: no running Ray cluster found on this machine; {HINT}")
        given = (recorded, "cluster.address (auto)")
    if given is not None:
        check_reachable(*given)
    local = given is None
    # an error inside an actor is reported once, by the driver that gets it (not again, with its traceback, when
    # the object holding it is dropped unread at shutdown)
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    # actors of a local cluster inherit this: no per-actor transformers load/save bars interleaved in the driver's log
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    sigterm = signal.getsignal(signal.SIGTERM)
    t0 = time.monotonic()
    try:
        with JoinWatchdog(given[0], join_timeout_s) if given is not None else contextlib.nullcontext():
            # "local": a Ray of this run's own, even when another is running on this machine (null never joins one)
            ray.init(address="local" if local else address, num_cpus=cluster.get("num_cpus") if local else None,
                     num_gpus=cluster.get("num_gpus") if local else None, include_dashboard=False, log_to_driver=not quiet,
                     logging_level=logging.ERROR if quiet else logging.INFO)
    except (ConnectionError, RuntimeError, ValueError) as e:
        if local:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClusterError(f"cluster.address={given[0]}: cannot join the Ray cluster after "
                           f"{time.monotonic() - t0:.0f}s: {first}") from e
    finally:
        if callable(sigterm) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)
