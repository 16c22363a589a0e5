"""The Ray actors of rollouts and data: rollout workers and their pools (an engine + the agent loop), the
search environment, the replay store. Their pure logic sits beside them without Ray: `search_service.py`
(micro-batching, caching, formatting) and `replay_buffer.py` (the bounded, versioned buffer and its spill)."""
