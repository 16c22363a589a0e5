"""The web dashboard of a run directory: a small HTTP server (`server.py`) over the run's files, and the page
(`static/`) that draws the evolution loop's curves, task sets, samples and health."""
