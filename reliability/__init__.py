"""The reliability suite: crashes, database outages, schedules across workers, hostile
input, bounded load and secrets. ``python -m reliability`` prints the figures; the tests in
``tests/test_reliability_*.py`` run the same code with fewer trials and assert on it."""
