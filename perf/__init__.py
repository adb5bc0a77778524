"""Benchmarks and the cost model; they drive the system through its commands, HTTP and gRPC."""
