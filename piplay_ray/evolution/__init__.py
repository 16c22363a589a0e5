"""Algorithm 1 in its rooms: the loop (`loop.py`), a phase's producer and learner steps (`phase.py`), the step
recipes (`steps.py`), the policy handles (`policy.py`), the task set, run bookkeeping (`book.py`,
`accounting.py`, `state.py`), the actors it is handed (`actors.py`), the evaluation through a rollout pool
(`evaluation.py`) and the protocol warm start (`warmup.py`); docs/architecture.md draws them."""
