"""The `piplay` command. Each subcommand imports its module lazily so `piplay --help` stays instant."""

from __future__ import annotations

import argparse
import os
import sys

from piplay_ray.config import ConfigError, dump_config, load_config
from piplay_ray.errors import UserInputError


def _add_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", "-c", required=required, help="YAML config file (may `extends:` a base)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. student.group_size=8")


def cmd_assets(args) -> int:
    if args.home:
        os.environ["PIPLAY_HOME"] = os.path.abspath(args.home)
    from piplay_ray import assets

    paths = assets.build_all()
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_config_show(args) -> int:
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_train(args) -> int:
    from piplay_ray.driver import train

    train(load_config(args.config, [*args.overrides, *(["logging.verbose=true"] if args.verbose else [])]))
    return 0


def cmd_experiment(args) -> int:
    from piplay_ray.experiment import Experiment, load_spec

    spec = load_spec(args.config)
    spec.parallel = spec.parallel or args.parallel
    paths = Experiment(spec, args.overrides).run()
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def cmd_warmup(args) -> int:
    from piplay_ray import warmup
    from piplay_ray.roles import MODELS

    cfg = load_config(args.config, args.overrides)
    ready = warmup.prepare(cfg)
    for role in MODELS:
        print(f"{role}: {ready.model.path_for(role)}")
    return 0


def cmd_eval(args) -> int:
    from piplay_ray.evaluation import run_eval

    run_eval(load_config(args.config, args.overrides), model=args.model, data=args.data, out=args.out)
    return 0


def cmd_retriever_index(args) -> int:
    from piplay_ray.retrieval import build_index

    build_index(load_config(args.config, args.overrides).search)
    return 0


def cmd_retriever_serve(args) -> int:
    from piplay_ray.retrieval.server import serve

    serve(load_config(args.config, args.overrides).search, host=args.host, port=args.port)
    return 0


def cmd_submit(args) -> int:
    from piplay_ray.submit import cmd_submit as run

    return run(args)


def cmd_dashboard(args) -> int:
    from piplay_ray.dashboard.server import serve_run

    serve_run(args.run_dir, host=args.host, port=args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="piplay", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("assets", help="build the embedded model, corpus and tiny test model")
    p.add_argument("--home", help="asset folder (default $PIPLAY_HOME or ~/.cache/piplay)")
    p.set_defaults(fn=cmd_assets)

    p = sub.add_parser("config", help="inspect configs")
    csub = p.add_subparsers(dest="config_command", required=True)
    q = csub.add_parser("show", help="print the resolved, validated config")
    _add_config(q)
    q.set_defaults(fn=cmd_config_show)

    p = sub.add_parser("train", help="run the evolution loop")
    _add_config(p)
    p.add_argument("--verbose", "-v", action="store_true",
                   help="actor output (vLLM, Ray, DeepSpeed) on the terminal instead of RUN_DIR/logs/")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("experiment", help="run arms x seeds of a config on shared task sets; a table and a plot")
    p.add_argument("--config", "-c", required=True, help="experiment file (configs/experiments/*.yaml)")
    p.add_argument("--parallel", action="store_true",
                   help="runs side by side as Ray tasks on one cluster (add run.mode=cluster to join a running one)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run of the experiment")
    p.set_defaults(fn=cmd_experiment)

    p = sub.add_parser("warmup", help="build the protocol warm start a config names (builtin:*-search), cached")
    _add_config(p)
    p.set_defaults(fn=cmd_warmup)

    p = sub.add_parser("eval", help="evaluate a model as the student search agent")
    _add_config(p)
    p.add_argument("--model", required=True, help="Hugging Face model directory or builtin:NAME")
    p.add_argument("--data", nargs="*", default=None, help="QA files (JSONL/Parquet); default the built-in set")
    p.add_argument("--out", default=None, help="output folder (default: under run.root)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("retriever", help="build or serve a retriever")
    rsub = p.add_subparsers(dest="retriever_command", required=True)
    q = rsub.add_parser("index", help="build the retriever's index")
    _add_config(q)
    q.set_defaults(fn=cmd_retriever_index)
    q = rsub.add_parser("serve", help="serve the retriever over the Search-R1 HTTP protocol")
    _add_config(q)
    q.add_argument("--host", default="127.0.0.1")
    q.add_argument("--port", type=int, default=8000)
    q.set_defaults(fn=cmd_retriever_serve)

    p = sub.add_parser("submit", help="submit `piplay train` to a Ray cluster as a Ray job")
    from piplay_ray.submit import add_arguments as add_submit_arguments

    add_submit_arguments(p)
    p.set_defaults(fn=cmd_submit)

    p = sub.add_parser("dashboard", help="serve the dashboard of a run directory")
    p.add_argument("run_dir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8390)
    p.set_defaults(fn=cmd_dashboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"piplay: {e}", file=sys.stderr)
        return 2
    except UserInputError as e:
        print(f"piplay: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
