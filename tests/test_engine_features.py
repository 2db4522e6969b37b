"""Engine features against references: stop strings through a real tokenizer and checkpoint directory,
routing replay in the training forward, MTP self-speculation (exactness and the rejection rule)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from r1pipe.engine import LLM, SamplingParams
from r1pipe.engine.sampler import draw
from r1pipe.engine.speculative import rejection_sample
from r1pipe.model import ModelConfig, Transformer, save_pretrained

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [42], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]



def tiny_config(**overrides) -> ModelConfig:
    return dataclasses.replace(ModelConfig.preset("tiny"), num_hidden_layers=3, **overrides)


@pytest.fixture(scope="module")
def model() -> Transformer:
    return Transformer(tiny_config(), seed=7).eval()


def engine(model, **kw) -> LLM:
    kw.setdefault("block_size", 4)
    kw.setdefault("num_blocks", 512)
    return LLM(model, **kw)


def tokens(outs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outs]


def char_tokenizer(vocab_size: int, wide: dict[int, str] | None = None):
    """A real transformers fast tokenizer with one character per id (so text positions are token positions),
    except the ids in `wide`, whose text is given there."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {(wide or {}).get(i, chr(0x100 + i)): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=chr(0x100)))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=chr(0x100))


def test_checkpoint_dir_text_prompts_and_stop_strings(model, tmp_path):
    save_pretrained(model, tmp_path)
    char_tokenizer(model.config.vocab_size).save_pretrained(tmp_path)
    llm = LLM(tmp_path, block_size=4, num_blocks=256)
    prompt = "".join(chr(0x100 + i) for i in PROMPTS[3])
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)[0]
    assert free.prompt == prompt and free.prompt_token_ids == PROMPTS[3]
    full = free.outputs[0]
    assert full.text == "".join(chr(0x100 + t) for t in full.token_ids)
    # a 2-character stop string whose first occurrence starts at character i >= 3
    i = next(i for i in range(3, 20) if full.text.find(full.text[i:i + 2]) == i)
    stop = full.text[i:i + 2]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, stop=["\n\n\n", stop], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == full.text[:i]  # the stop string is cut from the text ...
    assert out.token_ids == full.token_ids[: i + 2]  # ... the tokens keep the one that completed it
    assert out.finish_reason == "stop" and out.stop_reason == stop


def test_a_kept_stop_string_ends_the_text_even_inside_the_token_that_completed_it(model, tmp_path):
    """include_stop_str_in_output (vLLM's option): the text ends right after the stop string, and what the
    token that completed it carries beyond it is dropped; without it the text ends before the stop string.
    The token ids keep that token either way."""
    ids = engine(model).generate([PROMPTS[3]], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                                 use_tqdm=False)[0].outputs[0].token_ids
    j = next(j for j in range(3, 20) if ids[j] not in ids[:j])
    save_pretrained(model, tmp_path)
    char_tokenizer(model.config.vocab_size, wide={ids[j]: "\u3000\u3001"}).save_pretrained(tmp_path)  # 2 characters
    llm = LLM(tmp_path, block_size=4, num_blocks=256)
    before = "".join(chr(0x100 + t) for t in ids[:j])
    for include, text in ((False, before), (True, before + "\u3000")):
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=["\u3000"], include_stop_str_in_output=include)
        out = llm.generate([PROMPTS[3]], params, use_tqdm=False)[0].outputs[0]
        assert out.text == text and out.token_ids == ids[: j + 1]
        assert out.finish_reason == "stop" and out.stop_reason == "\u3000"


def test_routing_records_replay_the_rollout_logprobs(model):
    m = Transformer(tiny_config(), seed=7).eval()
    llm = engine(m)
    sp = SamplingParams(n=2, temperature=1.0, max_tokens=10, seed=4, return_routing=True, ignore_eos=True)
    outs = llm.generate(PROMPTS, sp, use_tqdm=False)
    n_moe, k = len(m.moe_layers(include_mtp=False)), m.config.num_experts_per_tok
    with torch.no_grad():  # later selection biases (as after policy updates) change which experts win
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    drift = 0.0
    for prompt, out in zip(PROMPTS, outs):
        assert out.prompt_routing.shape == (n_moe, len(prompt), k)
        for c in out.outputs:
            assert c.routing.shape == (n_moe, len(c.token_ids), k) and c.routing.dtype == torch.long
            seq = torch.tensor([prompt + c.token_ids])
            replay = [r.unsqueeze(0) for r in torch.cat([out.prompt_routing, c.routing], dim=1)]
            with torch.no_grad():
                replayed = m(seq, routing=replay).logits[0, len(prompt) - 1: -1]
                free = m(seq).logits[0, len(prompt) - 1: -1]
            target = torch.tensor(c.token_ids)[:, None]
            lp = torch.log_softmax(replayed, -1).gather(-1, target)[:, 0]
            torch.testing.assert_close(lp, torch.tensor(c.logprobs), atol=1e-5, rtol=0)
            drift = max(drift, float((torch.log_softmax(free, -1).gather(-1, target)[:, 0] - lp).abs().max()))
    assert drift > 1e-3  # without the replay the new biases would have changed the log-probs


def test_rejection_rule_preserves_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    V, N = 6, 200_000
    p = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    drafts = draw(q.expand(N, V), torch.rand(N, generator=g, dtype=torch.float64))
    target = p.expand(N, 2, V)
    accepted, nxt = rejection_sample(target, q.expand(N, 1, V), drafts[:, None],
                                     torch.rand(N, 2, generator=g, dtype=torch.float64))
    first = torch.where(accepted == 1, drafts, nxt)
    freq = torch.bincount(first, minlength=V).double() / N
    assert (freq - p.double()).abs().max() < 0.006
    assert abs(accepted.double().mean() - torch.minimum(p, q).sum()) < 0.006  # acceptance = sum min(p, q)
    # a greedy target (one-hot) keeps exactly the matching drafts and otherwise gives its argmax
    onehot = torch.zeros(3, 2, V)
    onehot[:, :, 2] = 1
    a, t = rejection_sample(onehot, q.expand(3, 1, V), torch.tensor([[2], [4], [0]]), torch.full((3, 2), 0.99))
    assert a.tolist() == [1, 0, 0] and t.tolist() == [2, 2, 2]


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_greedy_equals_plain_greedy(model, k):
    sp = [SamplingParams(n=2, temperature=0, max_tokens=m, ignore_eos=True) for m in (11, 6, 14, 9)]
    plain = engine(model).generate(PROMPTS, sp, use_tqdm=False)
    spec_llm = engine(model, speculative_k=k, max_num_seqs=3)
    spec = spec_llm.generate(PROMPTS, sp, use_tqdm=False)
    assert tokens(spec) == tokens(plain)
    for a, b in zip(spec, plain):
        torch.testing.assert_close(torch.tensor(a.outputs[0].logprobs), torch.tensor(b.outputs[0].logprobs),
                                   atol=1e-5, rtol=0)
    assert spec_llm.stats["draft_tokens"] > 0 and 0.0 <= spec_llm.acceptance_rate <= 1.0


def test_speculative_drafts_get_accepted_when_mtp_agrees():
    """Zeroed output norms make the main head and the MTP head both predict token 0 everywhere (all logits
    tie at 0, argmax takes the first): every draft must be accepted and the output is unchanged."""
    m = Transformer(tiny_config(), seed=3).eval()
    with torch.no_grad():
        m.model.norm.weight.zero_()
        m.mtp_modules[0].shared_head.norm.weight.zero_()
    sp = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    plain = engine(m).generate(PROMPTS, sp, use_tqdm=False)
    llm = engine(m, speculative_k=2)
    spec = llm.generate(PROMPTS, sp, use_tqdm=False)
    assert tokens(spec) == tokens(plain) == [[[0] * 9]] * len(PROMPTS)
    assert llm.acceptance_rate == 1.0
    # 9 tokens = 1 from the prefill + 8 in steps of 3 (2 drafts + 1): the last step's surplus is dropped
    assert llm.stats["accepted_tokens"] == 2 * 3 * len(PROMPTS)
    assert llm.stats["first_accepted"] == llm.stats["first_drafts"] == 3 * len(PROMPTS)  # 3 steps a prompt


def test_speculative_sampling_logprobs_and_routing_replay(model):
    m = Transformer(tiny_config(), seed=7).eval()
    llm = engine(m, speculative_k=2)
    sp = SamplingParams(n=2, temperature=0.8, max_tokens=12, seed=9, return_routing=True, ignore_eos=True)
    outs = llm.generate(PROMPTS, sp, use_tqdm=False)
    again = engine(m, speculative_k=2).generate(PROMPTS, sp, use_tqdm=False)
    assert tokens(outs) == tokens(again)
    for prompt, out in zip(PROMPTS, outs):
        for c in out.outputs:
            assert len(c.token_ids) == 12 and c.routing.shape[1] == 12
            seq = torch.tensor([prompt + c.token_ids])
            replay = [r.unsqueeze(0) for r in torch.cat([out.prompt_routing, c.routing], dim=1)]
            with torch.no_grad():
                logits = m(seq, routing=replay, return_routing=True)
            lp = torch.log_softmax(logits.logits[0, len(prompt) - 1: -1] / 0.8, -1)
            lp = lp.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            torch.testing.assert_close(lp, torch.tensor(c.logprobs), atol=1e-5, rtol=0)
            free = m(seq, return_routing=True).routing
            # recorded = what the model picks (top-k order aside)
            assert all(torch.equal(f[0].sort(-1).values, r[0].sort(-1).values) for f, r in zip(free, replay))


def test_vllm_backend_is_lazy_and_explains_itself():
    pytest.importorskip("transformers")
    import importlib.util

    from r1pipe.engine import vllm_backend

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed; the GPU tests cover it")
    with pytest.raises(ImportError, match="vllm and a CUDA GPU"):
        vllm_backend.VLLMEngine("/nonexistent")


def test_samples_share_the_prompts_mtp_cache(model):
    """The MTP cache layer of a prompt is filled before its partial last block is copied per sample, so every
    sample drafts from the same prompt state (the copy carries all cache layers)."""
    llm = engine(model, speculative_k=2)
    layer, bs = model.config.num_hidden_layers, llm.cache.block_size
    seen = []
    attach = llm.decoding.attach

    def check(out, lens, rows):
        for r, seq in rows:
            P = seq.group.prompt_len
            if P % bs:  # positions of the partial block whose MTP entries are known: P//bs*bs .. P-2
                slots = [seq.blocks[P // bs] * bs + j for j in range(P % bs - 1)]
                seen.append((seq.group.request_id, seq.index, llm.cache.pools[0][layer, 0, slots].clone()))
        attach(out, lens, rows)

    llm.decoding.attach = check
    llm.generate(PROMPTS, SamplingParams(n=3, temperature=0.8, max_tokens=3, seed=1, ignore_eos=True), use_tqdm=False)
    first = {req: kv for req, i, kv in seen if i == 0}
    assert len(seen) == 12 and any(kv.numel() for kv in first.values())
    for req, i, kv in seen:
        assert torch.equal(kv, first[req]) and (kv.numel() == 0 or kv.abs().sum() > 0)


def metaspace_tokenizer(corpus: list[str]):
    """A sentencepiece-style BPE: a word's leading space is part of its token ("▁word") and a token
    decoded alone drops it, so a stop string ending in a space completes only with the next word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], show_progress=False))
    return tok


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_stop_strings_found_without_decoding_every_step_end_where_full_decoding_ends_them(kind):
    """The stop checker decodes the tail only after tokens whose own text holds a stop string's last
    character (unless that is whitespace or not ASCII): completions must still end exactly where decoding
    the whole text finds the first stop."""
    import random
    from types import SimpleNamespace

    from r1pipe.data.tokenizer import train_tokenizer
    from r1pipe.engine.stopping import StopChecker
    from r1pipe.engine.tokenizer import TokenizerAdapter

    corpus = [f"<think> {a} + {b} = {a + b} </think> <answer>{a + b}</answer> café\n\nnext" for a in range(40) for b in range(7)]
    trained = train_tokenizer(corpus, vocab_size=300) if kind == "byte-level" else metaspace_tokenizer(corpus)
    tokenizer = TokenizerAdapter(trained)
    rng = random.Random(0)
    texts = [rng.choice(corpus)[: rng.randrange(5, 60)] + rng.choice(["</answer>", " > x", "é", "\n\n", "b> ", "ok"])
             + rng.choice(corpus) for _ in range(150)]
    vocab = tokenizer.vocab_size
    streams = [tokenizer.encode(t) for t in texts] + [[rng.randrange(vocab) for _ in range(40)] for _ in range(150)]
    stop_sets = [["</answer>"], [">"], ["b>", "café"], ["é"], ["\n\n", "</think>"], ["+ "]]
    checked = 0
    for stops in stop_sets:
        checker = StopChecker(frozenset(), tokenizer)
        for ids in streams:
            params = SimpleNamespace(logprobs=False, ignore_eos=True, stop_token_ids=None, stop=stops, max_tokens=10**6,
                                     skip_special_tokens=True, return_routing=False)
            seq = SimpleNamespace(output_ids=[], logprobs=[], params=params, finish_reason=None, stop_reason=None)
            for token in ids:
                checker.append(seq, token, None)
                if seq.finish_reason:
                    break
            ends = [k for k in range(1, len(ids) + 1) if any(s in tokenizer.decode(ids[:k]) for s in stops)]
            assert len(seq.output_ids) == (ends[0] if ends else len(ids)), (stops, ids)
            checked += bool(ends)
        if stops in (["</answer>"], [">"]):  # decided by the table of ids whose text holds ">"
            carriers = checker._carriers[tuple(stops)]
            assert carriers and all(">" in tokenizer.token_texts()[i] for i in carriers)
    assert checked > 300  # most streams do hit a stop
