"""Experiment 6: DBOS scope, lifecycle and containers.

Nothing imports this file: the scripts, ``lab/``, ``shutdown/`` and ``harness/`` are
imported by their own names (pyproject's ``pythonpath = ["."]``, the image's working
directory), and pytest and mypy run the same without it. It stays because the
experiment's card asks for an ``__init__.py`` at the top level of the repository.
"""
