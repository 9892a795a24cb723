"""The replicas area (reliability/replicas.py) as ``python -m reliability --quick``
runs it: one trial of its quick cases (the database cut from every replica, a
partition, a crash) on one pair of replicas, and the figures made from it.

Each case's own assertions live in tests/test_replicas.py; here: the area runs end to
end, its figures are the ones the README shows, and every promise that is not a speed
target was kept. The takeover and resume times are figures, checked against their
targets in the full run, not here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from reliability import replicas
from reliability.core import Context, broken, quick_context

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SPEED = ("takeover time", "resume after the heal")


@pytest.fixture
def reliability_ctx(pg_server: str, tmp_path: Path) -> Iterator[Context]:
    with quick_context(pg_server, tmp_path) as ctx:
        yield ctx


def test_the_quick_area_keeps_every_promise_but_the_speed_targets(
    reliability_ctx: Context,
) -> None:
    reliability_ctx.trials = 1
    figures = replicas.run(reliability_ctx)
    names = {f.name for f in figures}
    assert {f.area for f in figures} == {replicas.AREA}
    for case in replicas.QUICK_CASES:
        assert f"{case}: trials" in names
        assert f"{case}: workflows lost" in names
        assert f"{case}: step outputs recorded twice" in names
        assert f"{case}: bodies run again beyond those in flight" in names
        assert f"{case}: two live processes on one executor id" in names
    assert "crash: takeover time (median, max)" in names
    assert "cut from all: resume after the heal (median, max)" in names
    assert "partition: A fenced before B took over (min lead)" in names
    bad = [f for f in broken(figures) if not any(s in f.name for s in SPEED)]
    assert bad == [], bad
