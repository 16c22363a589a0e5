"""`piplay dashboard RUN_DIR [--host H --port P]`: serve the dashboard of a run directory (live or finished)."""

from __future__ import annotations

from piplay_ray.monitor.dashboard.server import serve_run


def run(args) -> int:
    serve_run(args.run_dir, host=args.host, port=args.port)
    return 0
