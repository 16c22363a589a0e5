"""Retrievers behind one batched interface (base.py); one file per implementation."""
