"""metrics.jsonl, TensorBoard events and PNG plots; resume drops rows past the checkpoint."""
import json

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
