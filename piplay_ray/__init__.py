"""piplay-ray: privileged-information self-play (pi-Play) for deep-search LLM agents on Ray."""

__version__ = "0.1.0"
