"""Reward composition, format and language rewards, error accounting, and the Ray pool."""

from __future__ import annotations

import pytest

from r1pipe.rewards import RewardResult, build_reward_fn
from r1pipe.rewards.format import format_lenient, format_strict
from r1pipe.rewards.language import language_share

GOOD = "<think>We add 2 and 3 to get 5.</think> <answer>\\boxed{5}</answer>"


def test_weighted_total_and_components():
    fn = build_reward_fn({"accuracy": 1.0, "format": 0.5, "language": 0.1})
    r = fn(GOOD, {"answer": "5"})
    assert isinstance(r, RewardResult)
    assert r.components == {"accuracy": 1.0, "format": 1.0, "language": 1.0}
    assert r.total == pytest.approx(1.6)
    assert r.info["errors"] == {}
    wrong = fn(GOOD.replace("{5}", "{6}"), {"answer": "5"})
    assert wrong.components["accuracy"] == 0.0 and wrong.total == pytest.approx(0.6)


def test_gsm8k_gold_field_is_understood():
    fn = build_reward_fn({"accuracy": 1.0})
    assert fn("<answer>1200</answer>", {"answer": "so 12 * 100\n#### 1,200"}).total == 1.0


def test_crashing_reward_scores_zero_and_is_counted():
    fn = build_reward_fn({"accuracy": 1.0, "format": 1.0})
    r = fn(GOOD, {})  # no gold answer: accuracy raises
    assert r.components["accuracy"] == 0.0 and r.components["format"] == 1.0
    assert "accuracy" in r.info["errors"] and r.total == 1.0


def test_math_timeout_scores_zero_and_is_counted():
    fn = build_reward_fn({"accuracy": 1.0}, math_timeout_s=0.5)
    r = fn("<answer>9^{9^{9^{9}}}</answer>", {"answer": "3"})
    assert r.total == 0.0 and "accuracy" in r.info["errors"] and r.info["timeouts"] == ["accuracy"]


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="acuracy"):
        build_reward_fn({"acuracy": 1.0})
    with pytest.raises(ValueError, match="math_timeout"):
        build_reward_fn({"accuracy": 1.0}, math_timeout=1)


def test_code_reward_humaneval_style():
    problem = {"prompt": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n", "entry_point": "add",
               "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}
    fn = build_reward_fn({"code": 1.0, "format": 0.5})
    good = "<think>easy</think> <answer>```python\ndef add(a, b):\n    return a + b\n```</answer>"
    assert fn(good, problem).components == {"code": 1.0, "format": 1.0}
    assert fn(good.replace("a + b", "a - b"), problem).components["code"] == 0.0


@pytest.mark.parametrize("text,strict,lenient", [
    ("<think>reasoning</think> <answer>4</answer>", 1.0, 1.0),
    ("  <think>\nr\n</think>\n<answer>\n4\n</answer>\n", 1.0, 1.0),
    ("intro <think>r</think> <answer>4</answer>", 0.0, 1.0),
    ("<think>r</think> <answer>4</answer> trailing", 0.0, 1.0),
    ("<think>r</think> middle <answer>4</answer>", 0.0, 1.0),
    ("<think>r</think><answer>4</answer><answer>5</answer>", 0.0, 1.0),
    ("<think>r</think> <answer> </answer>", 0.0, 0.0),
    ("<think></think> <answer>4</answer>", 0.0, 1.0),
    ("<answer>4</answer> <think>r</think>", 0.0, 0.0),
    ("no tags at all", 0.0, 0.0),
    ("<think>r <answer>4</answer>", 0.0, 0.0),
])
def test_format_rewards(text, strict, lenient):
    assert format_strict(text) == strict
    assert format_lenient(text) == lenient


def test_format_with_think_in_prompt():
    assert format_strict("reasoning</think> <answer>4</answer>", think_in_prompt=True) == 1.0
    assert format_strict("reasoning</think> <answer>4</answer>") == 0.0


def test_language_share():
    assert language_share("We compute $x^2 + \\frac{1}{2}$ and then 3 + 4 = 7.") == 1.0
    assert language_share("我们 compute 平方") == pytest.approx(1 / 5)  # 4 Han characters, 1 English word
    assert language_share("我们计算", "zh") == 1.0
    assert language_share("Сначала we посчитаем", "ru") == pytest.approx(2 / 3)
    assert language_share("12 + 34 = 46") == 0.0  # no words at all
    fn = build_reward_fn({"language": 1.0})
    assert fn("<think>Zuerst rechnen wir</think><answer>4</answer>", {"language": "zh"}).total == 0.0


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_reward_pool_matches_local_scoring(ray_local):
    from r1pipe.rewards.worker import RewardPool, RewardWorker

    weights = {"accuracy": 1.0, "format": 0.5}
    completions = [f"<think>t</think> <answer>\\boxed{{{k}/2}}</answer>" for k in range(12)]
    references = [{"answer": str(k / 2)} if k % 3 else {"answer": "100"} for k in range(12)]
    references[5] = {}  # a broken reference: scored 0 and counted, not fatal
    pool = RewardPool(weights, num_workers=2)
    try:
        remote = pool.score(completions, references)
    finally:
        pool.shutdown()
    local = RewardWorker(weights, threads=1).score(completions, references)
    assert [r.total for r in remote] == [r.total for r in local]
    assert [r.components for r in remote] == [r.components for r in local]
    assert remote[5].info["errors"].keys() == {"accuracy"}
    assert [r.components["accuracy"] for r in remote] == [0.0 if k % 3 == 0 or k == 5 else 1.0 for k in range(12)]


def test_reward_pool_programs_run_at_low_cpu_priority(ray_local):
    """Pool workers yield the CPU to generation: a sandboxed program runs `nice` steps lower than the
    same program in a pool with nice=0 (Ray already runs its workers niced; 19 is the floor)."""
    from r1pipe.rewards.worker import RewardPool

    program = "<answer> def f(x): return x </answer>"
    refs = [{"test_list": [f"assert os.nice(0) == {n}"], "test_imports": ["import os"]} for n in range(20)]

    def niceness(nice: int) -> int:  # the one n whose test passes
        pool = RewardPool({"code": 1.0}, num_workers=1, nice=nice)
        try:
            passed = [n for n, r in enumerate(pool.score([program] * 20, refs)) if r.total == 1.0]
        finally:
            pool.shutdown()
        assert len(passed) == 1, passed
        return passed[0]

    base = niceness(0)
    assert niceness(10) == min(19, base + 10) > base


def test_background_pool_programs_run_under_sched_idle(ray_local):
    """A background pool (nice > 0) scores on SCHED_IDLE threads: its sandboxed programs inherit the
    policy, so they only take CPU time that generation leaves; a pool with nice=0 does not."""
    from r1pipe.rewards.worker import RewardPool

    program = "<answer> def f(x): return x </answer>"
    refs = [{"test_list": ["assert os.sched_getscheduler(0) == os.SCHED_IDLE"], "test_imports": ["import os"]}] * 2

    def idle(nice: int) -> list[float]:
        pool = RewardPool({"code": 1.0}, num_workers=1, nice=nice)
        try:
            return [r.total for r in pool.score([program] * 2, refs)]
        finally:
            pool.shutdown()

    assert idle(10) == [1.0, 1.0] and idle(0) == [0.0, 0.0]


def test_code_verdicts_are_cached_per_program_and_tests(monkeypatch):
    import r1pipe.rewards.compose as compose

    runs = []
    real = compose.run_tests
    monkeypatch.setattr(compose, "run_tests", lambda program, ref, opt: runs.append(program) or real(program, ref, opt))
    compose._code_cache.clear()
    ref = {"test_list": ["assert f(2) == 5"]}
    right, wrong = "<think> x </think> <answer> def f(x): return x + 3 </answer>", "<answer> def f(x): return x </answer>"
    fn = build_reward_fn({"code": 1.0})
    assert [fn(t, ref).total for t in (right, wrong, right, wrong)] == [1.0, 0.0, 1.0, 0.0]
    assert len(runs) == 2  # each program ran once
    assert fn(right, {"test_list": ["assert f(2) == 6"]}).total == 0.0 and len(runs) == 3  # other tests: run again
    off = build_reward_fn({"code": 1.0}, code_cache=False)
    assert off(right, ref).total == 1.0 and len(runs) == 4
    # a timeout is never cached
    loop = "<answer> def f(x):\n    while True: pass </answer>"
    slow = build_reward_fn({"code": 1.0}, code_timeout_s=0.5)
    assert slow(loop, ref).total == 0.0 and slow(loop, ref).total == 0.0 and len(runs) == 6


def test_summary_reward_checks_the_closing_summary():
    fn = build_reward_fn({"summary": 1.0})
    ref = {"answer": "132", "domain": "math"}
    assert fn(" <think> step 7+5=12 keep 2 ; so 47 + 85 = 132 </think> <answer> 132 </answer>", ref).total == 1.0
    assert fn(" <think> step 7+5=12 keep 2 ; step 4+8+1=13 keep 132 </think> <answer> 132 </answer>", ref).total == 0.0
    assert fn(" <think> so 132 </think> <answer> 132 </answer>", ref).total == 0.0  # a summary of nothing
