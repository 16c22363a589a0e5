"""Weight sync from the learner to rollout workers and the teacher: one transport per file."""

from .base import TensorSpec, Transport, WeightBundle, make_transport, pack_buckets, unpack_bucket

__all__ = ["TensorSpec", "Transport", "WeightBundle", "make_transport", "pack_buckets", "unpack_bucket"]
