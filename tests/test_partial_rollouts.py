"""Weights that change in the middle of a generation (partial rollouts): the engine records where the newer
weights took over in every sequence in flight, the tokens after that point are sampled by the new weights on
the cache the old ones computed (checked against transformers run with that mixed cache), and a threaded
RolloutWorker takes weights between two engine steps while one generation at a time runs."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from r1pipe.engine import LLM, SamplingParams
from r1pipe.workers.rollout import RolloutWorker
from tiny_models import make_tiny_dense

TEMPERATURE = 0.9
PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14, 15, 16, 17, 18]]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(old checkpoint, new checkpoint): the same tiny Qwen2 shape, other random weights."""
    root = tmp_path_factory.mktemp("partial")
    return make_tiny_dense(root / "old", "qwen2", seed=0), make_tiny_dense(root / "new", "qwen2", seed=1)


def hf(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def logprobs_of(logits: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """log_softmax(logits / T) of `tokens`: logits [n, V] -> [n]."""
    return torch.log_softmax(logits / TEMPERATURE, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def full_forward(model, prompt: list[int], out: list[int]) -> torch.Tensor:
    """Each output token's log-prob under `model` run over the whole sequence: [len(out)]."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out])).logits[0, len(prompt) - 1:-1]
    return logprobs_of(logits, out)


def mixed_forward(old, new, prompt: list[int], out: list[int], p: int) -> torch.Tensor:
    """The log-probs of out[p:] when the weights changed after out[p - 1] was sampled: `old` cached the prompt
    and out[:p - 1]; `new` feeds out[p - 1:] on that cache (transformers' own KV cache)."""
    ids = torch.tensor([prompt + out])
    cached = len(prompt) + p - 1
    with torch.no_grad():
        past = old(ids[:, :cached], use_cache=True).cache
        logits = new(ids[:, cached:-1], cache=past, use_cache=True).logits[0]
    return logprobs_of(logits, out[p:])


def test_a_weight_change_between_steps_keeps_the_cache_and_records_each_tokens_version(weights):
    old_dir, new_dir = weights
    old, new = hf(old_dir), hf(new_dir)
    llm = LLM(old_dir, block_size=4, num_blocks=256, max_num_seqs=4)
    # prompt 0 finishes first; prompt 1 is mid-way then; prompts 2 and 3 wait for room (4 sequences at most)
    params = [SamplingParams(n=2, temperature=TEMPERATURE, max_tokens=3 if i == 0 else 10, seed=40 + i, ignore_eos=True)
              for i in range(len(PROMPTS))]
    stream = llm.iter_generate(PROMPTS, params)
    first = next(stream)
    assert [i for i, _ in first] == [0] and len(llm.scheduler.waiting) == 2
    with llm.step_lock:  # what RolloutWorker.receive_weights does from its own thread
        llm.update_weights(new.state_dict())
        llm.weights_changed()
    assert llm.weights_version == 1
    outs = dict(first + [pair for finished in stream for pair in finished])

    assert outs[0].weights_version == 0 and all(c.weight_changes == [] for c in outs[0].outputs)
    for c in outs[0].outputs:
        torch.testing.assert_close(torch.tensor(c.logprobs), full_forward(old, PROMPTS[0], c.token_ids), atol=1e-5, rtol=0)
    for c in outs[1].outputs:  # in flight at the change: old weights before it, new ones on the old cache after
        [p] = c.weight_changes
        assert 1 < p < 10
        engine = torch.tensor(c.logprobs)
        torch.testing.assert_close(engine[:p], full_forward(old, PROMPTS[1], c.token_ids)[:p], atol=1e-5, rtol=0)
        torch.testing.assert_close(engine[p:], mixed_forward(old, new, PROMPTS[1], c.token_ids, p), atol=1e-5, rtol=0)
        # the kept cache matters: recomputing the prefix with the new weights gives other log-probs
        assert (engine[p:] - full_forward(new, PROMPTS[1], c.token_ids)[p:]).abs().max() > 1e-3
        versions = RolloutWorker._completion(outs[1], c).token_versions
        assert versions == [0] * p + [1] * (10 - p)
    for i in (2, 3):  # not admitted at the change: all new weights
        assert outs[i].weights_version == 0
        for c in outs[i].outputs:
            assert c.weight_changes == [0]
            torch.testing.assert_close(torch.tensor(c.logprobs), full_forward(new, PROMPTS[i], c.token_ids),
                                       atol=1e-5, rtol=0)
            assert RolloutWorker._completion(outs[i], c).token_versions == [1] * 10
    again = llm.generate(PROMPTS[:1], params[0], use_tqdm=False)[0]  # a later request starts at the new version
    assert again.weights_version == 1 and again.outputs[0].weight_changes == []


def test_a_preempted_sequence_records_the_change_and_recomputes_its_cache_with_the_new_weights(weights):
    old_dir, new_dir = weights
    new = hf(new_dir)
    # 9 usable blocks of 4 tokens: three sequences cannot all grow past 12 tokens, so the youngest is preempted
    llm = LLM(old_dir, block_size=4, num_blocks=10, max_num_seqs=4)
    params = [SamplingParams(n=1, temperature=TEMPERATURE, max_tokens=12, seed=1, ignore_eos=True),
              SamplingParams(n=2, temperature=TEMPERATURE, max_tokens=16, seed=2, ignore_eos=True)]
    stream = llm.iter_generate([[3, 4], [5, 6]], params)
    assert [i for i, _ in next(stream)] == [0]
    [seq] = llm.scheduler.preempted  # the younger sample of prompt 1, waiting for room
    index, changed_at = seq.index, len(seq.output_ids)
    with llm.step_lock:
        llm.update_weights(new.state_dict())
        llm.weights_changed()
    [(_, out)] = [pair for finished in stream for pair in finished]
    c = out.outputs[index]
    assert c.weight_changes == [changed_at] and 0 < changed_at < 16
    torch.testing.assert_close(torch.tensor(c.logprobs[changed_at:]),
                               full_forward(new, [5, 6], c.token_ids)[changed_at:], atol=1e-5, rtol=0)


def test_a_threaded_worker_takes_weights_between_steps_of_a_generation_in_flight(weights, monkeypatch):
    old_dir, new_dir = weights
    old, new = hf(old_dir), hf(new_dir)
    worker = RolloutWorker(str(old_dir), {"block_size": 4, "num_blocks": 256, "max_num_seqs": 8})
    worker.set_policy_version(5)
    paused, resume = threading.Event(), threading.Event()
    take_retired, steps = worker.llm.scheduler.take_retired, []

    def after_each_step():  # called by the engine loop between steps, outside the step lock
        steps.append(1)
        if len(steps) == 4:
            paused.set()
            assert resume.wait(30)
        return take_retired()

    monkeypatch.setattr(worker.llm.scheduler, "take_retired", after_each_step)
    results: dict[str, list] = {}
    finished: list[str] = []

    def generate(name: str, prompts: list[list[int]], seed: int) -> None:
        results[name] = worker.generate(prompts, n=2, temperature=TEMPERATURE, max_tokens=12, seeds=[seed] * len(prompts))
        finished.append(name)

    first = threading.Thread(target=generate, args=("first", PROMPTS[:2], 7))
    first.start()
    assert paused.wait(30)
    lengths = [len(s.output_ids) for s in worker.llm.scheduler.running]
    second = threading.Thread(target=generate, args=("second", PROMPTS[2:], 8))
    second.start()  # waits for the first generation (the generation lock), so nothing steps meanwhile
    time.sleep(0.3)
    assert worker.generation_lock.locked() and [len(s.output_ids) for s in worker.llm.scheduler.running] == lengths
    worker.update_weights(new.state_dict())  # takes the step lock: the paused engine is between two steps
    resume.set()
    first.join(60)
    second.join(60)
    assert finished == ["first", "second"]

    spanning = 0
    for prompt, group in zip(PROMPTS[:2], results["first"]):
        for c in group:  # those that had not finished by the change: the old weights up to it, the new after
            p = c.token_versions.count(5)
            assert c.token_versions == [5] * p + [6] * (len(c.token_ids) - p)
            spanning += 0 < p < len(c.token_ids)
            engine = torch.tensor(c.logprobs)
            torch.testing.assert_close(engine[:p], full_forward(old, prompt, c.token_ids)[:p], atol=1e-5, rtol=0)
            if p < len(c.token_ids):
                torch.testing.assert_close(engine[p:], mixed_forward(old, new, prompt, c.token_ids, p), atol=1e-5, rtol=0)
    assert spanning > 0
    for prompt, group in zip(PROMPTS[2:], results["second"]):
        for c in group:
            assert c.token_versions == [6] * len(c.token_ids)
            torch.testing.assert_close(torch.tensor(c.logprobs), full_forward(new, prompt, c.token_ids), atol=1e-5, rtol=0)
