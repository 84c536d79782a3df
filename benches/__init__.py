"""Reproducible benchmarks for memscope-async, side by side with its peers.

Run them with ``python -m benches.run`` (see ``benches/README.md``).  Nothing here is
imported by the package or run by the test suite: timings belong here, never in a test.
"""
