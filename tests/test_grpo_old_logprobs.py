"""One update per batch needs no separate forward for the old log-probs: the update's own forward,
detached, gives them. The step (and its TIS weights and trainer/engine mismatch) equals the step
with the old log-probs from a separate forward (PolicyWorker in-process)."""
import torch

from test_grpo_weight_sync import tiny_model

from r1pipe.workers import PolicyConfig, PolicyWorker, build_batch


def test_own_forward_old_logprobs_give_the_same_step_tis_and_mismatch(tmp_path):
    model = tiny_model(tmp_path / "model")
    g = torch.Generator().manual_seed(0)
    batch = build_batch([torch.randint(3, 32, (5,), generator=g).tolist() for _ in range(4)],
                        [torch.randint(3, 32, (6,), generator=g).tolist() for _ in range(4)], pad_id=0)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    n_tok = float(batch.response_mask.sum())
    cfg = PolicyConfig(lr=1e-2, micro_batch_size=2)
    separate, fused = PolicyWorker(0, 1, model, cfg), PolicyWorker(0, 1, model, cfg)
    old = separate.logprobs(batch)
    engine = old + 0.3 * torch.randn(old.shape, generator=g) * batch.response_mask  # an engine that disagrees
    a = separate.train_step(batch, old, adv, None, n_tok, 4.0, engine_logp=engine, tis_cap=1.2)
    b = fused.train_step(batch, None, adv, None, n_tok, 4.0, engine_logp=engine, tis_cap=1.2)
    for key in ("loss", "grad_norm", "mismatch_abs", "mismatch_max", "tis_clipped", "tis_weight", "ratio", "clipped"):
        assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), key
    assert a["tis_clipped"] > 0 and a["mismatch_abs"] > 0  # the TIS cap and the mismatch are really exercised
    on = batch.response_mask > 0
    assert abs(a["mismatch_abs"] - float((old - engine).abs()[on].sum())) <= 1e-4
    assert (separate.logprobs(batch) - fused.logprobs(batch)).abs().max() <= 1e-6
