"""The generation group against the engine in this process: two rollout workers, each with part of the prompts,
return what one r1pipe.engine.LLM samples for every prompt with that prompt's seed, in prompt order, blocking
and streamed; a completion that a stop string ended keeps it and nothing after it."""
from __future__ import annotations

import pytest

from r1pipe.engine import LLM, SamplingParams
from r1pipe.stages.sections import SamplingResources, Workers
from r1pipe.workers.generation import GenerationGroup, Sampling
from tiny_models import make_tiny_v3

pytestmark = pytest.mark.usefixtures("ray_cluster")  # a 2-CPU Ray cluster for the module (conftest)

PROMPTS = ["What is 12 + 7?", "What is 40 - 3?", "What is 5 + 5?", "What is 9 - 8?", "What is 31 + 2?"]


def test_two_workers_sample_what_one_engine_samples_in_prompt_order(tmp_path):
    model = str(make_tiny_v3(tmp_path / "model"))
    llm = LLM(model, seed=0)
    free = llm.generate(PROMPTS[:1], SamplingParams(temperature=1.0, max_tokens=16, seed=1, ignore_eos=True), use_tqdm=False)
    text = free[0].outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]  # a string the model does write
    sampling = Sampling(k=2, temperature=1.0, max_tokens=16, stop=(stop,), seed=3)
    reference = [llm.generate([p], SamplingParams(n=2, temperature=1.0, max_tokens=16, stop=[stop], seed=sampling.prompt_seed(i),
                                                  include_stop_str_in_output=True), use_tqdm=False)[0].outputs
                 for i, p in enumerate(PROMPTS)]
    group = GenerationGroup.reserve(model, SamplingResources(rollout=Workers(workers=2, cpus=0.5)), with_reward=False)
    try:
        blocking = group.generate(PROMPTS, sampling)
        streamed: dict[int, list] = {}
        for finished in group.stream(PROMPTS, sampling):
            for i, completions in finished:
                assert i not in streamed
                streamed[i] = completions
        shown = group.generate(PROMPTS, sampling, progress=True)
        assert len(set(group.on_each("node_id"))) == 1 and len(group.workers) == 2
    finally:
        group.shutdown()
    assert sorted(streamed) == list(range(len(PROMPTS)))
    stopped = 0
    for i, want in enumerate(reference):
        for got in (blocking[i], streamed[i], shown[i]):
            assert [(c.text, c.token_ids, c.finish_reason) for c in got] == [(c.text, c.token_ids, c.finish_reason) for c in want]
        for c in blocking[i]:
            if c.finish_reason == "stop" and c.text.endswith(stop):
                stopped += 1
                assert stop not in c.text[:-len(stop)]  # the first occurrence ends it
    assert stopped >= 1
