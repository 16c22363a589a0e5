"""The user's own mistakes end in one line naming what to fix, with no traceback, before anything starts: a list
where a mapping belongs (or the reverse) in an override or a config file, and every kind of broken corpus in
`piplay retriever index` / `serve` and `piplay train`."""

from __future__ import annotations

from pathlib import Path

import pytest

from piplay_ray.cli import main

ROWS = {
    "broken": ('{"id": "1", "contents": "a b c"}\n\n{broken\n', ":3: not a JSON object"),
    "blank": ("\n\n\n", ": no documents, every line is blank"),
    "no_contents": ('{"id": "1", "title": "x"}\n', ':1: a document needs a string `contents`'),
    "not_an_object": ('{"id": "1", "contents": "a"}\n[1, 2]\n', ":2: a document needs a string `contents`"),
    "empty": ("", ": the corpus is empty"),
}


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("piplay: ") and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("override, message", [
    ("schedule.distill_lambda={a: 1}", "`schedule.distill_lambda` must be a list, got a mapping"),
    ("student=[1]", "`student` must be a mapping, got a list"),
    ("examiner.hop_weights={x: 2}", "`examiner.hop_weights` must be a list, got a mapping"),
])
def test_a_list_for_a_mapping_or_the_reverse_is_named(capsys, override, message):
    err = _one_line_error(capsys, ["config", "show", "--config", "configs/tiny.yaml", override])
    assert f"override `{override}`" in err and message in err


def test_a_config_file_that_puts_a_list_over_its_base_mapping_is_named(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(f"extends: {Path('configs/tiny.yaml').resolve()}\nstudent: [1]\n")
    err = _one_line_error(capsys, ["config", "show", "--config", str(path)])
    assert str(path) in err and "`student` must be a mapping, got a list" in err


@pytest.mark.parametrize("kind", sorted(ROWS))
@pytest.mark.parametrize("command", [["retriever", "index"], ["retriever", "serve", "--port", "0"], ["train"]])
def test_a_broken_corpus_is_named_by_file_and_line(tmp_path, capsys, monkeypatch, kind, command):
    import ray

    text, message = ROWS[kind]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(text)
    monkeypatch.setenv("PIPLAY_HOME", str(tmp_path / "home"))  # no remembered check of another file
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started for a broken corpus"))
    err = _one_line_error(capsys, [*command, "--config", "configs/tiny.yaml", f"search.corpus={corpus}",
                                   f"search.index_dir={tmp_path / 'index'}", f"run.dir={tmp_path / 'run'}"])
    assert f"{corpus}{message}" in err
    assert not (tmp_path / "run").exists()  # not even the run directory


def test_a_missing_corpus_is_named(tmp_path, capsys):
    err = _one_line_error(capsys, ["retriever", "index", "--config", "configs/tiny.yaml",
                                   f"search.corpus={tmp_path / 'absent.jsonl'}"])
    assert f"corpus file not found: {tmp_path / 'absent.jsonl'}" in err
