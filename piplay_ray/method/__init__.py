"""π-Play's rules, pure (no Ray, no engine process): the folder a researcher opens to change the method.

- `protocol.py`: the prompts and the tag protocol, and parsing a model turn (never raises on model output)
- `evidence.py`: retrieved documents as the agent reads them
- `agent.py`: the multi-turn search agent loop over any engine, token in, token out
- `rewards.py`: answer matching (the student's outcome rewards), the examiner's gate, format and difficulty
  rewards, group advantages
- `privileged.py`: what the teacher is told (the arms of `registry.ARMS`) and fitting it to the engine
- `examiner.py`: the examiner's sampler, task building, rewards and task sets
- `diagnostics.py`: leakage and disagreement diagnostics of a student step
- `demos.py`: protocol demonstrations for the warm start
- `qa.py`: QA files and the rule-built question set
"""
