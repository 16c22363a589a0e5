"""One module per `piplay` subcommand, each with `run(args) -> exit code`; `cli.py` only parses and dispatches.

Each module's docstring gives the command line that runs it. Modules are imported only when their command
runs, so `piplay --help` stays instant.
"""
