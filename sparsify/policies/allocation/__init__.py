"""Helpers that policies use, not policies: budget maths, MACs and latency allocation, STR's controller."""
