"""A CPU policy worker keeps freed host memory for reuse (r1pipe.workers.allocator): its training steps
page-fault a small fraction of what the same steps do under glibc's default thresholds. Each side runs in a
fresh interpreter, since the thresholds are per process."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from r1pipe.workers.allocator import retain_freed_memory

STEPS = textwrap.dedent("""
    import resource, sys, torch
    import r1pipe.workers.policy as policy
    from r1pipe.model import ModelConfig, Transformer, save_pretrained
    from r1pipe.workers import PolicyConfig, build_batch
    if sys.argv[2] == "default":
        policy.retain_freed_memory = lambda: False
    save_pretrained(Transformer(ModelConfig.preset("tiny"), seed=0), sys.argv[1])
    worker = policy.PolicyWorker(0, 1, sys.argv[1], PolicyConfig(micro_batch_size=32, num_threads=1))
    g = torch.Generator().manual_seed(0)
    V = worker.model.config.vocab_size
    batch = build_batch([torch.randint(3, V, (10,), generator=g).tolist() for _ in range(48)],
                        [torch.randint(3, V, (24,), generator=g).tolist() for _ in range(48)], pad_id=0)
    adv, n = torch.randn(48, generator=g), float(batch.response_mask.sum())
    for _ in range(2):
        worker.train_step(batch, None, adv, None, n, 48.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        worker.train_step(batch, None, adv, None, n, 48.0)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def faults(tmp_path: Path, mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS, str(tmp_path / mode), mode], capture_output=True, text=True,
                         timeout=300, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not retain_freed_memory(), reason="the C library is not glibc")
def test_a_cpu_policy_worker_reuses_freed_memory(tmp_path):
    default, retained = faults(tmp_path, "default"), faults(tmp_path, "retained")
    assert default > 1000, default  # the default thresholds fault a step's large blocks in again
    assert retained < default / 4, (retained, default)
