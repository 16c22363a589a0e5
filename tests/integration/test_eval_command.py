"""`piplay eval` end to end: the embedded SmolLM2 as the student on the built-in set (slow)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_piplay_eval_smollm2_builtin(smollm2, corpus_path, tmp_path):
    from piplay_ray.cli import main

    out = tmp_path / "eval"
    rc = main(["eval", "--config", "configs/local.yaml", "--model", smollm2, "--out", str(out),
               f"search.corpus={corpus_path}", "eval.builtin_size=16", "ray.num_cpus=2"])
    assert rc == 0
    meta = json.loads((out / "metrics.json").read_text())
    overall = meta["summary"]["overall"]
    print(json.dumps({"metric": "smollm2_builtin_eval", **overall, "seconds": meta["seconds"]}))
    records = [json.loads(x) for x in (out / "examples.jsonl").read_text().splitlines()]
    assert len(records) == overall["n"] == 16
    assert 0.0 <= overall["em"] <= overall["f1"] <= 1.0
    assert all(r["turns"] >= 1 for r in records)
