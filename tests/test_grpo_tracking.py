"""metrics.jsonl, TensorBoard events and PNG plots; resume drops rows past the checkpoint (all of them when
there was none), in the TensorBoard events too."""
import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from r1pipe.tracking import MetricsLogger, plot_metrics, read_metrics


def test_logger_writes_jsonl_tensorboard_and_resume_truncates(tmp_path):
    with MetricsLogger(tmp_path) as log:
        for step in range(1, 5):
            log.log(step, {"reward/mean": 0.1 * step, "kl": float("nan"), "note": "x"})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["kl"] is None and rows[2]["reward/mean"] == 0.1 * 3
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    # a run killed after logging step 4 but checkpointed at step 2 resumes at step 3
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "rew')  # torn line from SIGKILL
    with MetricsLogger(tmp_path, resume_step=2, tensorboard=False) as log:
        log.log(3, {"reward/mean": 0.9})
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])


def test_plots_are_pngs(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(1, 4):
            log.log(step, {"reward/mean": step, "accuracy": step / 4, "response_length/mean": 10 + step, "kl": 0.01})
    paths = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "plots")
    assert {p.stem for p in paths} == {"reward", "accuracy", "response_length", "kl"}
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def tensorboard_steps(log_dir, tag="reward/mean") -> list[int]:
    """Steps of `tag` in the TensorBoard events under log_dir/tensorboard, as TensorBoard reads them."""
    acc = EventAccumulator(str(log_dir / "tensorboard"))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_restart_without_a_checkpoint_starts_the_log_afresh(tmp_path):
    """A run stopped before its first checkpoint, started again, logs step 0 once and keeps no old events."""
    with MetricsLogger(tmp_path) as log:
        log.log(0, {"heldout_accuracy": 0.1})
        log.log(1, {"reward/mean": 0.2})
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "reward.png").write_bytes(b"old")
    with MetricsLogger(tmp_path, resume_step=0) as log:  # no checkpoint: the stage starts at step 0 again
        log.log(0, {"heldout_accuracy": 0.1})
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0]
    assert tensorboard_steps(tmp_path) == [] and tensorboard_steps(tmp_path, "heldout_accuracy") == [0]
    assert not (tmp_path / "plots" / "reward.png").exists()  # drawn from the old log


def test_resume_keeps_the_events_up_to_the_checkpoint_only(tmp_path):
    with MetricsLogger(tmp_path) as log:
        for step in range(0, 5):
            log.log(step, {"reward/mean": 0.1 * step})
    with MetricsLogger(tmp_path, resume_step=2) as log:  # killed after step 4, resumed from the step-2 checkpoint
        log.log(3, {"reward/mean": 0.9})
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]
    assert tensorboard_steps(tmp_path) == [0, 1, 2, 3]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [round(e.value, 6) for e in acc.Scalars("reward/mean")] == [0.0, 0.1, 0.2, 0.9]
