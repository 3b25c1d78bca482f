"""Throughput benchmarks, each a module run with `python -m gpo_exp.bench.<name>`."""
