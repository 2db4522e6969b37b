"""Shared-prompt packing: a hand-checked layout, then the packed forward and backward against the rows run
one by one (log-probs, entropy, gradients, expert loads), and a policy step with and without packing."""
import pytest
import torch

from test_grpo_weight_sync import tiny_model

from r1pipe.algo import token_logprobs_and_entropy
from r1pipe.model import load_pretrained
from r1pipe.workers import PolicyConfig, PolicyWorker, build_batch
from r1pipe.workers.packing import by_prompt, pack_shared_prompts, prompt_groups


def test_packed_layout_by_hand():
    # rows 0 and 2 share prompt [5, 6]; row 1's prompt [5, 6, 7] only starts the same
    batch = build_batch([[5, 6], [5, 6, 7], [5, 6]], [[7, 8], [4], [9]], pad_id=0)
    assert prompt_groups(batch) == [[0, 2], [1]]
    packed = pack_shared_prompts(batch)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 4, 0]]
    assert packed.positions.tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 3, 0]]
    assert packed.token_weight.tolist() == [[2, 2, 1, 1, 1], [1, 1, 1, 1, 0]]
    prefix = packed.prefix  # prompts attend among themselves; each completion over [its prompt, itself]
    assert prefix.prompt_index.tolist() == [[0, 1, 0], [5, 6, 7]]  # flat [G*L]; row 0's prompt has 2 tokens
    T, F = True, False
    assert prefix.prompt_mask[0].tolist() == [[T, F, F], [T, T, F], [T, T, F]]  # a padding query (dropped) sees the prompt
    assert prefix.prompt_mask[1].tolist() == [[T, F, F], [T, T, F], [T, T, T]]
    assert prefix.row_group.tolist() == [0, 0, 1]
    assert prefix.row_index.tolist() == [[2, 3], [4, 0], [8, 0]]  # row 0's completion, row 2's, row 1's
    # keys: [prompt slots 0..2, own slots 0..1]
    assert prefix.row_mask[0].tolist() == [[T, T, F, T, F], [T, T, F, T, T]]
    assert prefix.row_mask[1].tolist() == [[T, T, F, T, F], [T, T, F, T, F]]
    assert prefix.row_mask[2].tolist() == [[T, T, T, T, F], [T, T, T, T, F]]
    assert prefix.prompt_dest.tolist() == [0, 1, 5, 6, 7] and prefix.row_dest.tolist() == [2, 3, 4, 8]
    # targets in row order: row 0 predicts 7 at its column 1 and 8 at 2; row 1 predicts 4 at 2; row 2 predicts 9 at 1
    assert packed.target.tolist() == [7, 8, 4, 9]
    assert packed.source.tolist() == [1, 2, 5 + 2, 1]  # flat [G*L]: row 2's first target reads the shared prompt
    S1 = batch.response_mask.shape[1]
    assert packed.scatter.tolist() == [0 * S1 + 1, 0 * S1 + 2, 1 * S1 + 2, 2 * S1 + 1]
    grid = packed.unpack(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert grid.shape == batch.response_mask.shape and grid.sum() == 10 and grid[2, 1] == 4


def grouped_batch(groups: int = 3, size: int = 4, seed: int = 0, routing_layers: int = 0):
    """`groups` prompts of 3-6 tokens, each with `size` completions of 1-9 tokens (rows in group order)."""
    g = torch.Generator().manual_seed(seed)
    prompts, completions = [], []
    for _ in range(groups):
        prompt = torch.randint(3, 32, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
        for _ in range(size):
            prompts.append(prompt)
            completions.append(torch.randint(3, 32, (int(torch.randint(1, 10, (1,), generator=g)),), generator=g).tolist())
    routing = None
    if routing_layers:  # replayed experts: the prompt's shared by its rows, as the engine records them
        per_prompt = {}
        routing = []
        for p, c in zip(prompts, completions):
            key = tuple(p)
            if key not in per_prompt:
                per_prompt[key] = torch.randint(0, 8, (routing_layers, len(p), 2), generator=g)
            routing.append(torch.cat([per_prompt[key], torch.randint(0, 8, (routing_layers, len(c), 2), generator=g)], 1))
    return build_batch(prompts, completions, pad_id=0, routing=routing)


@pytest.mark.parametrize("replay", [False, True])
def test_packed_forward_and_backward_equal_the_rows(tmp_path, replay):
    model = load_pretrained(tiny_model(tmp_path / "model", layers=3)).train()
    batch = grouped_batch(routing_layers=2 if replay else 0)
    batch.response_mask[5] = 0  # a row with nothing to score (overlong-filtered) still runs, for the expert loads
    mask = batch.response_mask

    def run(packed_rows: bool):
        model.zero_grad()
        for moe in model.moe_layers():
            moe.expert_load.zero_()
        if packed_rows:
            packed = pack_shared_prompts(batch)
            out = model(packed.input_ids, positions=packed.positions, attention_mask=packed.token_weight,
                        prefix=packed.prefix, routing=packed.routing)
            logp, ent = token_logprobs_and_entropy(out.logits.view(-1, out.logits.shape[-1])[packed.source], packed.target)
            logp, ent = packed.unpack(logp), packed.unpack(ent)
        else:
            out = model(batch.input_ids, attention_mask=batch.attention_mask, routing=batch.routing)
            logp, ent = token_logprobs_and_entropy(out.logits[:, :-1], batch.input_ids[:, 1:])
        ((logp * mask).sum() + 0.3 * (ent * mask).sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logp * mask, ent * mask, grads, [moe.expert_load.clone() for moe in model.moe_layers()]

    rows, packed = run(False), run(True)
    assert pack_shared_prompts(batch).input_ids.shape[0] == 4  # a packed row per prompt, and row 5 alone
    assert (rows[0] - packed[0]).abs().max() <= 1e-5 and (rows[1] - packed[1]).abs().max() <= 1e-5
    assert rows[2].keys() == packed[2].keys()
    for name, grad in rows[2].items():
        assert torch.allclose(grad, packed[2][name], atol=1e-5, rtol=1e-4), name
    for a, b in zip(rows[3], packed[3]):  # the shared prompt counts once per row that holds it
        assert torch.equal(a, b) and a.sum() > 0


def test_micro_batches_keep_a_prompts_rows_together():
    batch = grouped_batch(groups=4, size=3, seed=1)
    shuffled = batch.rows(torch.randperm(len(batch), generator=torch.Generator().manual_seed(0)))
    order = by_prompt(shuffled).tolist()
    groups = prompt_groups(shuffled)
    assert sorted(order) == list(range(len(shuffled)))
    position = {b: i for i, b in enumerate(order)}
    for rows in groups:
        spots = sorted(position[b] for b in rows)
        assert spots == list(range(spots[0], spots[0] + len(rows)))  # adjacent
    tokens = [int(shuffled.attention_mask[rows].sum()) for rows in sorted(groups, key=lambda r: position[r[0]])]
    assert tokens == sorted(tokens, reverse=True)


@pytest.mark.parametrize("micro", [12, 5])  # one micro-batch; or five rows each, cutting groups
def test_a_policy_step_packed_equals_unpacked(tmp_path, micro):
    path = tiny_model(tmp_path / "model")
    batch = grouped_batch(seed=2)
    adv = torch.randn(len(batch), generator=torch.Generator().manual_seed(3))
    n = float(batch.response_mask.sum())
    workers = {share: PolicyWorker(0, 1, path, PolicyConfig(lr=1e-2, micro_batch_size=micro, share_prompts=share))
               for share in (False, True)}
    probe = grouped_batch(seed=4)
    assert (workers[False].logprobs(probe) - workers[True].logprobs(probe)).abs().max() <= 1e-5
    seen = {share: [] for share in workers}
    for share, w in workers.items():
        w.model.register_forward_pre_hook(lambda module, args, share=share: seen[share].append(args[0].numel()))
    stats = {share: w.train_step(batch, None, adv, None, n, float(len(batch))) for share, w in workers.items()}
    assert sum(seen[True]) < sum(seen[False])  # the prompts ran once per micro-batch, not once per row
    for key in ("loss", "entropy", "grad_norm", "tokens", "maxvio"):
        assert stats[True][key] == pytest.approx(stats[False][key], rel=1e-5, abs=1e-6), key
    for (name, a), b in zip(workers[False].model.named_parameters(), workers[True].model.parameters()):  # the step's gradients
        assert (a.grad - b.grad).abs().max() <= 1e-6 * max(1.0, float(a.grad.abs().max())), name
