"""Shared test setup: one torch thread per process, no Ray left running between modules, small real file
systems for full-disk tests, and runs killed in a subprocess while the test does other work.

The suite runs on 2-core machines where Ray workers, sandboxed programs and torch share the
cores; tiny models gain nothing from intra-op threads and oversubscription makes them slower.
"""
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch

torch.set_num_threads(1)

FAKE_VLLM = Path(__file__).parent / "fake_vllm"  # the fake `vllm` package (tests/fake_vllm/vllm)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs for a test module (the stages' own ray_init then joins it)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def no_ray_left_running():
    """Every stage that trains or samples starts Ray when it is not up (r1pipe.workers.cluster.ray_init); a test
    module that ran one in this process leaves no cluster behind for the next module's own `ray.init`."""
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(megabytes) mounts a tmpfs of that size under tmp_path and returns its path (unmounted after
    the test): a real file system that fills up. Skips the test where mounting is not permitted (not root)."""
    mounts = []

    def mount(megabytes: int) -> Path:
        path = tmp_path / f"disk{len(mounts)}"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}M", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _drop_vllm_modules() -> None:
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        del sys.modules[name]


@pytest.fixture
def fake_vllm(monkeypatch):
    """The fake `vllm` package importable in this process (its RECORD empty) for the test, gone after it; its
    log-probs follow FAKE_VLLM_LOGPROBS (set it with monkeypatch.setenv before building an engine)."""
    monkeypatch.syspath_prepend(str(FAKE_VLLM))
    monkeypatch.delenv("FAKE_VLLM_RECORD", raising=False)
    _drop_vllm_modules()
    import vllm

    vllm.RECORD.clear()
    yield vllm
    _drop_vllm_modules()


class KilledRun:
    """A command run in its own session (stdout dropped, stderr to `log`) whose process group a thread SIGKILLs
    once `marker` exists (polled every 50 ms), or when it has not appeared after `timeout_s`. The test runs its
    uninterrupted reference in the meantime and calls `wait()` before it looks at what the killed run left."""

    def __init__(self, argv: list[str], marker: Path, log: Path, timeout_s: float, cwd: Path | None = None,
                 env: dict[str, str] | None = None):
        self.marker, self.log, self.timeout_s = marker, log, timeout_s
        self._err = open(log, "wb")
        self.proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **(env or {})}, start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=self._err)
        self._thread = threading.Thread(target=self._watch, name=f"kill-at-{marker.name}", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        deadline = time.time() + self.timeout_s
        while not self.marker.exists() and self.proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        self.kill()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def wait(self) -> str:
        """Wait until the run is killed (or ended by itself); returns the end of its stderr, for messages."""
        self._thread.join()
        self._err.close()
        return self.log.read_bytes().decode(errors="replace")[-3000:]


@pytest.fixture
def killed_run(tmp_path):
    """killed_run(argv, marker, timeout_s=300, cwd=None, env=None) starts a KilledRun (its stderr in tmp_path);
    any run still alive when the test ends is killed."""
    runs: list[KilledRun] = []

    def start(argv: list[str], marker: Path, timeout_s: float = 300, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> KilledRun:
        runs.append(KilledRun(argv, marker, tmp_path / f"killed-{len(runs)}.stderr", timeout_s, cwd, env))
        return runs[-1]

    yield start
    for run in runs:
        run.kill()
        run.wait()
