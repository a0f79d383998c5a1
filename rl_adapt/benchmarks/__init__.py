"""Benchmark scripts (python -m rl_adapt.benchmarks.NAME): ratios against a bare reference in the same process."""
