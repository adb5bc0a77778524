"""Starts and stops the local services: Triton, Redis, the Kafka-protocol broker, the gateway
and its workers, Prometheus and Alertmanager.

Used by `make up` (`python -m launcher`), the test fixtures (the service classes) and the
benchmarks (the command line). It runs each service as a process and knows nothing of their
code: it imports no other part of this repository.
"""
