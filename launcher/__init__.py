"""Starts and stops the local services (Triton, and later Redis, the broker, Prometheus).

Used by `make up`, the test fixtures and the benchmarks; knows nothing of their internals.
"""
