"""Benchmarks: what DBOS costs and buys in this repo, as ratios measured side by side.

    python -m benchmarks [--quick] [--out PATH]        # the table (see benchmarks/README.md)
    python -m benchmarks.timeline --help                # a picture of one fan-out

Every figure is the ratio of two things measured in the same run, so it survives
a busy or slow machine better than an absolute time would.
"""
