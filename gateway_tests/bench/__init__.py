"""Benchmarks of the gateway: ``python -m gateway_tests.bench`` (see docs/benchmarks.md)."""
