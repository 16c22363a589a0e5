"""`piplay retriever index --config F`: build the retriever's index; `piplay retriever serve --config F
[--host H --port P]`: serve it over the Search-R1 HTTP protocol."""

from __future__ import annotations

from piplay_ray.config import load_config


def run(args) -> int:
    search = load_config(args.config, args.overrides).search
    if args.retriever_command == "index":
        from piplay_ray.retrieval import build_index

        build_index(search)
    else:
        from piplay_ray.retrieval.server import serve

        serve(search, host=args.host, port=args.port)
    return 0
