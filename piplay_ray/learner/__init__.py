"""The learner: DeepSpeed actor group (learner.py), token-budget micro-batches (batching.py), checkpoints
(checkpoint.py) and weight sync transports (weight_sync/). DeepSpeed is imported only inside the actors.
Nothing is imported here, so that a light submodule (checkpoint, token_stats) never pulls in the group."""
