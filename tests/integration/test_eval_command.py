"""`piplay eval` end to end: the agent and its two baselines on the built-in sets and on a FlashRAG file,
as quiet as `piplay train` (actor output under OUT/logs/)."""

from __future__ import annotations

import json

import pytest

from piplay_ray.method import qa as Q


def _table(out: str) -> dict[str, list[str]]:
    rows = [line.split() for line in out.splitlines() if line.strip()]
    head = next(i for i, r in enumerate(rows) if r[:2] == ["group", "n"])
    return {r[0]: r[1:] for r in rows[head:]}


def test_piplay_eval_agent_and_baselines_quietly(tiny_model, corpus_path, tmp_path, capfd):
    from piplay_ray.cli import main

    out = tmp_path / "eval"
    common = ["--config", "configs/tiny.yaml", "--model", tiny_model, f"search.corpus={corpus_path}",
              "eval.rule_size=3", "eval.natural_size=4", "ray.num_cpus=4"]
    assert main(["eval", *common, "--out", str(out)]) == 0
    printed = capfd.readouterr()
    table = _table(printed.out)
    assert table["group"][1:] == [f"{m} {c}".split()[i] for m in ("agent", "closed_book", "retrieval")
                                  for c in ("em", "f1", "searches") for i in (0, 1)]
    natural = Q.natural_set(corpus_path, 4, 0)
    kinds = {"single" if ex.kind == "single" else "two-article" for ex in natural}
    assert {"natural", "rule", "overall"} | {f"natural/{k}" for k in kinds} == set(table) - {"group"}
    assert table["natural"][0] == "4" and table["rule"][0] == "3" and table["overall"][0] == "7"
    for method in ("agent", "closed_book", "retrieval"):
        records = [json.loads(x) for x in (out / method / "examples.jsonl").read_text().splitlines()]
        assert [r["id"] for r in records] == [ex.id for ex in natural] + [r["id"] for r in records[4:]]
        meta = json.loads((out / method / "metrics.json").read_text())
        assert meta["method"] == method and meta["summary"]["overall"]["n"] == 7
        searches = [r["searches"] for r in records]
        if method == "closed_book":
            assert searches == [0] * 7 and all(r["turns"] == 1 for r in records)  # one turn, no search tool
        if method == "retrieval":
            assert searches == [1] * 7 and all(r["prediction"] for r in records)  # a top-1 title for each
    # quiet: no engine or Ray chatter on the terminal; the actors' output is in OUT/logs/
    assert "WARNING" not in printed.err and "INFO" not in printed.err, printed.err[-2000:]
    assert any((out / "logs").glob("worker-*.log"))

    # a FlashRAG-format file: its own sources, and HotpotQA's metadata.type as the question's kind
    qa = tmp_path / "dev.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "h1", "question": "Which is older, Rome or Paris?", "golden_answers": ["Rome"],
         "data_source": "hotpotqa", "metadata": {"type": "comparison"}},
        {"id": "n1", "question": "Who wrote Hamlet?", "golden_answers": ["William Shakespeare"], "data_source": "nq"}]))
    assert main(["eval", *common, "--data", str(qa), "--out", str(tmp_path / "file"),
                 "--methods", "retrieval,closed_book"]) == 0
    table = _table(capfd.readouterr().out)
    assert set(table) - {"group"} == {"hotpotqa", "hotpotqa/two-article", "nq", "overall"}
    assert table["group"][1:3] == ["retrieval", "em"] and len(table["group"]) == 1 + 2 * 3 * 2  # two methods


def test_piplay_eval_refuses_an_unknown_method(capsys):
    from piplay_ray.cli import main

    assert main(["eval", "--config", "configs/tiny.yaml", "--model", "x", "--methods", "agent,oracle"]) != 0
    assert "--methods: oracle not among agent, closed_book, retrieval" in capsys.readouterr().err


@pytest.mark.slow
def test_piplay_eval_smollm2_builtin(smollm2, corpus_path, tmp_path):
    from piplay_ray.cli import main

    out = tmp_path / "eval"
    rc = main(["eval", "--config", "configs/local.yaml", "--model", smollm2, "--out", str(out), "--methods", "agent",
               f"search.corpus={corpus_path}", "eval.rule_size=16", "eval.natural_size=16", "ray.num_cpus=2"])
    assert rc == 0
    meta = json.loads((out / "agent" / "metrics.json").read_text())
    overall = meta["summary"]["overall"]
    print(json.dumps({"metric": "smollm2_builtin_eval", **overall, "seconds": meta["seconds"]}))
    records = [json.loads(x) for x in (out / "agent" / "examples.jsonl").read_text().splitlines()]
    assert len(records) == overall["n"] == 32
    assert 0.0 <= overall["em"] <= overall["f1"] <= 1.0
    assert all(r["turns"] >= 1 for r in records)
