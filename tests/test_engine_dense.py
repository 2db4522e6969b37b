"""The engine on dense transformers models (tiny Llama / Qwen2 checkpoints): greedy output against transformers'
`generate`, seeded sampling independent of the batch, log-probs against the trainer's forward, preemption,
weight updates (tied embeddings included), and the clear errors for what the dense path does not run."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from r1pipe.algo.logprobs import token_logprobs
from r1pipe.causal_lm import load_model, run_model
from r1pipe.engine import LLM, SUPPORTED_MODEL_TYPES, SamplingParams, check_supported
from r1pipe.engine.llm import prompt_token_budget
from r1pipe.errors import ConfigError
from r1pipe.workers.rollout import RolloutWorker
from tiny_models import make_tiny_dense

MODELS = {
    "qwen2-tied": dict(model_type="qwen2", tie_word_embeddings=True),  # q/k/v biases, default RoPE
    "qwen2-untied": dict(model_type="qwen2", tie_word_embeddings=False),
    "llama-llama3": dict(model_type="llama", rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)),
    "llama-linear-mqa": dict(model_type="llama", num_key_value_heads=1, tie_word_embeddings=True,
                             rope_scaling=dict(rope_type="linear", factor=2.0)),
}
NEW_TOKENS = 8


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    """n prompts of 1..40 token ids (3..95)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (int(k),), generator=g).tolist() for k in torch.randint(1, 41, (n,), generator=g)]


@pytest.fixture(scope="module", params=list(MODELS))
def checkpoint(request, tmp_path_factory):
    return request.param, make_tiny_dense(tmp_path_factory.mktemp(request.param), **MODELS[request.param])


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return make_tiny_dense(tmp_path_factory.mktemp("qwen2"), "qwen2", tie_word_embeddings=True)


def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_equals_transformers_generate_at_batch_1_and_64(checkpoint):
    """Each prompt's greedy completion is transformers' own `generate` of it alone, token for token, whether
    the engine runs it alone or in a continuous batch of 64 prompts of varied lengths."""
    name, path = checkpoint
    hf = load_model(path).eval()
    batch = prompts(64, seed=len(name))
    reference = [hf_greedy(hf, p, NEW_TOKENS) for p in batch]
    llm = LLM(path, block_size=8, max_num_seqs=64)
    assert llm.family.facts.model_type == MODELS[name]["model_type"] and not llm.cuda_graphs
    sp = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    alone = llm.generate([batch[0]], sp, use_tqdm=False)[0].outputs[0].token_ids
    assert alone == reference[0]
    together = [o.outputs[0].token_ids for o in llm.generate(batch, sp, use_tqdm=False)]
    assert together == reference


def test_seeded_samples_do_not_depend_on_the_engine_or_the_batch(qwen2):
    batch = prompts(12, seed=1)
    params = [SamplingParams(n=2, temperature=0.9, top_p=0.95, max_tokens=6, seed=100 + i, ignore_eos=True,
                             logprobs=True) for i in range(len(batch))]
    first = LLM(qwen2, block_size=4).generate(batch, params, use_tqdm=False)
    order = list(reversed(range(len(batch))))  # other neighbours, other rows, a smaller batch
    second = LLM(qwen2, block_size=8, max_num_seqs=5, seed=7).generate([batch[i] for i in order],
                                                                        [params[i] for i in order], use_tqdm=False)
    for j, i in enumerate(order):
        for a, b in zip(first[i].outputs, second[j].outputs):
            assert a.token_ids == b.token_ids
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert len({tuple(c.token_ids) for o in first for c in o.outputs}) > len(batch)  # samples do differ


def test_logprobs_agree_with_the_trainers_forward(qwen2):
    """The engine's log-probs of its sampled tokens are the trainer's (causal_lm.run_model on load_model of
    the checkpoint, algo.logprobs.token_logprobs at the sampling temperature) to 1e-5 in float32."""
    batch, temperature = prompts(6, seed=2), 0.7
    outs = LLM(qwen2, block_size=4).generate(batch, SamplingParams(n=2, temperature=temperature, max_tokens=10,
                                                                   seed=3, ignore_eos=True, logprobs=True),
                                             use_tqdm=False)
    trainer = load_model(qwen2)
    for prompt, out in zip(batch, outs):
        for c in out.outputs:
            ids = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                logits = run_model(trainer, ids).logits[0, len(prompt) - 1:-1]
            expected = token_logprobs(logits, torch.tensor(c.token_ids), temperature)
            assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_tiny_cache_preempts_and_resumes_with_identical_outputs(qwen2, temperature):
    batch = prompts(8, seed=3)
    sp = SamplingParams(n=2, temperature=temperature, max_tokens=12, seed=5, ignore_eos=True, logprobs=True)
    free = LLM(qwen2, block_size=4).generate(batch, sp, use_tqdm=False)
    tight = LLM(qwen2, block_size=4, num_blocks=16)  # 15 usable blocks of 4 tokens for 16 sequences
    squeezed = tight.generate(batch, sp, use_tqdm=False)
    assert tight.scheduler.num_preemptions > 0
    assert [[c.token_ids for c in o.outputs] for o in squeezed] == [[c.token_ids for c in o.outputs] for o in free]
    assert tight.cache.allocator.num_free == 15


def test_update_weights_acts_as_a_fresh_engine_and_keeps_embeddings_tied(qwen2, tmp_path):
    trainer = load_model(qwen2)
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    trainer.save_pretrained(str(tmp_path))
    batch = prompts(5, seed=4)
    sp = SamplingParams(temperature=0.8, max_tokens=8, seed=9, ignore_eos=True, logprobs=True)
    fresh = LLM(tmp_path).generate(batch, sp, use_tqdm=False)
    llm = LLM(qwen2)
    before = llm.generate(batch, sp, use_tqdm=False)
    state = trainer.state_dict()
    embedding = state.pop("model.embed_tokens.weight")  # a sync naming only the head still sets the tied pair
    assert llm.update_weights(state) == len(state)
    model = llm.model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    after = llm.generate(batch, sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in after] == [o.outputs[0].token_ids for o in fresh]
    assert [o.outputs[0].token_ids for o in after] != [o.outputs[0].token_ids for o in before]
    for a, b in zip(after, fresh):
        assert a.outputs[0].logprobs == pytest.approx(b.outputs[0].logprobs, abs=1e-5)


def test_unsupported_model_types_and_features_are_one_clear_error(qwen2, tmp_path):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    assert supported == "deepseek_v3, llama, qwen2"
    for call in (lambda: check_supported(gpt2), lambda: LLM(gpt2), lambda: prompt_token_budget(gpt2, {}, 16)):
        with pytest.raises(ConfigError, match=f"model_type 'gpt2' is not supported .*: {supported}$"):
            call()
    with pytest.raises(ConfigError, match="model_type 'gpt2'"):
        LLM(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)))
    assert check_supported(qwen2) == "qwen2"
    with pytest.raises(ConfigError, match="speculative_k=2: .*MTP module.*qwen2"):
        LLM(qwen2, speculative_k=2)
    with pytest.raises(ConfigError, match="fp8=True: .*DeepSeek-V3.*qwen2"):
        LLM(qwen2, fp8=True)
    with pytest.raises(ConfigError, match="cuda_graphs=True: .*qwen2"):
        LLM(qwen2, cuda_graphs=True)
    llm = LLM(qwen2, max_num_seqs=4)
    with pytest.raises(ValueError, match="return_routing: .*DeepSeek-V3.*qwen2 model without experts"):
        llm.generate([[3, 4]], SamplingParams(max_tokens=2, return_routing=True), use_tqdm=False)
    sliding = make_tiny_dense(tmp_path / "sliding", "qwen2", use_sliding_window=True, sliding_window=8,
                              max_window_layers=1)
    with pytest.raises(ConfigError, match="layer_types .*sliding_attention"):
        check_supported(sliding)


def test_context_budget_and_padding_id_of_a_dense_checkpoint(qwen2):
    assert prompt_token_budget(qwen2, {}, 16) == 256 - 16
    assert prompt_token_budget(qwen2, {"max_model_len": 100}, 16) == 84
    worker = RolloutWorker(str(qwen2), {"max_num_seqs": 4})
    assert worker.pad_token_id() == 0
    worker.llm.family.module.config.pad_token_id = None
    worker.llm.family = type(worker.llm.family)(worker.llm.family.module)  # facts re-read from the config
    assert worker.pad_token_id() == 1  # the EOS id then
    completions = worker.generate([[3, 4, 5]], n=2, temperature=1.0, max_tokens=4, seeds=[0])[0]
    assert len(completions) == 2 and all(len(c.logprobs) == len(c.token_ids) > 0 for c in completions)


def test_a_bfloat16_engine_samples_close_to_the_float32_trainer(qwen2):
    llm = LLM(qwen2, dtype="bfloat16", block_size=4)
    assert all(p.dtype == torch.bfloat16 for p in llm.model.parameters())
    assert llm.cache.pools[0].dtype == torch.bfloat16
    batch = prompts(4, seed=5)
    outs = llm.generate(batch, SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=1, ignore_eos=True),
                        use_tqdm=False)
    trainer, diffs = load_model(qwen2), []
    for prompt, out in zip(batch, outs):
        for c in out.outputs:
            with torch.no_grad():
                logits = run_model(trainer, torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1:-1]
            diffs.append((torch.tensor(c.logprobs) - token_logprobs(logits, torch.tensor(c.token_ids))).abs())
    assert float(torch.cat(diffs).mean()) < 0.05
