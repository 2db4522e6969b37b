"""Per-role Ray resources: the arithmetic, the cluster/ examples checked against it, and a recipe that
asks for more than the cluster has failing fast with the numbers (a real Ray instance)."""
import re
import shlex
from pathlib import Path

import pytest

from r1pipe.config import load_recipe, make_config, stage_config
from r1pipe.stages.configs import GRPOConfig
from r1pipe.stages.grpo import resource_plan
from r1pipe.workers.placement import InsufficientResources, ResourcePlan, RoleResources

ROOT = Path(__file__).resolve().parents[1]


def test_arithmetic_names_every_role_and_the_shortfall():
    plan = ResourcePlan([RoleResources("policy", 32, 0.5, 1.0, key="rl.resources.trainer"),
                         RoleResources("rollout", 1, 0.5, 1.0, key="rl.resources.rollout"),
                         RoleResources("reward", 2, 1.0, key="rl.resources.reward", in_group=False)])
    assert plan.totals() == {"CPU": 18.5, "GPU": 33.0}
    assert plan.shortfall({"CPU": 64, "GPU": 32}) == {"GPU": 1.0}
    lines = plan.arithmetic({"CPU": 64, "GPU": 32})
    assert lines == ["  CPU: asked 18.5 = policy 32 x 0.5 + rollout 1 x 0.5 + reward 2 x 1; available 64",
                     "  GPU: asked 33 = policy 32 x 1 + rollout 1 x 1; available 32  <- short by 1"]
    assert len(plan.bundles()) == 33 and plan.bundle_index("rollout", 0) == 32  # reward is not in the group


def rl(values: dict) -> GRPOConfig:
    return make_config(GRPOConfig, values, "rl")


def test_each_role_asks_for_its_own_resources():
    cfg = rl({"resources.trainer": {"workers": 2, "cpus": 2.0, "gpus": 1.0, "custom": {"slot": 1}},
              "resources.rollout.gpus": 0.5, "rewards.weights": {}})
    roles = {r.role: r for r in resource_plan(cfg).roles}
    assert (roles["policy"].count, roles["policy"].cpus, roles["policy"].gpus, roles["policy"].custom) == (2, 2.0, 1.0, {"slot": 1})
    assert (roles["rollout"].count, roles["rollout"].cpus, roles["rollout"].gpus) == (1, 0.5, 0.5)
    assert "reward" not in roles  # no reward pool without reward weights
    roles = {r.role: r for r in resource_plan(rl({"resources.reward": {"workers": 3, "cpus": 2.0}})).roles}
    assert (roles["reward"].count, roles["reward"].cpus, roles["reward"].in_group) == (3, 2.0, False)


def test_zero_cpus_and_bad_strategy_are_refused_by_name():
    with pytest.raises(ValueError, match=r"rl\.resources\.trainer\.cpus must be > 0"):
        rl({"resources.trainer.cpus": 0.0})
    with pytest.raises(ValueError, match=r"rl\.resources\.placement_strategy='TIGHT'"):
        rl({"resources.placement_strategy": "TIGHT"})
    with pytest.raises(ValueError, match=r"rl\.resources\.reward\.gpus=1"):
        rl({"resources.reward.gpus": 1})


def _examples(text: str) -> list[tuple[int, list[str]]]:
    """(GPUs the example runs on, its rl.* overrides) of every GPU example in the text."""
    out = []
    for line in text.splitlines():
        m = re.search(r"sbatch --nodes=(\d+) cluster/slurm.sbatch r1-zero (.*?)`?$", line)
        if m:
            gpus_per_node = int(re.search(r"#SBATCH --gpus-per-node=(\d+)", (ROOT / "cluster/slurm.sbatch").read_text())[1])
            out.append((int(m[1]) * gpus_per_node, shlex.split(m[2].rstrip(".").strip("`"))))
        m = re.search(r"^r1pipe run r1-zero (.*rl\.resources\.device=cuda.*)$", line)
        if m:
            node = re.search(r"On one (\d+)-GPU node", text)
            out.append((int(node[1]), shlex.split(m[1])))
    return out


@pytest.mark.parametrize("doc", ["docs/cluster.md", "cluster/slurm.sbatch"])
def test_cluster_examples_fit_the_gpus_they_run_on(doc):
    examples = _examples((ROOT / doc).read_text())
    assert examples, f"no GPU example found in {doc}"
    for gpus, overrides in examples:
        keys = [o for o in overrides if o.startswith("rl.")]
        cfg = stage_config(load_recipe("r1-zero", keys), "rl")
        asked = resource_plan(cfg).totals().get("GPU", 0.0)
        assert asked == gpus, f"{doc}: {' '.join(keys)} asks for {asked} GPUs on {gpus}"


@pytest.mark.parametrize("recipe", ["r1-zero", "r1-zero-tiny", "r1-tiny", "distill-tiny"])
def test_the_tiny_recipes_fit_a_two_core_laptop(recipe):
    """The recipes a plain `r1pipe run` uses with no model ask for at most the 2 CPUs of the laptop they run on."""
    cfg = load_recipe(recipe)
    grpo = [name for name in cfg.stages if cfg[name].get("kind") == "grpo"]
    assert grpo
    for name in grpo:
        asked = resource_plan(stage_config(cfg, name)).totals()
        assert asked["CPU"] <= 2 and asked.get("GPU", 0) == 0, f"{recipe}.{name} asks for {asked}"


def test_readme_error_example_is_the_real_message():
    plan = resource_plan(rl({"resources.trainer": {"workers": 8, "gpus": 1}, "resources.rollout.gpus": 1}))
    text = (ROOT / "docs/cluster.md").read_text()
    for line in plan.arithmetic({"CPU": 64, "GPU": 8}, {"CPU": 64, "GPU": 8}):
        assert line in text


def test_asking_for_more_than_the_cluster_fails_fast_naming_the_numbers(tmp_path):
    ray = pytest.importorskip("ray")
    from r1pipe.workers.placement import reserve

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        # more than the cluster has: refused before any placement group (no wait at all: timeout_s is
        # far longer than a test may run)
        with pytest.raises(InsufficientResources) as e:
            reserve(resource_plan(rl({"resources.trainer": {"workers": 2, "gpus": 1}})), timeout_s=3600)
        assert "GPU: asked 2 = policy 2 x 1; available 0" in str(e.value)
        with pytest.raises(InsufficientResources) as e:
            reserve(resource_plan(rl({"resources.trainer": {"workers": 3, "cpus": 1}, "rewards.weights": {}})), 3600)
        assert "CPU: asked 3.5 = policy 3 x 1 + rollout 1 x 0.5; available 2" in str(e.value)
        # fits the cluster, but not what is free: the placement group times out with the arithmetic
        one_cpu = rl({"resources.trainer.cpus": 1, "rewards.weights": {}})  # 1 + 0.5 for the rollout worker
        hog = reserve(resource_plan(one_cpu), 60)
        with pytest.raises(InsufficientResources, match=r"not ready after 2s[\s\S]*CPU: asked 1.5"):
            reserve(resource_plan(one_cpu), timeout_s=2)
        hog.remove()
        reserve(resource_plan(one_cpu), 60).remove()  # fits again
    finally:
        ray.shutdown()
