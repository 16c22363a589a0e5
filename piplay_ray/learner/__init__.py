"""The learner: DeepSpeed actor group (learner.py), token-budget micro-batches (batching.py), checkpoints
(checkpoint.py) and weight sync transports (weight_sync/). DeepSpeed is imported only inside the actors."""

from piplay_ray.learner.checkpoint import latest_checkpoint
from piplay_ray.learner.learner import LearnerGroup

__all__ = ["LearnerGroup", "latest_checkpoint"]
