"""The shutdown demo's CPU work, in a module of its own.

A process of the demo's pool (shutdown/pool.py) imports the module of the function it runs:
this one imports nothing, so a pool process holds only the interpreter, the pool's
own machinery and ``fib``, never DBOS, FastAPI or the app.
"""

from __future__ import annotations


def fib(n: int) -> int:
    """Naive on purpose: exponential CPU work, no I/O."""
    return n if n < 2 else fib(n - 1) + fib(n - 2)
