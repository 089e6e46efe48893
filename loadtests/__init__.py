"""kiln's load tools: the locust gRPC user, `kiln bench` and the benchmark scripts.

Benchmarks are not tests: they print tables, write JSON and plots, and compare
ratios measured side by side in one run (results in docs/BENCHMARKS.md).
"""
