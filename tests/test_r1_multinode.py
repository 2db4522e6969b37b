"""The tiny R1 recipe (recipes/r1-tiny.yaml: pretrain, cold start, reasoning RL, rejection sampling, SFT,
all-scenario RL, scorecard), shrunk by overrides, on two Ray nodes simulated on this machine
(ray.cluster_utils.Cluster), then on one node. Every node offers one `trainer_slot`, `rollout_slot` and
`reward_slot`; every stage asks for two workers per role, each with {<role>_slot: 1}, under the SPREAD strategy,
so each stage's trainer workers, rollout engines and reward workers sit one on each node. Across nodes the
replicas sum their gradients and the trainers send the engines their weights over gloo (one node uses /dev/shm
where it has room); per-prompt seeds decide the samples and a sum of two gradients does not depend on where it is
taken, so the two-node run equals the one-node run exactly, stage by stage: every metric but wall-clock ones,
every kept sample, every scorecard answer and the scorecard itself.

Two concessions to a base this small, which solves nothing (as in test_rejection_sample's end-to-end test):
rejection sampling reads the base greedily, on train prompts whose answers are set to the base's own greedy
answers on every other row (test_rejection_sample.known_prompts), so it keeps samples; and the recipe's
`ends_with_summary` filter is left out, as only the cold start teaches R1's closing summary. The base is trained
on two nodes and cached; the one-node run reuses it."""
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
from ray._private.state import actors as actor_table  # noqa: E402  (the GCS actor table: an actor's node, no dashboard)
from ray.cluster_utils import Cluster  # noqa: E402
from test_rejection_sample import PRETRAIN, TINY, known_prompts, overrides  # noqa: E402

import r1pipe.run  # noqa: E402
from r1pipe.config import find_recipe, load_recipe  # noqa: E402
from r1pipe.rewards.worker import RewardPool  # noqa: E402
from r1pipe.stages.base import StageSpec  # noqa: E402
from r1pipe.workers.generation import GenerationGroup  # noqa: E402
from r1pipe.workers.group import PolicyGroup  # noqa: E402

STAGES = ["pretrain", "cold_start", "reasoning_rl", "rejection_sample", "sft", "all_rl", "scorecard"]
ROLES = {"pretrain": ("trainer", "rollout"),  # rollout: the base check, generated where the trainers trained
         "cold_start": ("trainer",), "reasoning_rl": ("trainer", "rollout", "reward"),
         "rejection_sample": ("rollout", "reward"), "sft": ("trainer",),
         "all_rl": ("trainer", "rollout", "reward"), "scorecard": ("rollout", "reward")}
SLOTS = {f"{role}_slot": 1.0 for role in ("trainer", "rollout", "reward")}  # per node
CPUS = {"trainer": 0.5, "rollout": 0.25, "reward": 0.25}  # per worker: no stage asks for more than a node's 1 CPU
TIMING = ("time/", "seconds", "per_second")  # wall-clock figures, which differ from run to run
KEPT_FILES = ["rejection_sample/samples.jsonl", *(f"scorecard/{s}.answers.jsonl" for s in ("pretrain", "cold_start",
                                                                                          "reasoning_rl", "sft", "all_rl"))]


def write_recipe(path: Path) -> Path:
    """recipes/r1-tiny.yaml without the rejection filter `ends_with_summary` (an override cannot drop a key)."""
    recipe = yaml.safe_load(find_recipe("r1-tiny").read_text())
    del recipe["rejection_sample"]["filters"]["ends_with_summary"]
    path.write_text(yaml.safe_dump(recipe))
    return path


def recipe_overrides(cache_dir: Path, known: Path) -> list[str]:
    """r1-tiny shrunk to minutes, every role of every stage placed as two workers spread over the nodes."""
    out = [*overrides("model.overrides", TINY), *overrides("pretrain", {**PRETRAIN, "eval_size": 4, "cache_dir": str(cache_dir)}),
           "cold_start.epochs=2",
           "reasoning_rl.steps=2", "reasoning_rl.rollout.prompts_per_step=4", "reasoning_rl.rollout.group_size=4",
           "reasoning_rl.data.heldout_size=8", "reasoning_rl.checkpoint.every=2",
           f"rejection_sample.prompts_path={known}", "rejection_sample.model_path=stage:pretrain.model_path",
           "rejection_sample.limit=0", "rejection_sample.temperature=0.0", "rejection_sample.k=2",
           "rejection_sample.shard_size=6",
           "sft.epochs=2",
           "all_rl.steps=2", "all_rl.rollout.prompts_per_step=4", "all_rl.rollout.group_size=4",
           "all_rl.data.heldout_size=8", "all_rl.checkpoint.every=2",
           "scorecard.per_domain=8"]
    for stage, roles in ROLES.items():
        out.append(f"{stage}.resources.placement_strategy=SPREAD")
        for role in roles:
            if (stage, role) != ("pretrain", "rollout"):  # the base check takes the trainer section's workers
                out += [f"{stage}.resources.{role}.workers=2", f"{stage}.resources.{role}.cpus={CPUS[role]}",
                        f"{stage}.resources.{role}.custom={{{role}_slot: 1}}"]
    return out


@dataclass
class Placement:
    """Filled as recipes run: (stage, role) -> the nodes of the actors the stage started in that role; stage ->
    whether its weight sync went through shared memory."""

    nodes: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    shared_memory_sync: dict[str, bool] = field(default_factory=dict)


def node_of(handle) -> str:
    ray.get(handle.__ray_ready__.remote())  # placed and started
    return actor_table(handle._actor_id.hex())["Address"]["NodeID"]


def record_placement(monkeypatch) -> Placement:
    seen, current = Placement(), {"stage": None}
    real_get_stage, real_connect = r1pipe.run.get_stage, PolicyGroup.connect_engines

    def get_stage(kind):
        spec = real_get_stage(kind)

        def fn(cfg, ctx):
            current["stage"] = ctx.stage_dir.name
            return spec.fn(cfg, ctx)

        return StageSpec(spec.kind, spec.config_cls, fn)

    def recording(cls, role):
        real_init = cls.__init__

        def init(self, *args, **kwargs):
            real_init(self, *args, **kwargs)
            seen.nodes.setdefault((current["stage"], role), set()).update(node_of(w) for w in self.workers)

        monkeypatch.setattr(cls, "__init__", init)

    def connect_engines(self, *args, **kwargs):
        real_connect(self, *args, **kwargs)
        seen.shared_memory_sync[current["stage"]] = self.shared_memory

    monkeypatch.setattr(r1pipe.run, "get_stage", get_stage)
    monkeypatch.setattr(PolicyGroup, "connect_engines", connect_engines)
    recording(PolicyGroup, "trainer")
    recording(GenerationGroup, "rollout")
    recording(RewardPool, "reward")
    return seen


def figures(obj, run_dir: Path):
    """Outputs or metrics without wall-clock figures, paths relative to the run directory."""
    if isinstance(obj, dict):
        return {k: figures(v, run_dir) for k, v in obj.items() if not any(t in k for t in TIMING)}
    if isinstance(obj, list):
        return [figures(v, run_dir) for v in obj]
    return obj.replace(str(run_dir), "<run>") if isinstance(obj, str) else obj


def stage_results(run_dir: Path) -> dict[str, dict]:
    """Per stage: its outputs (DONE.json) and every logged metric (metrics.jsonl), timings left out."""
    out = {}
    for stage in STAGES:
        out[stage] = {"outputs": figures(json.loads((run_dir / stage / "DONE.json").read_text()), run_dir)}
        metrics = run_dir / stage / "metrics.jsonl"
        if metrics.exists():
            out[stage]["metrics"] = [figures(json.loads(line), run_dir) for line in metrics.read_text().splitlines()]
    return out


@pytest.mark.slow  # ~6.5 min on 2 shared cores (the base trains once)
def test_r1_recipe_on_two_nodes_equals_one_node(tmp_path, monkeypatch):
    known = tmp_path / "known.jsonl"  # written once the base is trained, on two nodes
    recipe, args = write_recipe(tmp_path / "r1-tiny.yaml"), recipe_overrides(tmp_path / "cache", known)
    cfg = load_recipe(recipe, args)
    assert list(cfg.stages) == STAGES

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": SLOTS})
    cluster.add_node(num_cpus=1, resources=SLOTS)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        both = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        two_nodes = record_placement(monkeypatch)
        base = r1pipe.run.run_recipe(load_recipe(recipe, [*args, "stages=[pretrain]"]), tmp_path / "two")["pretrain"]
        known_prompts(base, known, max_tokens=int(cfg.rejection_sample.max_tokens))
        r1pipe.run.run_recipe(cfg, tmp_path / "two")  # the rest of the recipe (pretrain is done)
    finally:
        ray.shutdown()
        cluster.shutdown()
    monkeypatch.undo()

    ray.init(num_cpus=2, resources={slot: 2 * n for slot, n in SLOTS.items()}, include_dashboard=False, log_to_driver=False)
    try:
        one_node = record_placement(monkeypatch)
        r1pipe.run.run_recipe(cfg, tmp_path / "one")  # pretrain: the base cached by the two-node run
    finally:
        ray.shutdown()

    assert len(both) == 2
    assert {key: len(n) for key, n in two_nodes.nodes.items()} == {(s, role): 2 for s, roles in ROLES.items() for role in roles}
    assert all(n == both for n in two_nodes.nodes.values())
    assert two_nodes.shared_memory_sync == {"reasoning_rl": False, "all_rl": False}  # gloo between the nodes
    assert len(set().union(*one_node.nodes.values())) == 1

    one, two = stage_results(tmp_path / "one"), stage_results(tmp_path / "two")
    assert two["pretrain"]["outputs"] == one["pretrain"]["outputs"]  # the same base (no training log: cached)
    assert one["rejection_sample"]["outputs"]["kept"] >= 1
    for stage in STAGES[1:]:
        assert two[stage] == one[stage], stage
    for name in KEPT_FILES:  # every kept sample and every scorecard answer, word for word
        texts = [(tmp_path / run / name).read_text().replace(str(tmp_path / run), "<run>") for run in ("one", "two")]
        assert texts[0] == texts[1], name
    scorecard = json.loads((tmp_path / "two" / "summary.json").read_text())["per_stage"]
    assert scorecard == json.loads((tmp_path / "one" / "summary.json").read_text())["per_stage"]
    assert sorted(scorecard) == sorted(STAGES[:3] + ["sft", "all_rl"])
    assert all(row["n"] == {"code": 8, "math": 8} for row in scorecard.values())
