"""Benchmarks of detrcore's native ops against named baselines, measured in the same run.

Each module has `run(...) -> dict` (the JSON record) and prints a table; the scripts in benchmarks/ and
`detrcore bench` call them. Speed claims are ratios of medians against the baseline in the same process.
"""
