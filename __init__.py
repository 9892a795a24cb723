"""Experiment 6: DBOS scope, lifecycle and containers.

This file makes the repository folder importable as a package; each script is
also runnable on its own (``python scope.py``) and importable by its own name.
"""
