"""PolicyWorker in-process (no Ray): the router bias held still on request, and the draft loss that
trains only the MTP module toward the policy's detached next-token distribution."""
import dataclasses

import torch

from r1pipe.workers import PolicyConfig, PolicyWorker, build_batch


def tiny_mtp_model(path):
    from r1pipe.model import ModelConfig, Transformer, save_pretrained

    cfg = dataclasses.replace(ModelConfig.preset("tiny"), vocab_size=32, hidden_size=64, intermediate_size=128,
                              moe_intermediate_size=32, num_hidden_layers=2, n_routed_experts=8, n_group=2, topk_group=1,
                              num_experts_per_tok=2, num_nextn_predict_layers=1, pad_token_id=0, eos_token_id=1,
                              bos_token_id=2)
    save_pretrained(Transformer(cfg, seed=0), path)
    return str(path)


def batch_and_inputs(seed=0, rows=4):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 32, (5,), generator=g).tolist() for _ in range(rows)]
    completions = [torch.randint(3, 32, (7,), generator=g).tolist() for _ in range(rows)]
    batch = build_batch(prompts, completions, pad_id=0)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])[:rows]
    return batch, advantages


def step(worker, batch, advantages):
    old = worker.logprobs(batch)
    return worker.train_step(batch, old, advantages, None, float(batch.response_mask.sum()), float(len(batch)),
                             num_draft_positions=float(batch.response_mask[:, 1:].sum()))


def router_biases(model):
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}


def test_freeze_router_bias_holds_routing_still_and_still_measures_maxvio(tmp_path):
    path = tiny_mtp_model(tmp_path / "m")
    batch, adv = batch_and_inputs()
    frozen = PolicyWorker(0, 1, path, PolicyConfig(lr=1e-2, freeze_router_bias=True, bias_update_gamma=0.01))
    moving = PolicyWorker(0, 1, path, PolicyConfig(lr=1e-2, bias_update_gamma=0.01))
    before = router_biases(frozen.model)
    stats = step(frozen, batch, adv)
    assert stats["maxvio"] > 0
    for name, bias in router_biases(frozen.model).items():
        assert torch.equal(bias, before[name]), name
    step(moving, batch, adv)
    assert any(not torch.equal(b, before[n]) for n, b in router_biases(moving.model).items())


def test_draft_loss_trains_only_the_mtp_module_toward_the_policy(tmp_path):
    path = tiny_mtp_model(tmp_path / "m")
    batch, adv = batch_and_inputs()
    plain = PolicyWorker(0, 1, path, PolicyConfig(lr=1e-2, share_prompts=False))  # the draft loss runs rows unpacked
    drafted = PolicyWorker(0, 1, path, PolicyConfig(lr=1e-2, draft_loss=True))
    own = {id(p) for p in drafted.draft_params}
    names = {n for n, p in drafted.model.named_parameters() if id(p) in own}
    assert names and all(n.startswith("model.layers.2.") for n in names)  # the MTP layer after 2 main layers
    assert not any("embed_tokens" in n or "shared_head.head" in n for n in names)

    for _ in range(2):
        step(plain, batch, adv)
        step(drafted, batch, adv)
    # the policy itself (everything but the MTP module's own parameters) trains as without the draft loss
    # (up to the rounding of the clipped gradient norm, now taken over a different parameter list)
    p_plain = dict(plain.model.named_parameters())
    for name, p in drafted.model.named_parameters():
        if name in names:
            assert not torch.equal(p, p_plain[name]), name
        else:
            torch.testing.assert_close(p, p_plain[name], atol=1e-6, rtol=0, msg=name)


def test_draft_loss_falls_while_the_policy_holds_still(tmp_path):
    path = tiny_mtp_model(tmp_path / "m")
    batch, _ = batch_and_inputs()
    worker = PolicyWorker(0, 1, path, PolicyConfig(lr=1e-2, draft_loss=True))
    zero = torch.zeros(len(batch))  # no policy gradient: the target distribution stays put
    losses = [step(worker, batch, zero)["draft_loss"] for _ in range(6)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_draft_lr_scale_steps_only_the_drafter_faster(tmp_path):
    """With draft_lr_scale the MTP module's own parameters take AdamW steps at lr x scale: the first
    Adam step moves each parameter by about lr, so the drafter moves ~scale times as far."""
    path = tiny_mtp_model(tmp_path / "m")
    batch, adv = batch_and_inputs()
    base = PolicyWorker(0, 1, path, PolicyConfig(lr=1e-3, draft_loss=True))
    fast = PolicyWorker(0, 1, path, PolicyConfig(lr=1e-3, draft_loss=True, draft_lr_scale=10.0))
    assert [g["lr"] for g in fast.optimizer.param_groups] == [1e-3, 1e-3, 1e-2, 1e-2]  # matrices, then vectors
    before = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    step(base, batch, adv)
    step(fast, batch, adv)
    own = {id(p) for p in fast.draft_params}
    p_base = dict(base.model.named_parameters())
    moved = {}
    for name, p in fast.model.named_parameters():
        if id(p) in own:
            fast_move = float((p.detach() - before[name]).abs().max())
            moved[name] = fast_move / max(float((p_base[name].detach() - before[name]).abs().max()), 1e-12)
        else:
            torch.testing.assert_close(p, p_base[name], atol=1e-6, rtol=0, msg=name)
    assert moved and all(5.0 < r < 15.0 for r in moved.values()), moved


def test_chain_mask_is_the_drafter_cache_at_each_depth():
    from r1pipe.model.mtp import chain_mask

    m = chain_mask(3, 2).int()
    # depth 1 (rows 0-2): causal over depth 1; depth 2 at index i: depth-1 indices <= i, and itself
    assert m.tolist() == [[1, 0, 0, 0, 0, 0],
                          [1, 1, 0, 0, 0, 0],
                          [1, 1, 1, 0, 0, 0],
                          [1, 0, 0, 1, 0, 0],
                          [1, 1, 0, 0, 1, 0],
                          [1, 1, 1, 0, 0, 1]]
    third = chain_mask(2, 3).int()[4:]  # depth 3 sees depth 1 causally, depth 2 and 3 at its own index
    assert third.tolist() == [[1, 0, 1, 0, 1, 0], [1, 1, 0, 1, 0, 1]]


def test_draft_chain_equals_drafting_through_the_cache(tmp_path):
    """mtp_draft_chain over whole sequences gives the logits the engine's drafter computes: catch-up of
    the MTP cache on the main model's hidden states, then each further draft chaining its own hidden state
    one position on (here fed the true next tokens, the case where drafts get accepted)."""
    from r1pipe.model import DenseLatentCache, load_pretrained

    model = load_pretrained(tiny_mtp_model(tmp_path / "m")).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the init, so the logits differ clearly by context
            p.mul_(4.0)
        ids = torch.randint(3, 32, (2, 14), generator=torch.Generator().manual_seed(5))
        chain = model.mtp_draft_chain(model(ids).hidden, ids, 3)
        for t in (0, 4, 9):  # drafting after prefix ids[:, :t+2], the newest known token is ids[:, t+1]
            cache = DenseLatentCache(model.config, batch_size=2, max_len=16)
            hidden = model(ids[:, : t + 2], cache=cache).hidden
            positions = torch.arange(t + 1).expand(2, t + 1)
            h, logits = model.mtp_step(0, hidden[:, : t + 1], ids[:, 1 : t + 2], positions, cache=cache)
            cached = [logits[:, -1]]
            h = h[:, -1:]
            for j in (2, 3):
                h, logits = model.mtp_step(0, h, ids[:, t + j : t + j + 1], torch.full((2, 1), t + j - 1), cache=cache)
                cached.append(logits[:, -1])
            for j, logits in enumerate(cached):
                # fp32 summation order differs (cache vs whole sequence) on logits of size ~7: up to ~5e-5 seen on
                # some CPUs; a wrong mask is off by O(1)
                torch.testing.assert_close(chain[j][:, t], logits, atol=2e-4, rtol=1e-4, msg=f"depth {j + 1}, t={t}")


def test_draft_loss_trains_every_chained_depth(tmp_path):
    path = tiny_mtp_model(tmp_path / "m")
    batch, _ = batch_and_inputs()
    worker = PolicyWorker(0, 1, path, PolicyConfig(lr=1e-2, draft_loss=True, draft_depth=2))
    zero = torch.zeros(len(batch))

    def depth_losses():
        with torch.no_grad():
            out = worker.model(batch.input_ids, attention_mask=batch.attention_mask)
            chain = worker.model.mtp_draft_chain(out.hidden, batch.input_ids, 2, batch.attention_mask)
            S = batch.input_ids.shape[1]
            from r1pipe.algo import draft_loss
            return [float(draft_loss(lg[:, : S - 1 - j], out.logits[:, j : S - 1], batch.response_mask[:, j:]))
                    for j, lg in enumerate(chain, start=1)]

    before = depth_losses()
    for _ in range(6):
        step(worker, batch, zero)
    after = depth_losses()
    assert all(a < 0.5 * b for a, b in zip(after, before)), (before, after)


def test_draft_stats_split_first_and_chained_acceptance():
    from r1pipe.workers import DraftStats

    # two engines: 10 steps x 2 drafts with 7 accepted (first draft 6 of 10), and 5 x 2 with 2 (first 2 of 5)
    total = DraftStats(20, 7, 10, 6) + DraftStats(10, 2, 5, 2)
    assert (total.drafts, total.accepted, total.first_drafts, total.first_accepted) == (30, 9, 15, 8)
    assert total.acceptance == 9 / 30 and total.first_acceptance == 8 / 15 and total.chained_acceptance == 1 / 15
    assert total - DraftStats(10, 2, 5, 2) == DraftStats(20, 7, 10, 6)  # a worker's delta since its last report
