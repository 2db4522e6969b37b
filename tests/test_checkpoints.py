"""Checkpoint writing (r1pipe.tracking.checkpoints): the free-space check, atomic replacement, and a real
full disk (a small tmpfs) met before and during a write, by torch.save and by DCP as the stages write."""
import errno
import math
import re

import pytest
import torch

from r1pipe.tracking.checkpoints import (
    DiskFullError, atomic_write, check_free_space, check_room_for_checkpoints, free_bytes, latest_checkpoint,
    ran_out_of_space, write_checkpoint,
)
from r1pipe.workers.sharding import save_sharded

MB = 2**20


def test_free_space_check_names_the_directory_and_what_it_needs(tmp_path):
    check_free_space(tmp_path, 1)
    need = free_bytes(tmp_path) + 5 * MB + 1
    with pytest.raises(DiskFullError) as info:
        check_free_space(tmp_path / "not" / "yet", need)  # a directory to be created: its file system counts
    m = re.fullmatch(r"no space left on (.+): need (\d+) MB \((\d+) MB free\)", str(info.value))
    assert m and m[1] == str(tmp_path / "not" / "yet") and int(m[2]) == math.ceil(need / MB), str(info.value)
    assert info.value.need_bytes == need


def test_room_for_the_checkpoints_to_come_counts_their_peak(tmp_path):
    """keep=2: a new checkpoint is written beside the two kept ones, so a run's checkpoints need up to three
    at once; those on disk count as written."""
    size = free_bytes(tmp_path) // 5 * 2  # two fit, three do not
    check_room_for_checkpoints(tmp_path, size, saves=2, keep=2)
    with pytest.raises(DiskFullError) as info:
        check_room_for_checkpoints(tmp_path, size, saves=3, keep=2)
    assert info.value.need_bytes == 3 * size
    for step in (1, 2):  # two already written (tiny: the estimate, not their size, is the larger)
        write_checkpoint(tmp_path, step, lambda d: None, {})
    check_room_for_checkpoints(tmp_path, size, saves=10, keep=2)  # one more at a time
    with pytest.raises(DiskFullError):
        check_room_for_checkpoints(tmp_path, size, saves=3, keep=0)  # keep all: three more


def test_atomic_write_replaces_the_target_only_once_complete(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_text("old")
    with pytest.raises(ValueError, match="bug"):  # not a full disk: raised as it was
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise ValueError("bug")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    with atomic_write(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    model = tmp_path / "model"  # a directory over a directory
    for text in ("a", "b"):
        with atomic_write(model) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text(text)
    assert (model / "weights").read_text() == "b" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "model"]


def test_a_full_disk_is_recognised_through_wrappers():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("checkpoint failed") from e
    except RuntimeError as wrapped:
        assert ran_out_of_space(wrapped)
    assert ran_out_of_space(RuntimeError("remote traceback ... OSError: [Errno 28] No space left on device"))
    assert not ran_out_of_space(RuntimeError("unexpected pos 704 vs 598"))  # alone; the free space decides then
    assert not ran_out_of_space(OSError(errno.EACCES, "Permission denied"))


def write_torch(directory, nbytes):
    torch.save({"weights": torch.zeros(nbytes // 4)}, directory / "trainer.pt")


def write_dcp(directory, nbytes):
    model = torch.nn.Linear(nbytes // 12, 1, bias=False)  # weights + two AdamW moments
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, nbytes // 12)).sum().backward()
    optimizer.step()
    save_sharded(directory / "sharded", model, optimizer)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("write", [write_torch, write_dcp], ids=["torch.save", "dcp"])
def test_a_disk_that_fills_during_a_checkpoint_leaves_the_last_one_and_says_so(small_disk, write):
    root = small_disk(4) / "checkpoints"
    write_checkpoint(root, 1, lambda d: write(d, MB), {"note": "fits"})
    free = free_bytes(root)
    with pytest.raises(DiskFullError, match=rf"^no space left on {re.escape(str(root))}: need \d+ MB"):
        # the estimate was too low (need_bytes 1 MB): the write itself runs out of space
        write_checkpoint(root, 2, lambda d: write(d, 6 * MB), {"note": "too big"}, need_bytes=MB)
    assert sorted(p.name for p in root.iterdir()) == ["step_000001"]  # no partial step_000002
    assert free_bytes(root) == free
    path, state = latest_checkpoint(root)
    assert path.name == "step_000001" and state["note"] == "fits"


def test_a_checkpoint_that_cannot_fit_is_refused_before_writing(small_disk):
    root = small_disk(2) / "checkpoints"
    calls = []
    with pytest.raises(DiskFullError, match=r"need 3 MB"):
        write_checkpoint(root, 1, calls.append, {}, need_bytes=3 * MB)
    assert calls == [] and list(root.iterdir()) == []
