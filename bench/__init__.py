"""Benchmarks: one command each (`python -m bench.<name>`), each prints a markdown table, saves a PNG
plot and appends its result to `bench/RESULTS.md`. `make bench` runs all of them at a small scale."""
