"""The learner: a DeepSpeed actor group (learner.py) of ranks (rank.py), each holding one engine per trained role
(role_engine.py); the step (step.py) over token-budget micro-batches (batching.py, collate.py), the objective
(losses.py), LoRA (lora.py), offloading and checkpoints. Weights leave through `piplay_ray.weight_sync`.
Nothing is imported here, so that a light submodule (checkpoint, token_stats) never pulls in the group."""
