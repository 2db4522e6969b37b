"""Two Ray nodes simulated on this machine (ray.cluster_utils.Cluster): each node offers one
`policy_slot`, so rl.resources.trainer.custom={policy_slot: 1} puts one FSDP policy worker on each node;
the GRPO steps then equal the same run on one node (~1.5 min on 2 shared cores)."""
import json

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from test_grpo_run import context, grpo_config, make_tiny_model, write_problems  # noqa: E402

from r1pipe.stages.grpo import run_grpo  # noqa: E402



def metrics(run_dir):
    return [json.loads(l) for l in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines()]


def test_two_node_run_equals_the_single_node_run(tmp_path, monkeypatch):
    root = tmp_path / "task"
    root.mkdir()
    task = {"model": str(make_tiny_model(root / "model")), "train": str(write_problems(root / "train.jsonl", 16)),
            "heldout": str(write_problems(root / "heldout.jsonl", 4))}
    cfg = {"steps": 2, "rollout": {"prompts_per_step": 2, "group_size": 4, "dynamic_sampling": False}, "checkpoint.every": 2,
           "resources.trainer": {"workers": 2, "cpus": 0.5}, "resources.rollout.cpus": 0.5, "sync.check_every": 1,
           "data.heldout_size": 4}

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run_grpo(grpo_config(task, cfg), context(tmp_path / "one", task["model"]))
    finally:
        ray.shutdown()

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"policy_slot": 1}})
    cluster.add_node(num_cpus=1, resources={"policy_slot": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        from r1pipe.workers.group import PolicyGroup

        nodes = {}
        real_init = PolicyGroup.__init__

        def record_nodes(self, *args, **kwargs):
            real_init(self, *args, **kwargs)
            nodes["policy"] = ray.get([w.node_id.remote() for w in self.workers])

        monkeypatch.setattr(PolicyGroup, "__init__", record_nodes)
        run_grpo(grpo_config(task, {**cfg, "resources.trainer.custom": {"policy_slot": 1}, "resources.placement_strategy": "SPREAD"}),
                 context(tmp_path / "two", task["model"], address=cluster.address))
    finally:
        ray.shutdown()
        cluster.shutdown()

    assert len(set(nodes["policy"])) == 2  # one policy worker on each node
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one[1:], two[1:]):
        for key in ("reward/mean", "response_length/mean", "loss", "grad_norm", "kl", "entropy", "sync/probe_logprob_diff"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
