"""One grading path: the same R1-style code answers get the same verdicts from GRPO's scorer, rejection
sampling's scoring and judge, and eval's grading, each called directly with the reward worker that the
stages' RewardPool actors run (in this process: no Ray)."""
from __future__ import annotations

from types import SimpleNamespace

from r1pipe.eval.scoring import GRADER_WEIGHTS, grade_all
from r1pipe.rewards.worker import RewardWorker
from r1pipe.stages.configs import DEFAULT_REWARDS
from r1pipe.stages.grpo import Scorer
from r1pipe.stages.rejection_sample import judge
from r1pipe.stages.scored_sampling import ScoredSampler
from r1pipe.stages.sections import Workers
from r1pipe.workers.batch import Completion
from r1pipe.workers.generation import Sampling

R1_CODE_ANSWERS = [  # (response, passes the HumanEval-style task below)
    ("<think>Add them.</think> <answer>\n```python\ndef add(a, b):\n    return a + b\n```\n</answer>", True),
    ("<think>Add them.</think> <answer>\n    def add(a, b):\n        return a + b\n</answer>", True),  # indented
    ("<think>Add them.</think>\n```python\ndef add(a, b):\n    return a + b\n```", True),
    ("<think>Careful.</think> <answer>\n```python\ndef add(a, b):\n    return a - b\n```\n</answer>", False),
    ("<think>```python\ndef add(a, b):\n    return a + b\n```</think> <answer>I am not sure.</answer>", False),
    ("<think>Add them.</think> <answer>\n```python\ndef add(a, b):\n    return a + b\n", True),  # cut off in the fence
]
ADD_TASK = {"task_id": "t/0", "prompt": "def add(a, b):\n", "entry_point": "add",
            "test": "def check(f):\n    assert f(2, 3) == 5\n    assert f(-1, 1) == 0\n"}


class InProcessScorer(Scorer):
    """GRPO's Scorer with its pool's worker in this process (RewardPool splits a batch over these)."""

    def _new_pool(self) -> RewardWorker:
        return RewardWorker(self.weights, threads=2, **self.options)


def test_one_r1_code_answer_scores_the_same_in_grpo_rejection_sampling_and_eval():
    responses = [r for r, _ in R1_CODE_ANSWERS]
    expected = [float(ok) for _, ok in R1_CODE_ANSWERS]
    references = [dict(ADD_TASK) for _ in responses]

    # GRPO: the rl stage's Scorer with the recipes' rewards; a row's grader is the code reward
    _, components, errors = InProcessScorer(dict(DEFAULT_REWARDS), {}, Workers()).score(responses, references)
    grpo = components["code"]

    # rejection sampling: ScoredSampler's scoring of the completions, then the stage's judge
    sampler = SimpleNamespace(pool=RewardWorker(dict(DEFAULT_REWARDS), threads=2), sampling=Sampling(k=1))
    rows = [SimpleNamespace(id=f"r{i}", reference=ref) for i, ref in enumerate(references)]
    outs = [[Completion(prompt_ids=[1], token_ids=[2, 3], text=r, logprobs=[0.0, 0.0], finish_reason="stop")] for r in responses]
    samples = ScoredSampler._score(sampler, rows, outs)
    judged = [float(judge(ref, group, list(DEFAULT_REWARDS), [], 1, "first")[1]["correct"]) for ref, group in zip(references, samples)]

    # eval: a HumanEval-kind suite graded as `r1pipe eval` grades it
    graded = grade_all("humaneval", responses, references, RewardWorker(GRADER_WEIGHTS, threads=2), progress=False)

    assert grpo == [s.components["code"] for (s,) in samples] == judged == [g.score for g in graded] == expected
    assert errors == 0 and not any(g.error for g in graded)
    # eval's record of the program is the one the code reward ran
    assert graded[0].answer == "def add(a, b):\n    return a + b\n" and graded[0].info["status"] == "passed"
    assert graded[4].answer == "I am not sure." and graded[4].info["status"] == "failed"
