"""Micro-batches of rows sorted by length, each trimmed to its own longest row: the log-probs are each
row's own (as if run alone, unpadded), back in the batch's row order, and a train step equals the one
on the whole batch at once, while the model sees fewer padded positions."""
import pytest
import torch

from test_grpo_weight_sync import tiny_model

from r1pipe.algo import token_logprobs_and_entropy
from r1pipe.model import Precision, load_pretrained
from r1pipe.workers import PolicyConfig, PolicyWorker, build_batch
from r1pipe.data.batch import by_length


def mixed_lengths_batch():
    """8 rows whose completions run from 1 to 14 tokens, in shuffled order."""
    g = torch.Generator().manual_seed(1)
    lengths = [9, 1, 14, 3, 12, 2, 6, 4]
    prompts = [torch.randint(3, 32, (int(torch.randint(3, 6, (1,), generator=g)),), generator=g).tolist() for _ in lengths]
    completions = [torch.randint(3, 32, (n,), generator=g).tolist() for n in lengths]
    return prompts, completions, build_batch(prompts, completions, pad_id=0)


def positions_seen(worker: PolicyWorker) -> list[int]:
    """Record B*S of every forward the worker's model runs."""
    seen: list[int] = []
    worker.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].numel()))
    return seen


def test_micro_batches_sort_by_length_and_trim():
    _, _, batch = mixed_lengths_batch()
    order = by_length(batch)
    lengths = batch.attention_mask.sum(1)[order]
    assert torch.all(lengths[:-1] >= lengths[1:]) and sorted(order.tolist()) == list(range(len(batch)))
    short = batch.rows(order[-3:]).trimmed()
    assert short.input_ids.shape[1] == int(lengths[-3]) < batch.input_ids.shape[1]
    assert short.response_mask.shape[1] == short.input_ids.shape[1] - 1
    assert short.response_mask.sum() == batch.rows(order[-3:]).response_mask.sum()  # no completion token is cut
    rounded = batch.rows(order[-3:]).trimmed(multiple=8)  # widths that repeat (bf16 on CPU)
    assert rounded.input_ids.shape[1] == 8 * -(-int(lengths[-3]) // 8)
    assert torch.equal(rounded.input_ids[:, : short.input_ids.shape[1]], short.input_ids)
    assert batch.trimmed(multiple=64).input_ids.shape[1] == batch.input_ids.shape[1]  # never wider than the batch


def test_bf16_policy_on_cpu_rounds_micro_batch_widths(tmp_path):
    _, _, batch = mixed_lengths_batch()
    worker = PolicyWorker(0, 1, tiny_model(tmp_path / "model"),
                          PolicyConfig(micro_batch_size=3, precision=Precision.from_section({"dtype": "bf16"})))
    seen: list[int] = []
    worker.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    worker.logprobs(batch)
    assert seen and all(width % 8 == 0 or width == batch.input_ids.shape[1] for width in seen)


@pytest.mark.parametrize("share_prompts", [False, True])
def test_logprobs_are_each_rows_own_in_row_order(tmp_path, share_prompts):
    path = tiny_model(tmp_path / "model")
    prompts, completions, batch = mixed_lengths_batch()
    worker = PolicyWorker(0, 1, path, PolicyConfig(micro_batch_size=3, share_prompts=share_prompts))
    seen = positions_seen(worker)
    logp = worker.logprobs(batch)
    assert sum(seen) < batch.input_ids.numel()  # trimmed micro-batches: less padding computed
    model = load_pretrained(path).eval()
    with torch.no_grad():
        for i, (p, c) in enumerate(zip(prompts, completions)):  # each row alone, no padding at all
            ids = torch.tensor([p + c])
            alone, _ = token_logprobs_and_entropy(model(ids).logits[:, :-1], ids[:, 1:], 1.0)
            n = len(p) + len(c) - 1
            assert (logp[i, len(p) - 1:n] - alone[0, len(p) - 1:]).abs().max() <= 1e-5, i
            assert torch.all(logp[i, : len(p) - 1] == 0) and torch.all(logp[i, n:] == 0)  # prompt and padding targets


def test_train_step_in_sorted_trimmed_micro_batches_equals_one_whole_batch(tmp_path):
    path = tiny_model(tmp_path / "model")
    _, _, batch = mixed_lengths_batch()
    g = torch.Generator().manual_seed(2)
    adv = torch.randn(len(batch), generator=g)
    ref = -torch.rand(batch.response_mask.shape, generator=g) * batch.response_mask
    engine = -torch.rand(batch.response_mask.shape, generator=g) * batch.response_mask
    n_tok = float(batch.response_mask.sum())
    whole = PolicyWorker(0, 1, path, PolicyConfig(lr=1e-2, kl_coef=0.1, micro_batch_size=len(batch)))
    micro = PolicyWorker(0, 1, path, PolicyConfig(lr=1e-2, kl_coef=0.1, micro_batch_size=2))
    seen = positions_seen(micro)
    a = whole.train_step(batch, None, adv, ref, n_tok, float(len(batch)), engine_logp=engine, tis_cap=1.5)
    b = micro.train_step(batch, None, adv, ref, n_tok, float(len(batch)), engine_logp=engine, tis_cap=1.5)
    assert sum(seen) < batch.input_ids.numel()
    for key in ("loss", "grad_norm", "kl", "mismatch_abs", "tis_weight", "entropy"):
        assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), key
    for (name, pa), pb in zip(whole.model.named_parameters(), micro.model.parameters()):  # the step's gradients
        assert (pa.grad - pb.grad).abs().max() <= 1e-6 * max(1.0, float(pa.grad.abs().max())), name
