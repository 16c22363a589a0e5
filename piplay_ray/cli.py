"""The `piplay` command: parses the command line and runs `piplay_ray.commands.<command>.run(args)`.

Each command module is imported only when it runs, so `piplay --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from piplay_ray.config import ConfigError
from piplay_ray.errors import UserInputError


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, help="YAML config file (may `extends:` a base)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. student.group_size=8")


def _serve_args(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="piplay", description="pi-Play self-play for deep-search agents on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("assets", help="build the embedded model, corpus and tiny test model")
    p.add_argument("--home", help="asset folder (default $PIPLAY_HOME or ~/.cache/piplay)")

    p = sub.add_parser("config", help="inspect configs")
    _add_config(p.add_subparsers(dest="config_command", required=True).add_parser(
        "show", help="print the resolved, validated config"))

    p = sub.add_parser("train", help="run the evolution loop")
    _add_config(p)
    p.add_argument("--verbose", "-v", action="store_true",
                   help="actor output (vLLM, Ray, DeepSpeed) on the terminal instead of RUN_DIR/logs/")

    p = sub.add_parser("experiment", help="run arms x seeds of a config on shared task sets; a table and a plot")
    p.add_argument("--config", "-c", required=True, help="experiment file (configs/experiments/*.yaml)")
    p.add_argument("--parallel", action="store_true",
                   help="runs side by side as Ray tasks on one cluster (add run.mode=cluster to join a running one)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run of the experiment")

    _add_config(sub.add_parser("warmup", help="build the protocol warm start a config names (builtin:*-search), "
                                              "cached"))

    p = sub.add_parser("eval", help="evaluate a model as the student search agent, beside its baselines")
    _add_config(p)
    p.add_argument("--model", required=True, help="Hugging Face model directory or builtin:NAME")
    p.add_argument("--data", nargs="*", default=None,
                   help="QA files (JSONL/Parquet); default the built-in sets (natural and rule-built)")
    p.add_argument("--methods", default=None,
                   help="comma-separated, of agent, closed_book, retrieval (default: all three)")
    p.add_argument("--out", default=None, help="output folder (default: under run.root)")

    p = sub.add_parser("retriever", help="build or serve a retriever")
    rsub = p.add_subparsers(dest="retriever_command", required=True)
    _add_config(rsub.add_parser("index", help="build the retriever's index"))
    q = rsub.add_parser("serve", help="serve the retriever over the Search-R1 HTTP protocol")
    _add_config(q)
    _serve_args(q, 8000)

    from piplay_ray.commands.submit import add_arguments as add_submit_arguments  # light: config only

    add_submit_arguments(sub.add_parser("submit", help="submit `piplay train` to a Ray cluster as a Ray job"))

    p = sub.add_parser("curve", help="a run's held-out EM at each evaluation, per question set: table and plot")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="folder for curve.md and curve.png (default: the run directory)")

    p = sub.add_parser("dashboard", help="serve the dashboard of a run directory")
    p.add_argument("run_dir")
    _serve_args(p, 8390)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(f"piplay_ray.commands.{args.command}").run(args)
    except (ConfigError, UserInputError) as e:
        print(f"piplay: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
