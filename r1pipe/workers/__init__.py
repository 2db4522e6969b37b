"""Ray workers of the GRPO loop: rollout (the engine) and policy (log-probs, updates, reference).

The classes are plain Python so they can be tested in-process; `remote_class` wraps them for Ray
with the resources the recipe asks for, which is all it takes to scale out on a cluster.
"""
from r1pipe.workers.batch import Completion, DraftStats, RolloutBatch, TrainBatch, build_batch, pad_per_token
from r1pipe.workers.policy import PolicyConfig, PolicyWorker
from r1pipe.workers.rollout import RolloutWorker

__all__ = ["Completion", "DraftStats", "RolloutBatch", "PolicyConfig", "PolicyWorker", "RolloutWorker", "TrainBatch", "build_batch", "pad_per_token"]
