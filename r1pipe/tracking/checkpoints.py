"""Step checkpoints of a training stage: `checkpoints/step_000012/` (model, optimizer, RNG,
trainer state). A checkpoint is written under a temporary name and renamed only once complete,
so a run killed at any instant (SIGKILL included) leaves either the old or the new one intact.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"


def checkpoint_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def staging_dir(root: str | Path, step: int) -> Path:
    """Where a checkpoint is written before commit_checkpoint renames it (cleared first)."""
    path = Path(root) / f".tmp_step_{step:06d}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def commit_checkpoint(root: str | Path, staging: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write the trainer state, atomically publish the checkpoint, drop all but the newest `keep`."""
    (staging / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=1))
    final = checkpoint_dir(root, step)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    for old in sorted(Path(root).glob("step_*"))[:-keep] if keep > 0 else []:
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
