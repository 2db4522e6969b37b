"""Shared test setup: one torch thread per process, no Ray left running between modules, and small real file
systems for full-disk tests.

The suite runs on 2-core machines where Ray workers, sandboxed programs and torch share the
cores; tiny models gain nothing from intra-op threads and oversubscription makes them slower.
"""
import subprocess
import sys
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
