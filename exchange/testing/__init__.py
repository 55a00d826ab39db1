"""Helpers for tests and benchmarks that start real local networks (not used by a node)."""
