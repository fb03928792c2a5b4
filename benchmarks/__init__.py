"""Benchmarks, each run from the repository root as ``python -m benchmarks.<name>`` (see docs/benchmarks.md).

They print a table and write JSON; none of them is a timed assertion of the test suite.
"""
