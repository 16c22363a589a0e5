"""The console shows paths relative to where the command runs, so its lines read the same on every machine."""

from __future__ import annotations

from piplay_ray.monitor import console


def test_paths_inside_the_working_directory_are_shown_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert console.shown(tmp_path / "runs" / "local") == "runs/local"
    assert console.where(tmp_path / "runs" / "local") == ("actor output: runs/local/logs/ (worker-<pid>.log; "
                                                          "`grep -l Error runs/local/logs/*`)")
    outside = tmp_path.parent / "elsewhere"
    assert console.shown(outside) == str(outside.resolve())
