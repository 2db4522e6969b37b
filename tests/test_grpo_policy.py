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
    plain = PolicyWorker(0, 1, path, PolicyConfig(lr=1e-2))
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
    assert [g["lr"] for g in fast.optimizer.param_groups] == [1e-3, 1e-2]
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
