"""Helpers for testing pruning: the exactness oracle and small models covering each op rule."""
