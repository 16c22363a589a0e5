"""The roles of π-Play, named once.

The examiner and the student are trained (each has a learner policy and a rollout pool); the teacher is
never trained by gradient but has its own model path (an EMA of the student, see teacher/).
"""

from __future__ import annotations

TRAINED = ("examiner", "student")  # learner policies and rollout pools, in this order
MODELS = (*TRAINED, "teacher")  # every role with a model path (config.ModelConfig.path_for)
