"""The evolution loop in its rooms: the loop (Algorithm 1), a phase's producer and learner steps, the step
recipes, the policy handles, the task set, run bookkeeping, and the actors it is handed (docs/architecture.md)."""
