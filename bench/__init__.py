"""darl-lite benchmarks: latency, cost model, memory and quality suites (``python -m bench.run``)."""
