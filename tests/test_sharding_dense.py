"""FSDP2 on dense transformers causal LMs (r1pipe.workers.sharding), 2 gloo ranks on CPU, no Ray: a tiny
Qwen2 (embedding and head tied, activation checkpointing on) and a tiny Llama (untied). One AdamW step of
2 sharded ranks, each on half of a batch, equals one unsharded model on the whole batch (gradients and
parameters within 1e-5); each rank holds about half the parameter and optimizer bytes; the gathered
model saves with transformers' save_pretrained and loads back as the stepped model; a DCP checkpoint
written by the 2 ranks loads into 1 unsharded model and a fresh AdamW exactly."""
import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from transformers import AutoConfig, AutoModelForCausalLM

from r1pipe.model import ModelConfig, Transformer
from r1pipe.vocab import DENSE_PRESETS
from r1pipe.workers.sharding import (
    checkpoint_activations, decoder_blocks, gather_full, gathered_model, load_sharded, local_bytes, save_sharded, shard,
    undo_gradient_average,
)
from r1pipe.workers.weight_sync import free_port

VOCAB = 97  # odd: the embedding and head shard unevenly over 2 ranks
LR = 1e-4  # small, as in test_grpo_fsdp: AdamW turns a gradient of ~eps (rounding) into a step of up to lr


def dense_model(preset: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A seeded tiny transformers model of a DENSE_PRESETS config (fp32)."""
    fields = {**DENSE_PRESETS[preset], **overrides}
    config = AutoConfig.for_model(fields.pop("model_type"), vocab_size=VOCAB, **fields)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def batch(rows: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [rows, S] right-padded with 0, labels [rows, S]: the next token, -100 on padding)."""
    g = torch.Generator().manual_seed(1)
    lengths = [5 + (3 * i) % 7 for i in range(rows)]
    ids = torch.zeros(rows, max(lengths), dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, VOCAB, (n,), generator=g)
        labels[i, : n - 1] = ids[i, 1:n]
    return ids, labels


def lm_loss(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Sum of the cross-entropy over target tokens / the global target count."""
    logits = model(input_ids=ids, attention_mask=(ids != 0).long()).logits
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum") / num_tokens


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, fused=True)


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for n, p in model.named_parameters()}


def _step_one_family(rank: int, preset: str, tmp: str, **overrides) -> None:
    """The whole check for one model on this rank of 2 (see the module docstring)."""
    ids, labels = batch()
    num_tokens = int((labels != -100).sum())
    whole = dense_model(preset, **overrides)
    sharded = copy.deepcopy(whole)
    tied = sharded.config.tie_word_embeddings
    assert (sharded.lm_head.weight is sharded.model.embed_tokens.weight) == tied
    assert decoder_blocks(sharded) == list(sharded.model.layers)

    whole_opt = adamw(whole)
    lm_loss(whole, ids, labels, num_tokens).backward()
    want_grads = full_grads(whole)
    whole_opt.step()

    if preset == "tiny-qwen2":
        checkpoint_activations(sharded)
    shard(sharded)
    sharded_opt = adamw(sharded)
    half = slice(0, 3) if rank == 0 else slice(3, 6)
    lm_loss(sharded, ids[half], labels[half], num_tokens).backward()
    undo_gradient_average(sharded, 2)
    for name, g in full_grads(sharded).items():
        torch.testing.assert_close(g, want_grads[name], atol=1e-5 * float(want_grads[name].abs().max()), rtol=0, msg=name)
    sharded_opt.step()
    got = gather_full(sharded)
    for name, p in whole.state_dict().items():
        torch.testing.assert_close(got[name], p, atol=1e-5, rtol=0, msg=name)
    assert (sharded.lm_head.weight is sharded.model.embed_tokens.weight) == tied  # FSDP keeps the tie

    mine, all_of = local_bytes(sharded, sharded_opt), local_bytes(whole, whole_opt)
    for kind in ("parameters", "optimizer"):
        assert 0.4 <= mine[kind] / all_of[kind] <= 0.6, (kind, mine[kind], all_of[kind])

    exported = gathered_model(sharded)
    assert (exported.lm_head.weight is exported.model.embed_tokens.weight) == tied
    if rank == 0:
        exported.save_pretrained(f"{tmp}/{preset}", safe_serialization=True)
        loaded = AutoModelForCausalLM.from_pretrained(f"{tmp}/{preset}", dtype=torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, exported(input_ids=ids).logits, atol=0, rtol=0)
            torch.testing.assert_close(loaded(input_ids=ids).logits, whole(input_ids=ids).logits, atol=1e-4, rtol=0)

    save_sharded(f"{tmp}/{preset}-dcp", sharded, sharded_opt)
    written = get_optimizer_state_dict(sharded, sharded_opt, options=StateDictOptions(full_state_dict=True))
    if rank == 0:  # what the checkpoint holds, for the unsharded load in the test's own process
        torch.save({"model": got, "optimizer": written["state"]}, f"{tmp}/{preset}-written.pt")


FAMILIES = [("tiny-qwen2", {}), ("tiny-llama", {"tie_word_embeddings": False})]


def _two_ranks(rank: int, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for preset, overrides in FAMILIES:
        _step_one_family(rank, preset, tmp, **overrides)
    dist.destroy_process_group()


def test_two_sharded_dense_ranks_step_like_one_hold_half_and_checkpoint_to_one(tmp_path):
    mp.spawn(_two_ranks, args=(free_port(), str(tmp_path)), nprocs=2)
    for preset, overrides in FAMILIES:  # one unsharded worker (no process group) reads the 2 ranks' checkpoint
        written = torch.load(tmp_path / f"{preset}-written.pt")
        one = dense_model(preset, seed=7, **overrides)  # other weights: everything must come from the checkpoint
        one_opt = adamw(one)
        load_sharded(tmp_path / f"{preset}-dcp", one, one_opt)
        for name, p in one.state_dict().items():
            assert torch.equal(p, written["model"][name]), name
        assert (one.lm_head.weight is one.model.embed_tokens.weight) == one.config.tie_word_embeddings
        state = get_optimizer_state_dict(one, one_opt)["state"]
        assert set(state) == set(written["optimizer"])
        for fqn, entry in written["optimizer"].items():
            for key, value in entry.items():
                assert torch.equal(state[fqn][key], value), (fqn, key)


def test_decoder_blocks_names_both_families_and_refuses_others():
    v3 = Transformer(dataclasses.replace(ModelConfig.preset("tiny"), num_hidden_layers=2, num_nextn_predict_layers=1))
    assert decoder_blocks(v3) == v3.blocks and len(v3.blocks) == 2  # not the MTP module
    llama = dense_model("tiny-llama")
    assert decoder_blocks(llama) == list(llama.model.layers)
    with pytest.raises(TypeError, match="Sequential: FSDP sharding takes r1pipe's DeepSeek-V3 or a transformers"):
        decoder_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
