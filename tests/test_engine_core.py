"""Engine behaviour against references: the uncached training forward, hand-checked sampling, the cache."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from r1pipe.engine import LLM, SamplingParams
from r1pipe.engine.paged_cache import BlockAllocator, PagedCache
from r1pipe.engine.sampler import SamplingTensors, draw, sampling_probs
from r1pipe.model import ModelConfig, Transformer

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [42], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]


def tiny_config(**overrides) -> ModelConfig:
    return dataclasses.replace(ModelConfig.preset("tiny"), num_hidden_layers=3, **overrides)



@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    m = Transformer(tiny_config(), seed=1)
    with torch.no_grad():  # a non-zero selection bias, so routing is not just the raw affinities
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    return m.eval()


def engine(model: Transformer, **kw) -> LLM:
    kw.setdefault("block_size", 4)
    kw.setdefault("num_blocks", 256)
    return LLM(model, **kw)


def reference_greedy(model: Transformer, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def training_logprobs(model: Transformer, prompt: list[int], completion: list[int], temperature: float,
                      routing: list[torch.Tensor] | None = None) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids, routing=routing).logits[0, len(prompt) - 1: -1]
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


@pytest.mark.parametrize("limits", [
    dict(max_num_seqs=3),  # 4 prompts x (n=1 or 2) > 3 sequences: groups wait for others to finish
    dict(num_blocks=14),  # the cache holds ~2 sequences' worst case: admission waits for freed blocks
    dict(max_num_batched_tokens=11),  # the prefill budget splits the prompts over several steps
])
def test_greedy_equals_uncached_argmax_with_continuous_batching(model, limits):
    llm = engine(model, **limits)
    free_before = llm.cache.allocator.num_free
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, n=1) for m in (9, 5, 12, 7)]
    params[1] = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, n=2)
    outs = llm.generate(PROMPTS, params, use_tqdm=True)
    for prompt, sp, out in zip(PROMPTS, params, outs):
        assert out.prompt_token_ids == prompt
        assert len(out.outputs) == sp.n and [c.index for c in out.outputs] == list(range(sp.n))
        ref = reference_greedy(model, prompt, sp.max_tokens)
        for c in out.outputs:
            assert c.token_ids == ref
            assert c.finish_reason == "length"
    assert llm.cache.allocator.num_free == free_before  # every block (shared prompt blocks too) came back


@pytest.mark.parametrize("fail_at", [("prefill", 1), ("prefill", 2), ("decode", 2)])
def test_engine_recovers_after_a_failing_forward(model, monkeypatch, fail_at):
    """A forward that raises (in a prefill: its admitted prompts hold blocks but have no sequences yet; or in
    a decode step) leaves every block free and the engine usable."""
    llm = engine(model, max_num_seqs=2)  # later prompts are prefilled while others decode
    free_before = llm.cache.allocator.num_free
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    kind, nth = fail_at
    calls = {"prefill": 0, "decode": 0}
    forward = llm.model.forward

    def flaky(input_ids, *args, **kwargs):
        step = "prefill" if input_ids.shape[1] > 1 else "decode"
        calls[step] += 1
        if step == kind and calls[step] == nth:
            raise RuntimeError("boom")
        return forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(llm.model, "forward", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        llm.generate(PROMPTS, sp, use_tqdm=False)
    assert calls[kind] == nth
    assert llm.cache.allocator.num_free == free_before and not llm.scheduler.has_work()
    monkeypatch.setattr(llm.model, "forward", forward)
    outs = llm.generate(PROMPTS, sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [reference_greedy(model, p, 6) for p in PROMPTS]
    assert llm.cache.allocator.num_free == free_before


def test_logprobs_match_training_forward(model):
    llm = engine(model)
    sp = SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=50, max_tokens=10, seed=11, ignore_eos=True)
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, sp, use_tqdm=False)):
        for c in out.outputs:
            ref = training_logprobs(model, prompt, c.token_ids, 0.7)
            torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-5, rtol=0)
    greedy = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    c = greedy[0].outputs[0]
    torch.testing.assert_close(torch.tensor(c.logprobs), training_logprobs(model, PROMPTS[0], c.token_ids, 1.0),
                               atol=1e-5, rtol=0)


def test_seeds_reproduce_and_do_not_depend_on_the_batch(model):
    sp = SamplingParams(n=2, temperature=1.0, max_tokens=12, seed=123, ignore_eos=True)
    a = engine(model).generate(PROMPTS, sp, use_tqdm=False)
    b = engine(model, max_num_seqs=2).generate(PROMPTS, sp, use_tqdm=False)
    alone = engine(model).generate([PROMPTS[2]], sp, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in a] == [[c.token_ids for c in o.outputs] for o in b]
    assert alone[0].outputs[0].token_ids == a[2].outputs[0].token_ids
    assert a[0].outputs[0].token_ids != a[0].outputs[1].token_ids  # samples of one prompt differ
    other = engine(model).generate(PROMPTS, dataclasses.replace(sp, seed=124), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in other] != [o.outputs[0].token_ids for o in a]
    # without a request seed the engine seed decides
    free = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    x = engine(model, seed=5).generate(PROMPTS, free, use_tqdm=False)
    y = engine(model, seed=5).generate(PROMPTS, free, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in x] == [o.outputs[0].token_ids for o in y]


def test_stop_token_ids_eos_and_max_tokens(model):
    llm = engine(model)
    ref = reference_greedy(model, PROMPTS[3], 12)
    stop_at = next(i for i in range(2, 12) if ref[i] not in ref[:i])
    out = llm.generate([PROMPTS[3]], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[ref[stop_at]],
                                                    ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref[: stop_at + 1] and out.finish_reason == "stop" and out.stop_reason == ref[stop_at]
    model.config.eos_token_id, old = ref[stop_at], model.config.eos_token_id
    try:
        eos = engine(model).generate([PROMPTS[3]], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
        assert eos[0].outputs[0].token_ids == ref[: stop_at + 1] and eos[0].outputs[0].finish_reason == "stop"
    finally:
        model.config.eos_token_id = old
    short = llm.generate([PROMPTS[3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert short[0].outputs[0].token_ids == ref[:3] and short[0].outputs[0].finish_reason == "length"


def test_update_weights_matches_fresh_engine(model):
    sp = SamplingParams(n=2, temperature=0.8, max_tokens=8, seed=3, ignore_eos=True)
    other = Transformer(tiny_config(), seed=99).eval()
    llm = engine(Transformer(tiny_config(), seed=1).eval())
    original = {k: v.clone() for k, v in llm.model.state_dict().items()}
    before = llm.generate(PROMPTS, sp, use_tqdm=False)
    assert llm.update_weights(other.state_dict()) == len(other.state_dict())
    after = llm.generate(PROMPTS, sp, use_tqdm=False)
    fresh = engine(other).generate(PROMPTS, sp, use_tqdm=False)
    tokens = lambda outs: [[c.token_ids for c in o.outputs] for o in outs]  # noqa: E731
    assert tokens(after) == tokens(fresh) != tokens(before)
    for x, y in zip(after, fresh):
        torch.testing.assert_close(torch.tensor(x.outputs[0].logprobs), torch.tensor(y.outputs[0].logprobs))
    llm.update_weights(iter(original.items()))  # named-tensor iterable form
    assert tokens(llm.generate(PROMPTS, sp, use_tqdm=False)) == tokens(before)
    with pytest.raises(KeyError, match="not in the model"):
        llm.update_weights({"model.no_such.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape mismatch"):
        llm.update_weights({"lm_head.weight": torch.zeros(3, 3)})


def test_bad_requests_are_clear_errors(model):
    llm = engine(model, num_blocks=8)
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([[1, 10**6]], SamplingParams(), use_tqdm=False)
    with pytest.raises(ValueError, match="cache blocks"):
        llm.generate([[1, 2]], SamplingParams(max_tokens=200), use_tqdm=False)
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate(["text"], SamplingParams(), use_tqdm=False)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    assert llm.generate([[1, 2]], SamplingParams(max_tokens=3), use_tqdm=False)[0].outputs[0].token_ids


def test_sampling_probs_hand_checked():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25]]))
    st = SamplingTensors.build([1.0, 1.0, 0.0], [0.6, 1.0, 1.0], [-1, 2, -1], 4)
    probs = sampling_probs(logits, st)
    # top-p 0.6: 0.4 then 0.3 reach it -> {1, 3}; top-k 2: {1, 3}; greedy: one-hot at the argmax
    torch.testing.assert_close(probs[0], torch.tensor([0, 4 / 7, 0, 3 / 7]))
    torch.testing.assert_close(probs[1], torch.tensor([0, 4 / 7, 0, 3 / 7]))
    assert probs[2].tolist() == [1.0, 0.0, 0.0, 0.0]
    p = torch.tensor([[0.1, 0.0, 0.6, 0.3]])
    drawn = [int(draw(p, torch.tensor([u]))) for u in (0.0, 0.05, 0.11, 0.69, 0.71, 0.999)]
    assert drawn == [0, 0, 2, 2, 3, 3]


def test_paged_cache_blocks_and_gather():
    alloc = BlockAllocator(4)
    a, b = alloc.allocate(), alloc.allocate()
    assert {a, b} == {1, 2} and alloc.num_free == 1
    alloc.share(a)
    alloc.free([a])
    assert alloc.num_free == 1 and alloc.refs(a) == 1
    alloc.free([a, b])
    assert alloc.num_free == 3
    with pytest.raises(RuntimeError, match="twice"):
        alloc.free([b])
    cache = PagedCache(num_layers=1, num_blocks=6, block_size=2, widths=(3, 1))
    # row 0 owns blocks [3, 1], row 1 block [2]; row 1 is padded after one token
    cache.plan([[3, 1], [2]], torch.tensor([[0, 1, 2], [0, 0, 0]]), torch.tensor([[True] * 3, [True, False, False]]))
    kv = torch.arange(18, dtype=torch.float32).view(2, 3, 3)
    latents, ropes, mask = cache.update(0, kv, kv[..., :1], torch.zeros(2, 3, dtype=torch.long))
    assert latents.shape == (2, 4, 3) and mask.shape == (2, 3, 4)
    torch.testing.assert_close(latents[0, :3], kv[0])
    torch.testing.assert_close(latents[1, 0], kv[1, 0])
    torch.testing.assert_close(cache.pools[0][0, 0, 3 * 2:3 * 2 + 2], kv[0, :2])  # positions 0, 1 in block 3
    assert mask[0].tolist() == [[True, False, False, False], [True, True, False, False], [True, True, True, False]]
    assert mask[1, 1:].tolist() == [[True, False, False, False]] * 2  # padding attends key 0 only
    assert cache.pools[0][0, 0, :2].abs().sum() > 0  # padding went to the scratch block 0


@pytest.mark.parametrize("speculative_k", [0, 2])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_overflowing_cache_preempts_and_resumes_with_identical_outputs(model, temperature, speculative_k):
    """8 samples growing to ~9 blocks each cannot all fit in 19 usable blocks: blocks come on demand, the
    youngest sequences are preempted and later recomputed, and every output (tokens, log-probs, routing
    records; seeded sampling included) equals the run whose cache holds everything."""
    sp = SamplingParams(n=2, temperature=temperature, max_tokens=24, seed=5, ignore_eos=True, return_routing=True)
    big = engine(model, num_blocks=256, speculative_k=speculative_k).generate(PROMPTS, sp, use_tqdm=False)
    small = engine(model, num_blocks=20, speculative_k=speculative_k)
    outs = small.generate(PROMPTS, sp, use_tqdm=False)
    assert small.scheduler.num_preemptions > 0
    assert small.cache.allocator.num_free == 19 and not small.scheduler.has_work()
    for a, b in zip(outs, big):
        assert torch.equal(a.prompt_routing, b.prompt_routing)
        for x, y in zip(a.outputs, b.outputs):
            assert x.token_ids == y.token_ids and len(x.token_ids) == 24
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=0)
            assert torch.equal(x.routing, y.routing)


def test_blocks_follow_real_lengths(model):
    """Admission no longer reserves prompt + max_tokens: 4 samples whose worst case (4 x 27 blocks) is far
    beyond the cache run at once, and samples that stop early only ever hold the blocks they wrote."""
    llm = engine(model, num_blocks=64)
    used = []
    grow = llm.scheduler.grow

    def spy():
        grow()
        used.append(llm.cache.allocator.num_blocks - 1 - llm.cache.allocator.num_free)

    llm.scheduler.grow = spy
    ref = reference_greedy(model, PROMPTS[0], 12)
    stop_at = next(i for i in range(3, 12) if ref[i] not in ref[:i])
    sp = SamplingParams(n=4, temperature=0, max_tokens=100, stop_token_ids=[ref[stop_at]], ignore_eos=True)
    out = llm.generate([PROMPTS[0]], sp, use_tqdm=False)[0]
    assert all(c.token_ids == ref[: stop_at + 1] and c.finish_reason == "stop" for c in out.outputs)
    # the prompt's full block is shared; at the last step each sample holds blocks for the positions it
    # has written: the 7 prompt tokens and its first stop_at outputs (the stop token is never fed)
    assert max(used) == 1 + 4 * (-(-(len(PROMPTS[0]) + stop_at) // 4) - 1)
    assert llm.scheduler.num_preemptions == 0 and llm.cache.allocator.num_free == 63


def test_iter_generate_streams_finished_prompts_while_others_decode(model):
    """Each prompt comes out once, as soon as its samples are done, with the same samples as
    `generate`; a caller that stops early leaves no block allocated."""
    params = [SamplingParams(n=2, temperature=1.0, max_tokens=4 + 6 * i, seed=7 + i, ignore_eos=True)
              for i in range(len(PROMPTS))]
    llm = engine(model, max_num_seqs=4)
    whole = llm.generate(PROMPTS, params, use_tqdm=False)
    batches = list(llm.iter_generate(PROMPTS, params))
    order = [i for batch in batches for i, _ in batch]
    assert sorted(order) == list(range(len(PROMPTS))) and len(batches) > 1
    assert order[0] == 0  # the shortest request finishes first, while the others still decode
    streamed = {i: out for batch in batches for i, out in batch}
    assert [[c.token_ids for c in streamed[i].outputs] for i in range(len(PROMPTS))] == \
        [[c.token_ids for c in o.outputs] for o in whole]
    free = llm.cache.allocator.num_free
    stream = llm.iter_generate(PROMPTS, params)
    next(stream)
    stream.close()  # abandoned mid-way
    assert llm.cache.allocator.num_free == free and not llm.scheduler.has_work()
