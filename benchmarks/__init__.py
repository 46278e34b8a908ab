"""Benchmarks: quality (rate–distortion vs baselines) and speed."""
