"""Benchmarks: one module per benchmark, each `run(quick) -> dict` of the figures its issue names."""
